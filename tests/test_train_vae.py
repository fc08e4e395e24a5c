"""The VAE trainer on tiny configs: PSNR and CTR preservation on hand examples, the loss going down on one
batch, the GAN term's start step, and the task end to end (the session's tiny VAE, trained once in conftest).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import tiny_configs
from tests.helpers.training import fit, phantom_batch, read_png
from xray_dit import checkpoint, generate, sharding
from xray_dit.data import phantom, pipeline
from xray_dit.evaluation import ctr_oracle
from xray_dit.models import factory
from xray_dit.models import vae as vae_lib
from xray_dit.train import vae


def test_psnr_is_ten_log_of_range_squared_over_mse_per_image():
    images = phantom_batch(4, 64)[..., 0]
    np.testing.assert_allclose(vae.psnr(images, images + 0.1), 10 * np.log10(4.0 / 0.01), rtol=1e-6)
    blank = vae.psnr(images, np.zeros_like(images))
    np.testing.assert_allclose(blank, 10 * np.log10(4.0 / np.mean(images.astype(np.float64) ** 2, axis=(1, 2))))
    assert blank.shape == (4,) and np.all(blank < 15.0)
    assert np.all(vae.psnr(images, images) > 100.0)
    half = images.copy()
    half[:2] = images[:2] + 0.2                      # only the first two are off
    assert vae.psnr(images, half)[:2] == pytest.approx([10 * np.log10(100.0)] * 2, rel=1e-5)


def test_ctr_preservation_counts_lost_hearts_as_not_preserved():
    cohort = phantom.make_cohort(6, seed=3, spec=tiny_configs.EASY_SPEC)   # normal and enlarged hearts
    images = np.stack([phantom.render(image, 64) for image in cohort]).astype(np.float32) / 127.5 - 1.0
    measured = np.array([ctr_oracle.measure_ctr(image) for image in images])
    assert np.all(np.isfinite(measured))
    assert vae.ctr_preservation(images, images) == {"ctr_within_0.03": 1.0, "ctr_mean_abs_diff": 0.0}
    # Another patient's image as the "reconstruction": the oracle's CTRs decide, pair by pair.
    swapped = images[::-1]
    differences = np.abs(measured - measured[::-1])
    got = vae.ctr_preservation(images, swapped)
    assert got["ctr_within_0.03"] == pytest.approx(np.mean(differences <= 0.03))
    assert got["ctr_mean_abs_diff"] == pytest.approx(differences.mean())
    assert 0.0 < got["ctr_within_0.03"] < 1.0
    # A reconstruction without a measurable thorax keeps no CTR: it counts against, never drops out.
    assert vae.ctr_preservation(images, np.zeros_like(images))["ctr_within_0.03"] == 0.0
    half_blank = images.copy()
    half_blank[3:] = 0.0
    assert vae.ctr_preservation(images, half_blank)["ctr_within_0.03"] == pytest.approx(0.5)
    assert vae.ctr_preservation(images, half_blank)["ctr_mean_abs_diff"] == pytest.approx(0.0)


def test_vae_overfits_a_fixed_batch():
    model = vae_lib.make_vae(dict(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=8))
    config = tiny_configs.tiny_config()
    loss_fn = vae.make_loss_fn(model, None, config.vae)
    batch = {"image": jnp.asarray(phantom_batch(4, 32))}
    params = {"vae": sharding.unbox(factory.init_params(model, jax.random.PRNGKey(0)))}
    key = jax.random.PRNGKey(1)
    first, last = fit(lambda p: loss_fn(p, batch, key, jnp.asarray(0))[0], params, steps=40, lr=2e-3)
    assert last < 0.3 * first, (first, last)


def test_vae_gan_term_is_off_before_gan_start_step_and_on_after():
    model = vae_lib.make_vae(dict(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=8))
    disc = vae_lib.PatchDiscriminator(base_channels=32, num_layers=1, max_channel_multiplier=1)
    cfg = tiny_configs.tiny_config().vae
    cfg.gan_start_step = 5
    batch = {"image": jnp.asarray(phantom_batch(2, 32))}
    params = {"vae": sharding.unbox(factory.init_params(model, jax.random.PRNGKey(0))),
              "disc": sharding.unbox(disc.init(jax.random.PRNGKey(1), batch["image"][:1]))["params"]}
    key = jax.random.PRNGKey(2)
    loss_and_grads = jax.jit(jax.value_and_grad(vae.make_loss_fn(model, disc, cfg), has_aux=True))
    (before, before_terms), before_grads = loss_and_grads(params, batch, key, jnp.asarray(4))
    (after, after_terms), after_grads = loss_and_grads(params, batch, key, jnp.asarray(5))
    reconstruction = lambda t: t["l1"] + cfg.ssim_weight * t["ssim_loss"] + cfg.kl_weight * t["kl"]  # noqa: E731
    assert float(before_terms["gan_weight"]) == 0.0
    np.testing.assert_allclose(float(before), float(reconstruction(before_terms)), rtol=1e-6)
    assert float(after_terms["gan_weight"]) > 0.0
    np.testing.assert_allclose(float(after), float(reconstruction(after_terms) + after_terms["gan_weight"]
                                                   * after_terms["g_loss"] + after_terms["d_loss"]), rtol=1e-6)
    # The discriminator learns only once the GAN is on: before, its gradient is exactly zero.
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(before_grads["disc"]))
    assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(after_grads["disc"]))


def test_vae_end_to_end_writes_export_reconstructions_and_metrics(trained_vae):
    workdir, config, result = trained_vae
    info = checkpoint.load_export_info(workdir / "export")
    assert info["kind"] == "vae" and info["trained_steps"] == 20
    scale = info["scaling_factor"]
    assert np.isfinite(scale) and scale > 0 and scale == result["scaling_factor"]
    evaluation = json.loads((workdir / "vae_eval.json").read_text())
    assert evaluation["scaling_factor"] == scale
    metrics = evaluation["eval"]
    assert 5.0 < metrics["psnr"] < 60.0 and -1.0 < metrics["ssim"] <= 1.0
    assert {"ctr_within_0.03", "ctr_mean_abs_diff"} <= set(metrics)   # the phantom's CTR check ran

    # Originals above reconstructions, 8 per row: 2 x 8 tiles of 64 px with 2 px padding.
    grids = sorted((workdir / "reconstructions").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000010.png", "step_0000020.png"]
    grid = read_png(grids[-1])
    assert grid.shape == (2 * 66 + 2, 8 * 66 + 2)
    assert not np.array_equal(grid[2:66], grid[68:132])   # reconstructions are not copies of the input

    # The scaling factor makes the training latents (posterior samples) unit-variance.
    model, params, loaded_scale = generate.load_vae(workdir / "export", config)
    assert loaded_scale == scale
    images = next(iter(pipeline.make_dataset(config.data, "train", train=False, seed=0, batch_size=64,
                                             data_dir=config.data.data_dir)))["image"]
    mean, logvar = model.apply({"params": params}, images, method=model.encode)
    assert float(jnp.std(mean * scale)) < 1.05   # the posterior noise adds the rest of the variance
    assert 0.5 < float(jnp.sqrt(jnp.var(mean) + jnp.mean(jnp.exp(logvar)))) * scale < 1.5
