"""Task `train_dit`: cache VAE latents of the chosen class once, then train a DiT on them.

The cache (fast-DiT style) holds each training image's posterior mean and std, so every step samples a
fresh latent `mean + std·ε` without running the encoder. It is reused when its fingerprint (VAE export,
dataset, split, class filter, scaling factor) matches, and rebuilt otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import json

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from xray_dit import checkpoint, generate, sharding
from xray_dit.data import prepared
from xray_dit.diffusion import losses, schedules
from xray_dit.evaluation import plots
from xray_dit.models import factory
from xray_dit.train import eval_pass, loop

CACHE_FILE = "latents.array_record"
CACHE_INFO = "latents.json"
NO_FINDING = "No Finding"


# --------------------------------------------------------------------------------------------------
# The latent cache
# --------------------------------------------------------------------------------------------------
def _files_under(directory: epath.Path):
    for path in directory.iterdir():   # epath refuses `**` globs (slow on GCS); exports are a few files
        yield from _files_under(path) if path.is_dir() else (path,)


def _cache_fingerprint(config, vae_dir, class_names, only_class) -> dict:
    info = checkpoint.load_export_info(vae_dir)
    # model.json can stay the same when new weights are exported into the same folder (an import rerun
    # on a replaced file); Orbax names the files of every save afresh, so their listing tells saves apart.
    params_files = sorted(f"{p.relative_to(epath.Path(vae_dir))}:{p.stat().length}"
                          for p in _files_under(epath.Path(vae_dir) / "params"))
    return {"vae_dir": str(vae_dir), "vae_info_sha": hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest(),
            "vae_params_sha": hashlib.sha256("\n".join(params_files).encode()).hexdigest(),
            "dataset": f"{config.data.name}/{config.data.builder_config}", "split": "train",
            # The scarcity axis decides which training images exist at all.
            "target_fraction": [float(config.data.get("target_fraction", 1.0)),
                                int(config.data.get("target_fraction_seed", 0))],
            "class_names": list(class_names), "only_class": only_class, "image_size": int(config.data.image_size)}


def build_latent_cache(config: ml_collections.ConfigDict, workdir: epath.Path, vae_dir: str, *, mesh,
                       class_names: tuple[str, ...], only_class: str | None) -> tuple[epath.Path, dict]:
    """Writes (or reuses) the latent cache; returns its folder and info (count, shape, scaling factor)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    cache_dir = epath.Path(config.dit.latent_cache_dir) if config.dit.latent_cache_dir else workdir / "latents"
    fingerprint = _cache_fingerprint(config, vae_dir, class_names, only_class)
    info_path = cache_dir / CACHE_INFO
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("fingerprint") == fingerprint and (cache_dir / CACHE_FILE).exists():
            logging.info("latent cache: reusing %d latents in %s", info["count"], cache_dir)
            return cache_dir, info
        logging.warning("latent cache in %s was made from other inputs; rebuilding it", cache_dir)

    model, params, scale = generate.load_vae(vae_dir, config, mesh=mesh)
    directory = prepared.ensure_prepared(config, workdir)

    @jax.jit
    def encode(params, batch):
        mean, logvar = model.apply({"params": params}, batch["image"], method=model.encode)
        return {"mean": mean.astype(jnp.float32), "std": jnp.exp(0.5 * logvar).astype(jnp.float32)}

    batch_size = eval_pass.eval_batch_size(int(config.dit.train.batch_size), mesh)
    out = eval_pass.run_over_split(encode, params, config, directory, "train", mesh, batch_size=batch_size,
                                only_class=only_class, keys=("labels", "label_mask"))
    count = len(out["mean"])
    if count == 0:
        raise ValueError(f"no training images of class {only_class!r} to train the DiT on")
    classes = (conditioning_labels(out["labels"] * out["label_mask"], tuple(config.data.labels), class_names,
                                   config.data.target_class) if class_names else np.zeros(count, np.int32))
    if jax.process_index() == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if info_path.exists():
            info_path.unlink()  # the info file is written last: a half-written cache never looks complete
        writer = ArrayRecordWriter(str(cache_dir / CACHE_FILE), "group_size:1")
        for i in range(count):
            writer.write(latent_record(int(classes[i]), out["mean"][i], out["std"][i]))
        writer.close()
    info = {"fingerprint": fingerprint, "count": count, "latent_shape": list(out["mean"].shape[1:]),
            "scaling_factor": scale, "latent_std_of_means": float(np.std(out["mean"] * scale))}
    if jax.process_index() == 0:
        info_path.write_text(json.dumps(info, indent=2))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("latent cache written")
    size_mb = (cache_dir / CACHE_FILE).stat().length / 2**20
    logging.info("latent cache: %d latents of shape %s (%.1f MiB) in %s", count, info["latent_shape"], size_mb,
                 cache_dir)
    return cache_dir, info


def conditioning_classes(label_names: tuple[str, ...]) -> tuple[str, ...]:
    """The classes a class-conditional DiT learns: the labels, and "No Finding" for images with none."""
    return label_names if NO_FINDING in label_names else (*label_names, NO_FINDING)


def conditioning_labels(labels: np.ndarray, label_names: tuple[str, ...], class_names: tuple[str, ...],
                        target: str) -> np.ndarray:
    """One class index per image from its multi-hot `labels` (N, len(label_names)): the target class when
    positive (so the target's conditioning sees exactly the images a target-only DiT learns from), else the
    first positive label in `label_names` order, else "No Finding"."""
    labels = np.asarray(labels) > 0
    out = np.full(len(labels), class_names.index(NO_FINDING), np.int32)
    for name in reversed([target] + [n for n in label_names if n != target and n != NO_FINDING]):
        out[labels[:, label_names.index(name)]] = class_names.index(name)
    return out


def latent_record(label: int, mean: np.ndarray, std: np.ndarray) -> bytes:
    """One cache record: int32 label, then the posterior mean and std as float32 (read by `_DecodeLatent`)."""
    return np.int32(label).tobytes() + np.concatenate([np.ravel(mean), np.ravel(std)]).astype(np.float32).tobytes()


class _DecodeLatent(grain.transforms.Map):
    def __init__(self, shape):
        self._shape = tuple(shape)
        self._size = int(np.prod(shape))

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        label = np.frombuffer(record[:4], np.int32)[0]
        values = np.frombuffer(record[4:], np.float32)
        return {"mean": values[: self._size].reshape(self._shape), "std": values[self._size:].reshape(self._shape),
                "label": label}


def latent_dataset(cache_dir: epath.Path, info: dict, *, batch_size: int, seed: int) -> grain.IterDataset:
    source = grain.sources.ArrayRecordDataSource(str(cache_dir / CACHE_FILE))
    local_batch = batch_size // jax.process_count()
    ds = (grain.MapDataset.source(source).seed(seed).shuffle().repeat()
          [jax.process_index()::jax.process_count()]
          .map(_DecodeLatent(info["latent_shape"])).batch(local_batch, drop_remainder=True))
    return ds.to_iter_dataset()


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------
def make_loss_fn(model, schedule: schedules.Schedule, scale: float):
    """The loop's loss: a fresh posterior sample of each cached latent, then `losses.training_losses`."""
    num_steps = schedule.num_steps

    def loss_fn(params, batch, rng, step):
        del step
        eps_key, t_key, noise_key, drop_key = jax.random.split(rng, 4)
        latents = (batch["mean"] + batch["std"] * jax.random.normal(eps_key, batch["mean"].shape)) * scale
        latents = nn.with_logical_constraint(latents, ("act_batch", "act_height", "act_width", "act_channels"))
        t = jax.random.randint(t_key, (latents.shape[0],), 0, num_steps)
        noise = jax.random.normal(noise_key, latents.shape)
        y = batch["label"] if model.num_classes > 0 else None

        def model_fn(x_t, timesteps):
            out = model.apply({"params": params}, x_t, timesteps, y, train=True, rngs={"label_dropout": drop_key})
            return out.astype(jnp.float32)
        terms = losses.training_losses(model_fn, schedule, latents, t, noise)
        return jnp.mean(terms.loss), {"mse": jnp.mean(terms.mse), "vb": jnp.mean(terms.vb)}

    return loss_fn


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------
def train_dit(config: ml_collections.ConfigDict, workdir: epath.Path, *, vae_dir: str | None = None,
              mesh=None) -> dict:
    """Trains the DiT and writes `<workdir>/export`; returns a summary."""
    workdir = epath.Path(workdir)
    vae_dir = vae_dir or config.dit.vae_dir
    if not vae_dir:
        raise ValueError("train_dit needs a VAE: set config.dit.vae_dir to the `export` folder of a train_vae run "
                         "or of `python -m xray_dit.tools.import_weights --kind=vae`")
    mesh = mesh or sharding.make_mesh(config.mesh.shape)
    target = config.data.target_class
    class_names = conditioning_classes(tuple(config.data.labels)) if config.dit.class_conditional else ()
    only_class = None if config.dit.class_conditional else target
    cache_dir, cache = build_latent_cache(config, workdir, vae_dir, mesh=mesh, class_names=class_names,
                                          only_class=only_class)
    height, width, channels = cache["latent_shape"]
    model = factory.dit_from_config(config, latent_size=height, latent_channels=channels,
                                    num_classes=len(class_names))
    schedule = schedules.make_schedule(config.dit.noise_schedule, config.dit.diffusion_steps)
    scale = cache["scaling_factor"]
    train_cfg = config.dit.train
    data = iter(latent_dataset(cache_dir, cache, batch_size=int(train_cfg.batch_size), seed=int(config.seed)))
    vae, vae_params, _ = generate.load_vae(vae_dir, config, mesh=mesh)
    grid_sampler = jax.jit(generate.make_sampler(
        model, vae, schedule, sampler=config.sample.sampler, num_steps=int(config.sample.num_steps),
        eta=float(config.sample.eta), scale=scale))
    grid_noise = jax.random.normal(jax.random.PRNGKey(1234), (16, height, width, channels))
    grid_labels = jnp.full((16,), class_names.index(target) if class_names else 0, jnp.int32)

    def sample_grid(state, step, writer):
        params = state.get("ema_params", state["params"])
        images = plots.to_uint8(sharding.global_to_host(grid_sampler(params, vae_params, grid_noise, grid_labels,
                                                                      jax.random.PRNGKey(0))))
        if jax.process_index() == 0:
            plots.save_grid(images, workdir / "samples" / f"step_{step:07d}.png", ncol=4)
            writer.write_images(step, {"dit/samples_ema": images[..., None]})
        return {}

    task = loop.TrainTask(
        name="dit",
        init_params=functools.partial(factory.init_params, model),
        loss_fn=make_loss_fn(model, schedule, scale), train=train_cfg, data=data, evaluate=sample_grid)
    state = loop.train(config, workdir, task, mesh=mesh)
    params = state.get("ema_params", state["params"])
    info = {"kind": "dit", "model": factory.model_fields(model), "vae_dir": str(vae_dir),
            "scaling_factor": scale, "noise_schedule": config.dit.noise_schedule,
            "diffusion_steps": int(config.dit.diffusion_steps), "class_names": list(class_names),
            "target_class": target, "trained_steps": int(state["step"]), "weights": "ema" if "ema_params" in state else "raw"}
    checkpoint.save_export(checkpoint.export_dir(workdir), params, info)
    return {"export": str(checkpoint.export_dir(workdir)), "latents": cache["count"], "steps": int(state["step"])}


def run(config, workdir):
    return train_dit(config, workdir)
