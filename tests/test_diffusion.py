"""Gaussian diffusion: schedules, respacing, losses and samplers against DiT's reference values."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xray_dit.diffusion import losses, samplers, schedules
from xray_dit.models import dit, factory
from xray_dit.models.convert import dit_torch
from xray_dit.models.weights import load_state_dict
from tests.helpers.golden import assert_close, nhwc

GOLDEN_MODEL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                    num_classes=3, class_dropout_prob=0.1, learn_sigma=True)




@pytest.fixture(scope="module")
def golden(golden_dir):
    with np.load(golden_dir / "dit_tiny.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def eps_fn(golden_dir):
    """The golden DiT as the model function `eps_fn(x, t, y)` the diffusion code calls."""
    model = dit.DiT(**GOLDEN_MODEL)
    variables = {"params": dit_torch.from_state_dict(load_state_dict(golden_dir / "dit_tiny.npz"), model)}
    apply = jax.jit(model.apply)

    def fn(x, t, y):
        with jax.default_matmul_precision("highest"):
            return apply(variables, x, t, y)
    return fn


@pytest.fixture(scope="module")
def schedule():
    return schedules.make_schedule("linear", 1000)


def test_linear_schedule_matches_reference(golden, schedule):
    for field in schedules.Schedule._fields:
        ref = golden[f"diff/{field}"]
        got = getattr(schedule, field)
        assert got.dtype == ref.dtype and got.shape == ref.shape, field
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0, err_msg=field)
    assert schedule.num_steps == 1000


@pytest.mark.parametrize("steps", [250, 50])
def test_respacing_matches_reference(golden, schedule, steps):
    spaced = schedules.respace(schedule, str(steps))
    np.testing.assert_array_equal(spaced.timestep_map, golden[f"diff{steps}/timestep_map"])
    for field in ("betas", "alphas_cumprod", "posterior_log_variance_clipped"):
        np.testing.assert_allclose(getattr(spaced, field), golden[f"diff{steps}/{field}"], rtol=1e-12,
                                   err_msg=field)
    # The kept steps keep their original noise levels exactly.
    np.testing.assert_allclose(spaced.alphas_cumprod, schedule.alphas_cumprod[spaced.timestep_map], rtol=1e-12)


def test_respacing_edge_cases(schedule):
    one = schedules.respace(schedule, 1)
    np.testing.assert_array_equal(one.timestep_map, [0])
    np.testing.assert_allclose(one.betas, schedule.betas[:1])
    assert np.all(np.isfinite(one.posterior_log_variance_clipped))
    full = schedules.respace(schedule, 1000)
    np.testing.assert_array_equal(full.timestep_map, np.arange(1000))
    np.testing.assert_allclose(full.betas, schedule.betas, rtol=1e-12)
    with pytest.raises(ValueError, match="cannot take 1001 steps"):
        schedules.respace(schedule, 1001)
    with pytest.raises(ValueError, match="cannot take 1001 steps"):
        schedules.respace(schedule, "ddim1001")
    np.testing.assert_array_equal(schedules.respace(schedule, "ddim50").timestep_map, np.arange(0, 1000, 20))
    np.testing.assert_array_equal(schedules.respace(schedule, "ddim1").timestep_map, [0])
    with pytest.raises(ValueError, match="integer stride"):
        schedules.spaced_timesteps(10, "ddim7")
    assert schedules.spaced_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    # The reference adds the stride 49.95 ten times (499.4999…), it does not multiply (499.5 → 500).
    assert schedules.spaced_timesteps(1000, 21)[9:12] == [450, 499, 549]
    for bad in (0, -3, "abc", "ddim", "5,0"):
        with pytest.raises(ValueError, match="invalid timestep respacing"):
            schedules.spaced_timesteps(1000, bad)
    # Respacing a respaced schedule composes the maps back to original timesteps.
    twice = schedules.respace(schedules.respace(schedule, 250), 50)
    np.testing.assert_array_equal(twice.timestep_map, schedules.respace(schedule, 250).timestep_map[
        schedules.spaced_timesteps(250, 50)])


def test_cosine_schedule_follows_the_squared_cosine_alpha_bar():
    cosine = schedules.make_schedule("cosine", 1000)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    want = np.array([f((i + 1) / 1000) / f(0) for i in range(1000)])
    uncapped = cosine.betas < 0.999
    assert uncapped[:990].all() and cosine.betas.max() == 0.999
    np.testing.assert_allclose(cosine.alphas_cumprod[uncapped], want[uncapped], rtol=1e-9)
    with pytest.raises(ValueError, match="unknown noise schedule 'sigmoid'"):
        schedules.make_schedule("sigmoid")


def test_q_sample_matches_reference(golden, schedule):
    got = losses.q_sample(schedule, nhwc(golden["diff/qs_x_start"]), golden["diff/qs_t"],
                          nhwc(golden["diff/qs_noise"]))
    assert_close(got, nhwc(golden["diff/qs_out"]))


@pytest.mark.parametrize("prefix", ["tl", "tl0"])
def test_training_losses_match_reference(golden, schedule, eps_fn, prefix):
    """tl0 has t = 0, where vb is the discretised-Gaussian decoder NLL."""
    t, y = golden[f"diff/{prefix}_t"], golden["y"]
    x_start, noise = nhwc(golden["diff/qs_x_start"]), nhwc(golden["diff/qs_noise"])
    assert_close(losses.q_sample(schedule, x_start, t, noise), nhwc(golden[f"diff/{prefix}_x_t"]))
    terms = losses.training_losses(lambda x, tt: eps_fn(x, tt, y), schedule, x_start, t, noise)
    for name in ("loss", "mse", "vb"):
        assert getattr(terms, name).shape == (2,)
        assert_close(getattr(terms, name), golden[f"diff/{prefix}_{name}"])


def test_hybrid_loss_trains_variance_only_through_vb(schedule):
    key_x, key_n, key_o = jax.random.split(jax.random.key(0), 3)
    x_start = jax.random.normal(key_x, (2, 4, 4, 4))
    noise = jax.random.normal(key_n, (2, 4, 4, 4))
    model_out = jax.random.normal(key_o, (2, 4, 4, 8)) * 0.5
    t = jnp.array([0, 500])
    x_t = losses.q_sample(schedule, x_start, t, noise)

    @jax.jit
    def grads(o):
        terms = lambda o: losses.hybrid_loss(schedule, o, x_start, x_t, t, noise)  # noqa: E731
        return [jax.grad(lambda o: getattr(terms(o), name).sum())(o) for name in ("loss", "mse", "vb")]

    grad_loss, grad_mse, grad_vb = grads(model_out)
    np.testing.assert_array_equal(grad_vb[..., :4], 0.0)  # ε is frozen inside vb
    assert np.abs(grad_vb[..., 4:]).max(axis=(1, 2, 3)).min() > 0  # … and trains the variance of each example
    np.testing.assert_allclose(grad_loss[..., :4], grad_mse[..., :4], rtol=1e-6)
    np.testing.assert_allclose(grad_loss[..., 4:], grad_vb[..., 4:], rtol=1e-6)
    fixed = losses.hybrid_loss(schedule, model_out[..., :4], x_start, x_t, t, noise)
    np.testing.assert_array_equal(fixed.vb, 0.0)
    np.testing.assert_array_equal(fixed.loss, fixed.mse)
    with pytest.raises(ValueError, match="channels"):
        losses.hybrid_loss(schedule, model_out[..., :6], x_start, x_t, t, noise)
    with pytest.raises(ValueError, match="differ in shape"):
        losses.epsilon_mse_loss(model_out, noise)


def test_p_sample_matches_reference(golden, schedule, eps_fn):
    x, t, y = nhwc(golden["diff/ps_x"]), golden["diff/ps_t"], golden["y"]
    model_out = samplers.guided_model_output(eps_fn, schedule, x, t, y)
    est = samplers.p_mean_variance(schedule, model_out, x, t, clip_denoised=True)
    assert_close(est.mean, nhwc(golden["diff/ps_mean"]))
    assert_close(est.log_variance, nhwc(golden["diff/ps_log_variance"]))
    step = samplers.ddpm_step(schedule, model_out, x, t, nhwc(golden["diff/ps_noise"]), clip_denoised=True)
    assert_close(step.sample, nhwc(golden["diff/ps_sample"]))
    assert_close(step.pred_xstart, nhwc(golden["diff/ps_pred_xstart"]))

    t = golden["diff/psnc_t"]  # [0, 999], unclipped: t = 0 adds no noise
    model_out = samplers.guided_model_output(eps_fn, schedule, x, t, y)
    step = samplers.ddpm_step(schedule, model_out, x, t, nhwc(golden["diff/psnc_noise"]))
    assert_close(step.sample, nhwc(golden["diff/psnc_sample"]))
    assert_close(step.pred_xstart, nhwc(golden["diff/psnc_pred_xstart"]))
    est = samplers.p_mean_variance(schedule, model_out, x, t)
    np.testing.assert_array_equal(step.sample[0], est.mean[0])


def test_guided_respaced_step_matches_reference(golden, schedule, eps_fn):
    """One step of DiT's sample.py (250 respaced steps, CFG 4). The reference guides ε channels 0-2
    only; fed that same combination our step reproduces it on every channel, and our own guidance
    (all 4 channels) agrees on channels 0-2 and differs on channel 3."""
    spaced = schedules.respace(schedule, 250)
    x, t, y = nhwc(golden["diff250/pscfg_x"]), golden["diff250/pscfg_t"], golden["diff250/pscfg_y"]
    noise = nhwc(golden["diff250/pscfg_noise"])
    raw = samplers.guided_model_output(eps_fn, spaced, x, t, y)  # the doubled batch, unguided
    cond, uncond = raw[:2], raw[2:]
    guided3 = uncond[..., :3] + 4.0 * (cond[..., :3] - uncond[..., :3])
    reference_style = jnp.concatenate([jnp.concatenate([guided3, guided3]), raw[..., 3:]], axis=-1)
    step = samplers.ddpm_step(spaced, reference_style, x, t, noise)
    assert_close(step.sample, nhwc(golden["diff250/pscfg_sample"]))
    assert_close(step.pred_xstart, nhwc(golden["diff250/pscfg_pred_xstart"]))

    ours = samplers.guided_model_output(eps_fn, spaced, x[:2], t[:2], y[:2], guidance_scale=4.0, null_label=3)
    step = samplers.ddpm_step(spaced, ours, x[:2], t[:2], noise[:2])
    ref = nhwc(golden["diff250/pscfg_sample"])[:2]
    assert_close(step.sample[..., :3], ref[..., :3])
    assert np.abs(step.sample[..., 3] - ref[..., 3]).max() > 1e-3


def test_ddim_step_matches_reference(golden, schedule, eps_fn):
    spaced = schedules.respace(schedule, 50)
    x, t = nhwc(golden["diff50/ddim_x"]), golden["diff50/ddim_t"]
    model_out = samplers.guided_model_output(eps_fn, spaced, x, t, golden["y"])
    step = samplers.ddim_step(spaced, model_out, x, t, eta=0.0)
    assert_close(step.sample, nhwc(golden["diff50/ddim_sample"]))
    assert_close(step.pred_xstart, nhwc(golden["diff50/ddim_pred_xstart"]))
    with pytest.raises(ValueError, match="noise"):
        samplers.ddim_step(spaced, model_out, x, t, eta=0.5)
    noisy = samplers.ddim_step(spaced, model_out, x, t, jnp.ones_like(x), eta=0.5)
    assert not np.allclose(noisy.sample, step.sample)


def test_model_receives_original_timesteps(schedule):
    spaced = schedules.respace(schedule, 50)
    seen = []

    def recording_fn(x, t, y):
        seen.append(np.asarray(t))
        return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],))

    x = jnp.zeros((2, 2, 2, 4))
    samplers.guided_model_output(recording_fn, spaced, x, jnp.array([49, 10]), None)
    samplers.guided_model_output(recording_fn, spaced, x, jnp.array([49, 10]), jnp.array([0, 1]),
                                 guidance_scale=2.0, null_label=5)
    np.testing.assert_array_equal(seen[0], [999, 204])
    np.testing.assert_array_equal(seen[1], [999, 204, 999, 204])
    with pytest.raises(ValueError, match="null_label"):
        samplers.guided_model_output(recording_fn, spaced, x, jnp.array([1, 2]), jnp.array([0, 1]),
                                     guidance_scale=2.0)


def test_fixed_large_variance_for_epsilon_only_models(schedule):
    x = jnp.ones((2, 2, 2, 4))
    t = jnp.array([0, 7])
    est = samplers.p_mean_variance(schedule, jnp.zeros_like(x), x, t)
    large = np.append(schedule.posterior_variance[1], schedule.betas[1:])
    np.testing.assert_allclose(est.log_variance[:, 0, 0, 0], np.log(large[[0, 7]]).astype(np.float32), rtol=1e-6)
    with pytest.raises(ValueError, match="model output has 6 channels"):
        samplers.p_mean_variance(schedule, jnp.zeros((2, 2, 2, 6)), x, t)


# ---------------------------------------------------------------------------------------------
# Full samplers on a tiny model.

SAMPLER_MODEL = dit.DiT(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=2)


@pytest.fixture(scope="module")
def tiny_eps_fn():
    """A randomly weighted tiny DiT (a fresh one outputs zeros: adaLN-Zero)."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda v: (0.05 * rng.standard_normal(v.shape)).astype(np.float32),
                          nn.meta.unbox(factory.abstract_params(SAMPLER_MODEL)))
    apply = jax.jit(SAMPLER_MODEL.apply)
    return lambda x, t, y: apply({"params": params}, x, t, y)


def test_one_step_samplers_return_the_x0_prediction(schedule, tiny_eps_fn):
    one = schedules.respace(schedule, 1)
    noise = jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
    y = jnp.array([0, 1])
    x0 = samplers.predict_xstart_from_eps(one, noise, jnp.zeros(2, jnp.int32),
                                          tiny_eps_fn(noise, jnp.zeros(2, jnp.int32), y)[..., :4])
    ddim = samplers.sample_ddim(tiny_eps_fn, one, noise, y=y)
    ddpm = samplers.sample_ddpm(tiny_eps_fn, one, noise, jax.random.key(2), y=y)
    np.testing.assert_allclose(ddim, x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ddpm, x0, rtol=1e-5, atol=1e-5)


def test_samplers_run_jitted_and_are_deterministic_given_the_key(schedule, tiny_eps_fn):
    spaced = schedules.respace(schedule, 5)
    noise = jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
    y = jnp.array([0, 1])
    ddpm = jax.jit(functools.partial(samplers.sample_ddpm, tiny_eps_fn, spaced, y=y))
    a, b, c = ddpm(noise, jax.random.key(3)), ddpm(noise, jax.random.key(3)), ddpm(noise, jax.random.key(4))
    assert a.shape == noise.shape and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)

    # The DDPM loop is the reverse chain of single ancestral steps, step t's noise drawn from fold_in(key, t).
    x = noise
    for index in reversed(range(5)):
        t = jnp.full((2,), index)
        step_noise = jax.random.normal(jax.random.fold_in(jax.random.key(3), index), x.shape, x.dtype)
        x = samplers.ddpm_step(spaced, samplers.guided_model_output(tiny_eps_fn, spaced, x, t, y), x, t,
                               step_noise).sample
    np.testing.assert_allclose(a, x, rtol=1e-4, atol=1e-4 * np.abs(x).max())  # fused vs op-by-op rounding

    ddim = jax.jit(functools.partial(samplers.sample_ddim, tiny_eps_fn, spaced, y=y))
    d = ddim(noise, jax.random.key(3))
    np.testing.assert_array_equal(d, ddim(noise, jax.random.key(4)))  # eta = 0: the key is unused
    # The loop is exactly the reverse chain of single DDIM steps over t = 4, …, 0.
    x = noise
    for index in reversed(range(5)):
        t = jnp.full((2,), index)
        x = samplers.ddim_step(spaced, samplers.guided_model_output(tiny_eps_fn, spaced, x, t, y), x, t).sample
    np.testing.assert_allclose(d, x, rtol=1e-4, atol=1e-4 * np.abs(x).max())  # fused vs op-by-op rounding

    guided = jax.jit(functools.partial(samplers.sample_ddim, tiny_eps_fn, spaced, y=y, null_label=2))
    g4 = guided(noise, guidance_scale=4.0)
    np.testing.assert_allclose(guided(noise, guidance_scale=1.0), d, rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(g4)) and not np.allclose(g4, d, atol=1e-3)

    with pytest.raises(ValueError, match="PRNG key"):
        samplers.sample_ddim(tiny_eps_fn, spaced, noise, y=y, eta=0.5)
