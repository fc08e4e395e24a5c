"""A tiny regression task for testing the generic train loop (and runnable as a script for kill tests).

    python tests/helpers/toy_task.py WORKDIR STEPS [KILL_AT_STEP]
"""

import os
import sys
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np


class ToyModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
        h = nn.gelu(h)
        return nn.Dense(1, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")))(h)


class ToyBatchNormModel(nn.Module):
    """The toy model with a BatchNorm between its layers: state the loop must carry (`batch_stats`)."""

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Dense(16)(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
        return nn.Dense(1)(nn.gelu(h))


def toy_data(batch_size=16, seed=0, nan_at_batch=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * np.sin(3 * x[:, :1])).astype(np.float32)
    ds = (grain.MapDataset.source(list(range(512))).seed(seed).shuffle().repeat()
          .map(lambda i: {"x": x[i], "y": y[i]}).batch(batch_size, drop_remainder=True))
    if nan_at_batch is not None:  # a corrupt batch: NaN in the input at this (0-based) batch index
        ds = ds.map_with_index(lambda i, b: dict(b, x=b["x"] * np.float32("nan")) if i == nan_at_batch else b)
    return iter(ds.to_iter_dataset())


def toy_config(steps=20, **train):
    from configs import base
    config = base.get_config()
    config.task = "toy"
    config.dit.train.update(steps=steps, batch_size=16, lr=1e-2, warmup_steps=2, log_every=5,
                            checkpoint_every=5, eval_every=0, ema_decay=0.9, grad_clip=1.0)
    config.dit.train.update(train)
    return config


def toy_task(config, data=None):
    from xray_dit.train import loop
    model = ToyModel()

    def loss_fn(params, batch, rng, step):
        noise = 0.01 * jax.random.normal(rng, batch["y"].shape)
        pred = model.apply({"params": params}, batch["x"])
        mse = jnp.mean((pred - batch["y"] - noise) ** 2)
        return mse, {"mse": mse}

    return loop.TrainTask(name="toy", init_params=lambda r: model.init(r, jnp.zeros((1, 8)))["params"],
                          loss_fn=loss_fn, train=config.dit.train, data=data or toy_data())


def toy_batchnorm_task(config, data=None):
    """The toy regression with `ToyBatchNormModel`: loss_fn takes and returns the model state."""
    from xray_dit.train import loop
    model = ToyBatchNormModel()

    def loss_fn(params, batch, rng, step, model_state):
        pred, model_state = model.apply({"params": params, **model_state}, batch["x"], train=True,
                                        mutable=["batch_stats"])
        mse = jnp.mean((pred - batch["y"] - 0.01 * jax.random.normal(rng, batch["y"].shape)) ** 2)
        return mse, ({"mse": mse}, model_state)

    def init(rng):
        return model.init(rng, jnp.zeros((1, 8)))

    return loop.TrainTask(name="toy", init_params=lambda r: init(r)["params"], loss_fn=loss_fn,
                          train=config.dit.train, data=data or toy_data(),
                          init_model_state=lambda r: {"batch_stats": init(r)["batch_stats"]})


def _wait_for(path, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not os.path.isdir(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f}s")
        time.sleep(0.05)


def main():
    workdir, steps = sys.argv[1], int(sys.argv[2])
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
    from xray_dit.train import loop
    config = toy_config(steps=steps)
    task = toy_task(config)
    if kill_at is not None:
        config.dit.train.eval_every = 1
        every = int(config.dit.train.checkpoint_every)

        def die_at(state, step, writer):  # runs after update `step`, before that step's checkpoint
            if step == kill_at:
                # The last scheduled checkpoint is written in the background: the kill waits for its
                # commit (Orbax's rename to the bare step number), so the step a rerun resumes from is known.
                _wait_for(os.path.join(workdir, "checkpoints", str(step // every * every)))
                os.kill(os.getpid(), 9)  # SIGKILL: no handler, no cleanup
            return {}
        task.evaluate = die_at
    state = loop.train(config, workdir, task)
    flat = jax.tree.leaves(jax.device_get(state["params"]))
    np.savez(os.path.join(workdir, "final_params.npz"), *flat)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from absl import flags, logging
    flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.INFO)   # the loop's "resumed from step N" is an INFO line
    main()
