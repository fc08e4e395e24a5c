"""The white-box membership attack of 08_privacy: does the DiT denoise its own training latents better?

Members are the target-class training images the DiT learned from; non-members are held-out images of
the same class (patients outside training). Both sides are encoded here by one function — the DiT's VAE
posterior mean times the DiT's scaling factor, what the DiT trained on up to its sampling noise — so the
attack can only pick up membership, not a difference between how the two sides were encoded.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from xray_dit import checkpoint
from xray_dit import generate as generation
from xray_dit.data import synthetic as synthetic_lib
from xray_dit.diffusion import schedules
from xray_dit.evaluation import membership
from xray_dit.models import factory
from xray_dit.study import probe

ENCODE_BATCH = 64


def encode_latents(vae, vae_params, images: np.ndarray, scale: float) -> np.ndarray:
    """VAE posterior means of (N, H, W) images in [-1, 1], times `scale`; one compiled batch shape."""
    encode = jax.jit(lambda params, x: vae.apply({"params": params}, x, method=vae.encode)[0].astype(jnp.float32))
    out = []
    for start in range(0, len(images), ENCODE_BATCH):
        rows = np.minimum(np.arange(start, start + ENCODE_BATCH), len(images) - 1)   # short batch: repeat last
        out.append(np.asarray(encode(vae_params, jnp.asarray(images[rows, ..., None], jnp.float32)))
                   [:len(images) - start])
    return np.concatenate(out) * scale


def attack(config, mesh, dit_dir: str, members: probe.ImageSet, nonmembers: probe.ImageSet, *,
           n_boot: int) -> dict:
    """Denoising-loss membership AUC of one DiT export with its patient-level CI and p-value."""
    start = time.perf_counter()
    study = config.study
    model, params, info = factory.load_export(dit_dir, mesh, rules=config.mesh.rules, kind="dit",
                                              dtype=factory.dtype_from_name(config.compute_dtype),
                                              attention_impl=factory.attention_impl(config))
    vae, vae_params, _ = generation.load_vae(info["vae_dir"], config, mesh=mesh)
    scale = float(info["scaling_factor"])
    schedule = schedules.make_schedule(info["noise_schedule"], int(info["diffusion_steps"]))
    timesteps = [int(t) for t in study.mia_timesteps if 0 <= int(t) < schedule.num_steps]
    if not timesteps:
        raise ValueError(f"study.mia_timesteps={list(study.mia_timesteps)} holds no schedule index below "
                         f"{schedule.num_steps}, the DiT's diffusion steps")
    images = np.concatenate([members.images, nonmembers.images])
    latents = encode_latents(vae, vae_params, images, scale)
    class_names = info.get("class_names") or []
    labels = (np.full(len(latents), class_names.index(info["target_class"]), np.int32) if class_names else None)

    def apply(p, x, t, y):
        return model.apply({"params": p}, x, t, y)

    losses = membership.denoising_losses(apply, params, latents, labels, schedule, timesteps,
                                         int(study.mia_noise_draws), jax.random.PRNGKey(int(config.seed)))
    m = len(members)
    result = membership.mia_auc_with_ci(losses[:m], losses[m:], members.patients, nonmembers.patients,
                                        n_boot=n_boot, seed=0, lower_is_member=True)._asdict()
    return {**result, "dit": str(dit_dir), "timesteps": timesteps, "noise_draws": int(study.mia_noise_draws),
            "member_loss_mean": float(losses[:m].mean()), "nonmember_loss_mean": float(losses[m:].mean()),
            "trained_steps": info.get("trained_steps"), "seconds": time.perf_counter() - start}


def dit_export_of(out_dir: str, label_names, fallback: str) -> str:
    """The DiT export a generator's folder was sampled from (its manifest's `dit` column), else `fallback`."""
    rows = synthetic_lib.SyntheticSource(out_dir, label_names).rows
    named = rows[0].get("dit") if rows else None
    return named if named and (epath.Path(named) / checkpoint.EXPORT_INFO).exists() else fallback
