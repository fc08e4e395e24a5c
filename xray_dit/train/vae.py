"""Task `train_vae`: the KL autoencoder, from scratch or fine-tuned from imported SD-VAE weights.

Loss: L1 + w_ssim·(1 − SSIM) + w_kl·KL, and optionally a PatchGAN hinge loss switched on at
`vae.gan_start_step`. The adversarial weight is adaptive, balancing the gradients of the reconstruction
and adversarial terms; we measure both gradients at the decoder's *output* (not its last layer's
weights, as taming-transformers does), which needs no second backward pass through the decoder.
At the end: PSNR/SSIM on validation, a reconstruction grid, the latent scaling factor (1/std of
training latents, as SD computed its 0.18215) and, on phantom data, the CTR-oracle check that the
diagnostic feature survives compression.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from xray_dit import checkpoint, metric_writer, sharding
from xray_dit.data import pipeline, prepared
from xray_dit.evaluation import ctr_oracle, plots, synthesis
from xray_dit.models import vae as vae_lib
from xray_dit.models import factory
from xray_dit.train import eval_pass, loop


# --------------------------------------------------------------------------------------------------
# Differentiable SSIM (Gaussian window), for the loss; numpy metrics live in evaluation/
# --------------------------------------------------------------------------------------------------
def _gaussian_window(size: int = 7, sigma: float = 1.5) -> jnp.ndarray:
    x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    g = jnp.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return jnp.outer(g, g)[:, :, None, None]


def ssim(a: jax.Array, b: jax.Array, *, data_range: float = 2.0) -> jax.Array:
    """Mean SSIM per example of NHWC single-channel images in [-1, 1] (Wang et al. 2004 constants)."""
    window = _gaussian_window()
    conv = lambda x: jax.lax.conv_general_dilated(x, window, (1, 1), "VALID",  # noqa: E731
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = conv(a), conv(b)
    var_a = conv(a * a) - mu_a ** 2
    var_b = conv(b * b) - mu_b ** 2
    cov = conv(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return jnp.mean(value, axis=(1, 2, 3))


def make_loss_fn(model: vae_lib.AutoencoderKL, disc: vae_lib.PatchDiscriminator | None, cfg: ml_collections.ConfigDict):
    gan_on_from = int(cfg.gan_start_step)

    def reconstruction_terms(x, recon):
        l1 = jnp.mean(jnp.abs(recon - x))
        ssim_loss = 1.0 - jnp.mean(ssim(recon, x))
        return l1 + cfg.ssim_weight * ssim_loss, l1, ssim_loss

    def loss_fn(params, batch, rng, step):
        x = batch["image"]
        recon, mean, logvar = model.apply({"params": params["vae"]}, x, sample_posterior=True,
                                          rngs={"posterior": rng})
        recon = recon.astype(jnp.float32)
        rec_loss, l1, ssim_loss = reconstruction_terms(x, recon)
        kl = jnp.mean(vae_lib.kl_divergence(mean.astype(jnp.float32), logvar.astype(jnp.float32)))
        loss = rec_loss + cfg.kl_weight * kl
        metrics = {"l1": l1, "ssim_loss": ssim_loss, "kl": kl}
        if disc is not None:
            gan_on = (gan_on_from >= 0) & (step >= gan_on_from)
            frozen_disc = jax.lax.stop_gradient(params["disc"])
            g_of = lambda r: -jnp.mean(disc.apply({"params": frozen_disc}, r))  # noqa: E731
            g_loss, g_grad = jax.value_and_grad(g_of)(recon)
            rec_grad = jax.grad(lambda r: reconstruction_terms(x, r)[0])(recon)
            adaptive = jax.lax.stop_gradient(jnp.clip(
                optax.global_norm(rec_grad) / (optax.global_norm(g_grad) + 1e-4), 0.0, 1e4))
            real_logits = disc.apply({"params": params["disc"]}, x)
            fake_logits = disc.apply({"params": params["disc"]}, jax.lax.stop_gradient(recon))
            d_loss = vae_lib.hinge_d_loss(real_logits, fake_logits)
            weight = jnp.where(gan_on, cfg.gan_weight * adaptive, 0.0)
            loss = loss + weight * g_loss + jnp.where(gan_on, d_loss, 0.0)
            metrics.update(g_loss=g_loss, d_loss=d_loss, gan_weight=weight)
        return loss, metrics

    return loss_fn


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> np.ndarray:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=tuple(range(1, np.ndim(a))))
    return 10 * np.log10(data_range ** 2 / np.maximum(mse, 1e-12))


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------
def train_vae(config: ml_collections.ConfigDict, workdir: epath.Path, *, mesh=None) -> dict:
    workdir = epath.Path(workdir)
    cfg = config.vae
    mesh = mesh or sharding.make_mesh(config.mesh.shape)
    directory = prepared.ensure_prepared(config, workdir)
    model = factory.vae_from_config(config)
    size = int(config.data.image_size)
    use_gan = int(cfg.gan_start_step) >= 0
    disc = vae_lib.PatchDiscriminator(dtype=model.dtype) if use_gan else None

    def init_params(rng):
        vae_rng, disc_rng = jax.random.split(rng)
        params = {"vae": factory.init_params(model, vae_rng)}
        if disc is not None:
            params["disc"] = disc.init(disc_rng, jnp.zeros((1, size, size, 1)))["params"]
        return params

    initial = None
    if cfg.init_from:
        _, vae_params, info = factory.load_export(cfg.init_from, kind="vae", model=model)
        initial = {"vae": vae_params}
        if disc is not None:
            initial["disc"] = sharding.unbox(jax.jit(init_params)(jax.random.PRNGKey(1)))["disc"]
        logging.info("VAE: fine-tuning from %s (%s)", cfg.init_from, info.get("source", "?"))

    train_cfg = cfg.train
    data = iter(pipeline.make_dataset(config.data, "train", train=True, seed=int(config.seed),
                                      batch_size=int(train_cfg.batch_size), data_dir=directory))
    eval_bs = eval_pass.eval_batch_size(int(train_cfg.batch_size), mesh)

    @jax.jit
    def reconstruct(params, batch):
        recon, mean, _ = model.apply({"params": params["vae"]}, batch["image"], sample_posterior=False)
        return {"recon": jnp.clip(recon.astype(jnp.float32), -1.0, 1.0), "image": batch["image"]}

    latest_eval: dict = {}

    def evaluate(state, step, writer):
        out = eval_pass.run_over_split(reconstruct, state["params"], config, directory, "validation", mesh,
                                       batch_size=eval_bs, keys=("index",))
        images, recon = out["image"][..., 0], out["recon"][..., 0]
        metrics = {"psnr": float(np.mean(psnr(images, recon))),
                   "ssim": float(np.mean([synthesis.ssim(a, b, value_range=(-1.0, 1.0)) for a, b in zip(images[:256], recon[:256])]))}
        if jax.process_index() == 0:
            n = min(8, len(images))
            pairs = np.concatenate([plots.to_uint8(images[:n]), plots.to_uint8(recon[:n])])
            plots.save_grid(pairs, workdir / "reconstructions" / f"step_{step:07d}.png", ncol=n)
            writer.write_images(step, {"vae/reconstructions": pairs[..., None]})
        if config.data.name == "cxr_phantom":
            metrics.update(ctr_preservation(images, recon))
        latest_eval.clear()
        latest_eval.update(metrics, step=step)
        return metrics

    task = loop.TrainTask(name="vae", init_params=init_params, loss_fn=make_loss_fn(model, disc, cfg),
                          train=train_cfg, data=data, evaluate=evaluate, initial_params=initial)
    state = loop.train(config, workdir, task, mesh=mesh)

    # The loop evaluated the final parameters already (also after a resume of a finished run).
    final = {k: v for k, v in latest_eval.items() if k != "step"}
    scale = latent_scaling_factor(model, state["params"], config, directory, mesh, batch_size=eval_bs)
    info = {"kind": "vae", "model": factory.model_fields(model), "scaling_factor": scale,
            "trained_steps": int(state["step"]), "init_from": cfg.init_from, "eval": final}
    checkpoint.save_export(checkpoint.export_dir(workdir), state["params"]["vae"], info)
    if jax.process_index() == 0:
        (workdir / "vae_eval.json").write_text(json.dumps(info | {"model": None}, indent=2))
        writer = metric_writer.MetricWriter(workdir / "tensorboard")
        writer.write_scalars(int(state["step"]), {f"vae/final/{k}": v for k, v in final.items()}
                             | {"vae/scaling_factor": scale})
        writer.close()
    logging.info("VAE done: %s, scaling factor %.5f", final, scale)
    return {"export": str(checkpoint.export_dir(workdir)), "scaling_factor": scale, **final}


def ctr_preservation(images: np.ndarray, recon: np.ndarray, tolerance: float = 0.03) -> dict:
    """How well reconstructions keep the cardiothoracic ratio the phantom oracle reads.

    Over the images whose original the oracle can measure: a reconstruction it cannot measure (the
    thorax lost) has not kept the ratio, so it counts as outside the tolerance rather than dropping out.
    """
    original = np.array([ctr_oracle.measure_ctr(im) for im in images])
    rebuilt = np.array([ctr_oracle.measure_ctr(im) for im in recon])
    measurable = np.isfinite(original)
    ok = measurable & np.isfinite(rebuilt)
    within = np.abs(original - rebuilt) <= tolerance   # False where either ratio is NaN
    return {"ctr_within_0.03": float(np.mean(within[measurable])) if measurable.any() else float("nan"),
            "ctr_mean_abs_diff": float(np.mean(np.abs(original - rebuilt)[ok])) if ok.any() else float("nan")}


def latent_scaling_factor(model, params, config, directory, mesh, *, batch_size: int, max_images: int = 2048) -> float:
    """1 / std of posterior samples over training images: scales latents to unit variance for the DiT."""
    @jax.jit
    def sample_latents(params, batch):
        mean, logvar = model.apply({"params": params["vae"]}, batch["image"], method=model.encode)
        key = jax.random.fold_in(jax.random.PRNGKey(0), batch["index"][0])
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)

    latents = []
    for batch in eval_pass.eval_passes(config, directory, "train", batch_size):
        global_batch = sharding.host_to_global(batch, mesh)
        z = sharding.global_to_host(sample_latents(params, global_batch))
        latents.append(z[batch["valid"].astype(bool)] if jax.process_count() == 1 else z)
        if sum(len(z) for z in latents) >= max_images:
            break
    return float(1.0 / np.std(np.concatenate(latents)))


def run(config, workdir):
    return train_vae(config, workdir)
