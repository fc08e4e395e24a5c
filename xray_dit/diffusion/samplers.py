"""Reverse diffusion: the model's posterior estimate, single DDPM / DDIM steps and full jit-able samplers.

Everything is NHWC and pure. A model output has C channels (ε; fixed "large" variance, DiT's choice
when `learn_sigma=False`) or 2C channels (ε and learned-range variance values v ∈ [-1, 1]).
Full samplers take `eps_fn(x, t, y) -> model output`, call it with the **original** timestep
`schedule.timestep_map[t]`, and run as one `jax.lax.fori_loop`; wrap them in `jax.jit` (with the
model function and schedule closed over) to compile the whole chain once.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xray_dit.diffusion.schedules import Schedule, extract

EpsFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


class PosteriorEstimate(NamedTuple):
    """p(x_{t-1} | x_t) as predicted by the model, and the x_0 it implies."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_xstart: jax.Array


class StepOutput(NamedTuple):
    sample: jax.Array
    pred_xstart: jax.Array


def split_model_output(model_out: jax.Array, channels: int) -> tuple[jax.Array, jax.Array | None]:
    """(ε, variance values or None) from a C- or 2C-channel model output."""
    if model_out.shape[-1] == 2 * channels:
        return model_out[..., :channels], model_out[..., channels:]
    if model_out.shape[-1] == channels:
        return model_out, None
    raise ValueError(f"model output has {model_out.shape[-1]} channels but x has {channels}; expected "
                     f"{channels} (ε only) or {2 * channels} (ε and learned variance), channels last (NHWC)")


def predict_xstart_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_xstart(schedule: Schedule, x_t: jax.Array, t: jax.Array, pred_xstart: jax.Array) -> jax.Array:
    return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart)
            / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))


def q_posterior_mean_variance(schedule: Schedule, x_start: jax.Array, x_t: jax.Array,
                              t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log variance of the true posterior q(x_{t-1} | x_t, x_0)."""
    n = x_t.ndim
    mean = (extract(schedule.posterior_mean_coef1, t, n) * x_start
            + extract(schedule.posterior_mean_coef2, t, n) * x_t)
    return (mean, extract(schedule.posterior_variance, t, n),
            extract(schedule.posterior_log_variance_clipped, t, n))


def p_mean_variance(schedule: Schedule, model_out: jax.Array, x: jax.Array, t: jax.Array, *,
                    clip_denoised: bool = False) -> PosteriorEstimate:
    """The model's p(x_{t-1} | x_t) for an ε-predicting model (x: (B, H, W, C), t: (B,) schedule indices).

    Learned range: log σ² = frac·log β_t + (1 − frac)·log σ²_posterior,clipped with frac = (v + 1)/2.
    Fixed large (C-channel output): σ² = β_t, with the posterior variance at t=1 standing in at t=0.
    `clip_denoised` clamps the implied x_0 to [-1, 1] (pixel-space models; latents are left alone).
    """
    eps, var_values = split_model_output(model_out, x.shape[-1])
    n = x.ndim
    if var_values is not None:
        min_log = extract(schedule.posterior_log_variance_clipped, t, n)
        max_log = extract(np.log(schedule.betas), t, n)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        variance = jnp.exp(log_variance)
    else:
        large = (np.append(schedule.posterior_variance[1], schedule.betas[1:])
                 if schedule.num_steps > 1 else schedule.betas)
        variance = jnp.broadcast_to(extract(large, t, n), x.shape)
        log_variance = jnp.broadcast_to(extract(np.log(large), t, n), x.shape)
    pred_xstart = predict_xstart_from_eps(schedule, x, t, eps)
    if clip_denoised:
        pred_xstart = jnp.clip(pred_xstart, -1, 1)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_xstart, x, t)
    return PosteriorEstimate(mean, variance, log_variance, pred_xstart)


def _nonzero_mask(t: jax.Array, ndim: int) -> jax.Array:
    """1 where t > 0: the last step (t = 0) adds no noise."""
    return (jnp.asarray(t) != 0).astype(jnp.float32).reshape((-1,) + (1,) * (ndim - 1))


def ddpm_step(schedule: Schedule, model_out: jax.Array, x: jax.Array, t: jax.Array, noise: jax.Array, *,
              clip_denoised: bool = False) -> StepOutput:
    """x_{t-1} = mean + [t > 0]·σ_t·noise (ancestral sampling)."""
    est = p_mean_variance(schedule, model_out, x, t, clip_denoised=clip_denoised)
    sample = est.mean + _nonzero_mask(t, x.ndim) * jnp.exp(0.5 * est.log_variance) * noise
    return StepOutput(sample, est.pred_xstart)


def ddim_step(schedule: Schedule, model_out: jax.Array, x: jax.Array, t: jax.Array,
              noise: jax.Array | None = None, *, eta: float = 0.0, clip_denoised: bool = False) -> StepOutput:
    """One DDIM step (Song et al. eq. 12); `eta = 0` is deterministic and needs no noise.

    ε is re-derived from the (possibly clipped) x_0, as in the reference, so clipping stays consistent.
    """
    est = p_mean_variance(schedule, model_out, x, t, clip_denoised=clip_denoised)
    n = x.ndim
    eps = predict_eps_from_xstart(schedule, x, t, est.pred_xstart)
    alpha_bar = extract(schedule.alphas_cumprod, t, n)
    alpha_bar_prev = extract(schedule.alphas_cumprod_prev, t, n)
    sigma = eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
    mean = est.pred_xstart * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
    if noise is None:
        if not (isinstance(eta, (int, float)) and eta == 0):
            raise ValueError("ddim_step with eta != 0 is stochastic: pass the Gaussian `noise` for this step")
        return StepOutput(mean, est.pred_xstart)
    return StepOutput(mean + _nonzero_mask(t, n) * sigma * noise, est.pred_xstart)


def cfg_combine(cond_out: jax.Array, uncond_out: jax.Array, guidance_scale: float | jax.Array, *,
                eps_channels: int) -> jax.Array:
    """Classifier-free guidance uncond + s·(cond − uncond) on all `eps_channels` ε channels (the
    reference guides only 3 of 4 latent channels); any variance channels come from the conditional pass."""
    guided = uncond_out[..., :eps_channels] + guidance_scale * (cond_out[..., :eps_channels]
                                                                - uncond_out[..., :eps_channels])
    return jnp.concatenate([guided, cond_out[..., eps_channels:]], axis=-1)


def guided_model_output(eps_fn: EpsFn, schedule: Schedule, x: jax.Array, t: jax.Array, y: Any = None, *,
                        guidance_scale: float | jax.Array | None = None, null_label: int | None = None) -> jax.Array:
    """The model output at schedule indices t, given the original timesteps `timestep_map[t]`.

    With `guidance_scale`, the conditional (labels y) and unconditional (`null_label`) passes run as
    one doubled batch and are combined by `cfg_combine`.
    """
    model_t = jnp.asarray(schedule.timestep_map, jnp.int32)[jnp.asarray(t)]
    if guidance_scale is None:
        return eps_fn(x, model_t, y)
    if y is None or null_label is None:
        raise ValueError("classifier-free guidance needs class labels y and the model's null_label "
                         "(its num_classes); for an unconditional model leave guidance_scale=None")
    y = jnp.asarray(y)
    both = eps_fn(jnp.concatenate([x, x]), jnp.concatenate([model_t, model_t]),
                  jnp.concatenate([y, jnp.full_like(y, null_label)]))
    cond, uncond = jnp.split(both, 2)
    return cfg_combine(cond, uncond, guidance_scale, eps_channels=x.shape[-1])


def _sample_loop(step_fn, eps_fn, schedule, noise, key, y, guidance_scale, null_label):
    batch = noise.shape[0]
    num_steps = schedule.num_steps

    def body(i, x):
        index = num_steps - 1 - i
        t = jnp.full((batch,), index, jnp.int32)
        model_out = guided_model_output(eps_fn, schedule, x, t, y, guidance_scale=guidance_scale,
                                        null_label=null_label)
        return step_fn(model_out, x, t, jax.random.fold_in(key, index)).sample

    return jax.lax.fori_loop(0, num_steps, body, noise)


def sample_ddpm(eps_fn: EpsFn, schedule: Schedule, noise: jax.Array, key: jax.Array, *, y: Any = None,
                guidance_scale: float | jax.Array | None = None, null_label: int | None = None,
                clip_denoised: bool = False) -> jax.Array:
    """Ancestral sampling from x_T = `noise` through every step of `schedule` (respace it for speed).

    Step noise is `normal(fold_in(key, t))`, so a key fixes the result.
    """
    def step(model_out, x, t, step_key):
        step_noise = jax.random.normal(step_key, x.shape, x.dtype)
        return ddpm_step(schedule, model_out, x, t, step_noise, clip_denoised=clip_denoised)
    return _sample_loop(step, eps_fn, schedule, noise, key, y, guidance_scale, null_label)


def sample_ddim(eps_fn: EpsFn, schedule: Schedule, noise: jax.Array, key: jax.Array | None = None, *,
                eta: float = 0.0, y: Any = None, guidance_scale: float | jax.Array | None = None,
                null_label: int | None = None, clip_denoised: bool = False) -> jax.Array:
    """DDIM sampling from x_T = `noise`; deterministic for eta = 0 (then `key` may be None)."""
    deterministic = isinstance(eta, (int, float)) and eta == 0
    if key is None:
        if not deterministic:
            raise ValueError("sample_ddim with eta != 0 draws noise: pass a PRNG key")
        key = jax.random.key(0)

    def step(model_out, x, t, step_key):
        step_noise = None if deterministic else jax.random.normal(step_key, x.shape, x.dtype)
        return ddim_step(schedule, model_out, x, t, step_noise, eta=eta, clip_denoised=clip_denoised)
    return _sample_loop(step, eps_fn, schedule, noise, key, y, guidance_scale, null_label)
