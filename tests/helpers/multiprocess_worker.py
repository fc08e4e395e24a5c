"""One process of a multi-process CPU run: a tiny DiT trained by the real loop (`loop.train`).

    python tests/helpers/multiprocess_worker.py WORKDIR STEPS

Started by tests/test_sharding_multiprocess.py once per process, with the environment `srun` would give each task
(SLURM_NTASKS, SLURM_PROCID, ...) plus JAX_COORDINATOR_ADDRESS, as launch/slurm_gpu.sbatch exports it, so the
processes join through the same `sharding.maybe_initialize_distributed()` that `xray_dit.main` calls. CPU
collectives go over gloo. All processes share WORKDIR: Orbax writes the checkpoints collectively, process 0
alone writes TensorBoard.

The task is built the way `train/dit.py` builds it (`dit.make_loss_fn`, a Grain dataset sharded with
`[process_index::process_count]`), but from fixed in-memory latents, so no VAE or prepared data is needed.
"""

from __future__ import annotations

import os
import sys

import grain
import jax
import numpy as np

LATENT_SIZE, LATENT_CHANNELS, NUM_LATENTS = 8, 4, 64
MESH_SHAPE = (1, 4, 1)   # (data, fsdp, tensor): FSDP over both processes, so each holds only part of the params


def tiny_config(steps: int):
    from configs import base
    config = base.get_config()
    config.task = "train_dit"
    config.mesh.shape = MESH_SHAPE
    config.dit.update(model="DiT-S/2", hidden_size=16, depth=1, num_heads=2, diffusion_steps=100)
    config.dit.train.update(steps=steps, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, eval_every=0,
                            checkpoint_every=2, ema_decay=0.9, grad_clip=1.0)
    return config


def _latents() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    shape = (LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS)
    return [{"mean": rng.normal(size=shape).astype(np.float32),
             "std": np.full(shape, 0.1, np.float32), "label": np.int32(0)} for _ in range(NUM_LATENTS)]


def process_global_order(global_batch: int, process_count: int) -> np.ndarray:
    """Row r of a multi-process global batch is row `order[r]` of the same batch read by one process.

    Process p's strided slice gives it stream elements p, p + P, p + 2P, ... of each global batch, and
    the global array stacks the processes' local batches in process order.
    """
    return np.concatenate([np.arange(p, global_batch, process_count) for p in range(process_count)])


def latent_data(global_batch: int, *, seed: int, as_process_count: int | None = None):
    """This process's checkpointable iterator of local batches, sharded as the DiT trainer shards it.

    `as_process_count` (single process only) yields whole global batches with their rows in the order a
    run over that many processes assembles them: the DiT loss draws noise and timesteps per batch
    row, so the same examples in another order give (slightly) another loss.
    """
    index, count = jax.process_index(), jax.process_count()
    ds = grain.MapDataset.source(_latents()).seed(seed).shuffle().repeat()[index::count]
    ds = ds.batch(global_batch // count, drop_remainder=True)
    if as_process_count is not None:
        if count != 1:
            raise ValueError("as_process_count reorders whole global batches, so it needs a single process")
        order = process_global_order(global_batch, as_process_count)
        ds = ds.map(lambda batch: {k: v[order] for k, v in batch.items()})
    return iter(ds.to_iter_dataset())


def tiny_dit_task(config, data):
    from xray_dit.diffusion import schedules
    from xray_dit.models import factory
    from xray_dit.train import dit, loop
    model = factory.dit_from_config(config, latent_size=LATENT_SIZE, latent_channels=LATENT_CHANNELS,
                                    num_classes=0)
    schedule = schedules.make_schedule(config.dit.noise_schedule, config.dit.diffusion_steps)
    return loop.TrainTask(
        name="dit",
        init_params=lambda rng: factory.init_params(model, rng),
        loss_fn=dit.make_loss_fn(model, schedule, scale=1.0), train=config.dit.train, data=data)


def main() -> None:
    workdir, steps = sys.argv[1], int(sys.argv[2])
    # Must precede the backend's start: without it, cross-process CPU computations have no collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from xray_dit import sharding
    from xray_dit.train import loop
    sharding.maybe_initialize_distributed()
    if jax.process_count() < 2:
        raise RuntimeError("the multi-process worker started alone: set JAX_COORDINATOR_ADDRESS and the SLURM_* "
                           "variables as tests/test_sharding_multiprocess.py does")
    config = tiny_config(steps)
    task = tiny_dit_task(config, latent_data(int(config.dit.train.batch_size), seed=int(config.seed)))
    state = loop.train(config, workdir, task)
    print(f"process {jax.process_index()}/{jax.process_count()}: finished at step {int(state['step'])} "
          f"with {jax.device_count()} devices", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    main()
