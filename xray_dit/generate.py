"""Generation: a trained DiT's latents decoded by its VAE, and the task `sample` that writes them as PNGs.

`make_sampler` is the jit-able DiT → VAE-decode function (the DiT trainer draws its sample grids with it
too); `load_vae` reads a VAE export onto a mesh in the run's compute dtype.

Task `sample`: N images of one class from a trained DiT (EMA) + its VAE, as PNGs + manifest.csv.
Batches are sharded over all devices. Image i of batch b comes from `fold_in(PRNGKey(seed), b)`, so the
output is reproducible from the seed, independent of how the run was interrupted. Each batch's PNGs are
written (atomically, file by file) before the manifest is rewritten to include them; a rerun skips
batches whose files are all present, so a killed run completes with no duplicated or missing images.
A full disk stops the run with `OutOfSpaceError` naming the folder; what was written stays usable.
"""

from __future__ import annotations

import csv
import errno
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from xray_dit import sharding
from xray_dit.data import synthetic as synthetic_lib
from xray_dit.data.builders import common as builder_common
from xray_dit.diffusion import samplers, schedules
from xray_dit.models import factory


class OutOfSpaceError(OSError):
    """The sample folder's disk (or quota) is full: free space and rerun; finished batches are kept."""


# --------------------------------------------------------------------------------------------------
# DiT latents → VAE images
# --------------------------------------------------------------------------------------------------
def load_vae(vae_dir: str | epath.PathLike, config: ml_collections.ConfigDict, *, mesh=None):
    """(model, params on `mesh` (None: the config's), scaling_factor) of a VAE export, computing in the
    configured dtype."""
    model, params, info = factory.load_export(
        vae_dir, mesh or sharding.make_mesh(config.mesh.shape), rules=config.mesh.rules, kind="vae",
        dtype=factory.dtype_from_name(config.compute_dtype), attention_impl="xla")  # see factory.vae_from_config
    return model, params, float(info.get("scaling_factor", model.scaling_factor))


def make_sampler(model, vae, schedule: schedules.Schedule, *, sampler: str, num_steps: int, eta: float = 0.0,
                 guidance_scale: float = 1.0, scale: float):
    """jit-able (dit_params, vae_params, noise, labels, key) → images in [-1, 1] (N, H, W, 1)."""
    spaced = schedules.respace(schedule, num_steps if sampler == "ddpm" else f"ddim{num_steps}")
    guided = guidance_scale != 1.0
    if guided and model.num_classes == 0:
        raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional DiT; this one is "
                         "unconditional (train with dit.class_conditional=True, or set guidance_scale=1)")

    def draw(dit_params, vae_params, noise, labels, key):
        def eps_fn(x, t, y):
            return model.apply({"params": dit_params}, x, t, y).astype(jnp.float32)
        y = labels if model.num_classes > 0 else None
        kwargs = dict(y=y, guidance_scale=guidance_scale if guided else None,
                      null_label=model.num_classes if guided else None)
        if sampler == "ddim":
            latents = samplers.sample_ddim(eps_fn, spaced, noise, key, eta=eta, **kwargs)
        elif sampler == "ddpm":
            latents = samplers.sample_ddpm(eps_fn, spaced, noise, key, **kwargs)
        else:
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        images = vae.apply({"params": vae_params}, latents / scale, method=vae.decode)
        return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

    return draw


# --------------------------------------------------------------------------------------------------
# The task's files
# --------------------------------------------------------------------------------------------------
def _replace_atomically(path: epath.Path, write) -> None:
    """`write(partial)` then rename onto `path` (epath's replace: also on gs://); a failed write leaves no
    half-written partial file behind to puzzle whoever looks at the folder."""
    partial = path.parent / (path.name + ".partial")
    try:
        write(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)


def _write_png_atomically(path: epath.Path, pixels: np.ndarray) -> None:
    _replace_atomically(path, lambda partial: partial.write_bytes(builder_common.encode_png(pixels)))


def _write_manifest(out_dir: epath.Path, rows: list[dict]) -> None:
    def write(partial):
        with partial.open("w") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    _replace_atomically(out_dir / synthetic_lib.MANIFEST, write)


def _write_batch(out: epath.Path, files: list[str], pixels: np.ndarray | None, rows: list[dict],
                 batch: int) -> None:
    """The batch's PNGs (if generated now), then the manifest listing them; a full disk → `OutOfSpaceError`."""
    try:
        if pixels is not None:
            for f, image in zip(files, pixels):
                _write_png_atomically(out / f, image)
        _write_manifest(out, rows)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        done = len(rows) - len(files)
        raise OutOfSpaceError(
            e.errno, f"no space left to write samples in {out} ({e.strerror or e}). Free space on that disk and "
            f"rerun the same command: the {done} images listed in {synthetic_lib.MANIFEST} are kept and "
            f"generation resumes at batch {batch}.") from e


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------
def _class_label(info: dict, class_name: str) -> int:
    """The DiT's label of `class_name` (0 for an unconditional DiT); a class it did not learn is refused."""
    class_names = info.get("class_names") or []
    if class_names and class_name not in class_names:
        raise ValueError(f"sample.class_name {class_name!r} is not one the DiT was trained on: {class_names}")
    if not class_names and class_name != info.get("target_class"):
        raise ValueError(f"this DiT is unconditional and learned only {info.get('target_class')!r}; "
                         f"sample.class_name={class_name!r} cannot be generated with it")
    return class_names.index(class_name) if class_names else 0


def sample(config: ml_collections.ConfigDict, workdir: epath.Path, *, dit_dir: str | None = None,
           out_dir: str | None = None, mesh=None) -> dict:
    """Writes `sample.num_images` PNGs of `sample.class_name` and their manifest; returns a summary."""
    workdir = epath.Path(workdir)
    s = config.sample
    dit_dir = dit_dir or s.dit_dir
    if not dit_dir:
        raise ValueError("sample needs a trained DiT: set config.sample.dit_dir to the `export` folder of a "
                         "train_dit run")
    out = epath.Path(out_dir or s.out_dir or workdir / "samples")
    mesh = mesh or sharding.make_mesh(config.mesh.shape)
    model, dit_params, info = factory.load_export(dit_dir, mesh, rules=config.mesh.rules, kind="dit",
                                                  dtype=factory.dtype_from_name(config.compute_dtype),
                                                  attention_impl=factory.attention_impl(config))
    vae, vae_params, scale = load_vae(info["vae_dir"], config, mesh=mesh)
    label = _class_label(info, s.class_name)
    schedule = schedules.make_schedule(info["noise_schedule"], int(info["diffusion_steps"]))
    sampler = make_sampler(model, vae, schedule, sampler=s.sampler, num_steps=int(s.num_steps),
                           eta=float(s.eta), guidance_scale=float(s.guidance_scale), scale=scale)
    batch_sharding = sharding.batch_sharding(mesh, 4)
    generate_batch = jax.jit(sampler, out_shardings=batch_sharding)

    n_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = max(n_devices, (int(s.batch_size) // n_devices) * n_devices)
    num_images = int(s.num_images)
    num_batches = -(-num_images // batch_size)
    shape = (batch_size, model.input_size, model.input_size, model.in_channels)
    root = jax.random.PRNGKey(int(config.seed))
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
    rows, start, made = [], time.perf_counter(), 0
    for b in range(num_batches):
        indices = range(b * batch_size, min((b + 1) * batch_size, num_images))
        files = [f"{s.class_name}_{i:06d}.png" for i in indices]
        pixels = None
        if not all((out / f).exists() for f in files):
            key = jax.random.fold_in(root, b)
            noise_key, sample_key = jax.random.split(key)
            noise = jax.device_put(jax.random.normal(noise_key, shape), batch_sharding)
            labels = jnp.full((batch_size,), label, jnp.int32)
            images = sharding.global_to_host(generate_batch(dit_params, vae_params, noise, labels, sample_key))
            pixels = np.clip(np.round((images[..., 0] + 1.0) * 127.5), 0, 255).astype(np.uint8)
            made += len(files)
        rows += [{"file": f, "label": s.class_name, "seed": int(config.seed), "batch": b, "sampler": s.sampler,
                  "steps": int(s.num_steps), "eta": float(s.eta), "guidance_scale": float(s.guidance_scale),
                  "dit": str(dit_dir)} for f in files]
        if jax.process_index() == 0:
            _write_batch(out, files, pixels, rows, b)
        logging.info("sample: batch %d/%d (%d images, %.1fs)", b + 1, num_batches, len(rows),
                     time.perf_counter() - start)
    seconds = time.perf_counter() - start
    return {"out_dir": str(out), "num_images": len(rows), "generated_now": made, "seconds": seconds}


def run(config, workdir):
    return sample(config, workdir)
