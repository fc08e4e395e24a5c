"""Several seeds of one task trained together: one compiled program, one loop.

Each seed keeps what its own run (`loop.train`) would have: its state, made by `loop.init_state` from its
seed; its task's data iterator, made with its seed, so its own data order; its checkpoints, with its data
position, in `<workdir>/checkpoints`; its TensorBoard writer and its evaluations in its workdir. A rerun
resumes every seed from the newest step all of them saved, and a seed's folder can be resumed by its own
run, and the other way round. What is shared is the loop and the update program: one compile, one
dispatch per step, one host thread feeding every seed.

The program comes in two forms of the same step (`loop.make_update_fn` per seed: loss, gradients,
global-norm clipping, AdamW, EMA, the non-finite guard, so each seed clips, steps and keeps or drops its
update on its own):

- unrolled (the default on CPU): the seeds' updates side by side in one jitted function. Each seed's
  part is the HLO of its own run's step, on its own arrays, and XLA:CPU compiles it the same way, so every
  seed's parameters, optimiser state, metrics and predictions are its separate run's bit for bit
  (tests/test_train_seeds.py). XLA may run the seeds' independent operations concurrently.
- vectorized (the default on accelerators): the states and batches stacked on a leading seed axis inside
  the program and the update `jax.vmap`ped over it, so K small models fill one accelerator like one larger
  one. Not bit-identical to separate runs on XLA:CPU (jax 0.10): vmap makes a convolution one grouped
  convolution, summed in another order for 1x1 and strided kernels (ResNet); XLA turns optax's global-norm
  clip `g / norm` into `g * (1 / norm)` in the vmapped program only; and YNNPACK's reduce fusion fuses the
  attention softmax's backward row sum there only (EVA-02). Each seed agrees with its run to the last bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from xray_dit import checkpoint as ckpt_lib
from xray_dit import metric_writer, sharding
from xray_dit.train import loop


@dataclasses.dataclass
class SeedRun:
    """One seed's part: its config (`config.seed` is its seed), its workdir, and its task, whose `data`
    iterator was made with its seed."""
    config: ml_collections.ConfigDict
    workdir: epath.Path
    task: loop.TrainTask


def check_same_but_seed(runs: Sequence[SeedRun]) -> None:
    """One program trains them all, so everything but the seed must agree."""
    def without_seed(config):
        return {k: v for k, v in config.to_dict().items() if k != "seed"}
    first = runs[0]
    for run in runs[1:]:
        if without_seed(run.config) != without_seed(first.config) or run.task.train != first.task.train:
            raise ValueError(f"seeds trained together may differ only in config.seed; seed {run.config.seed} "
                             f"and seed {first.config.seed} differ in more")
    seeds = [int(run.config.seed) for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds trained together must differ, got {seeds}")


class _Seed:
    """One seed's side of the loop, as its own run would keep it: checkpoints and data position, writer,
    train scalars, evaluations."""

    def __init__(self, run: SeedRun, mesh):
        train_cfg = run.task.train
        self.run, self.name = run, f"{run.task.name} seed {run.config.seed}"
        self.workdir = epath.Path(run.workdir)
        self.checkpointer = ckpt_lib.Checkpointer(self.workdir / "checkpoints", every_steps=train_cfg.checkpoint_every,
                                                  keep=train_cfg.checkpoint_keep)
        self.data = loop._device_batches(run.task.data, mesh, int(train_cfg.prefetch_batches))
        self.writer = None

    def open_writer(self, first_step: int) -> None:
        self.writer = metric_writer.MetricWriter(self.workdir / "tensorboard")
        if first_step == 0:
            self.writer.write_hparams(metric_writer.flatten_config(self.run.config))

    def report(self, step: int, fetched: list[tuple[int, dict]], extra: dict) -> None:
        loop._stop_if_not_finite(fetched, self.checkpointer, self.name)
        scalars = {k: float(v) for k, v in fetched[-1][1].items() if k != "finite"}
        scalars.update(extra)
        self.writer.write_scalars(step, {f"{self.run.task.name}/train/{k}": v for k, v in scalars.items()})

    def evaluate(self, state: dict, step: int) -> None:
        if self.run.task.evaluate is not None:
            loop._evaluate(self.run.task, state, step, self.writer)

    def save(self, step: int, state: dict, force: bool = False) -> None:
        self.checkpointer.save(step, state, data_iterator=self.data, config=self.run.config, force=force)

    def close(self) -> None:
        self.checkpointer.close()
        self.writer.close()


def _restore(seeds: list[_Seed], states: list[dict]) -> tuple[list[dict], int]:
    """Every seed's state and data position at the newest step all of them saved, or step 0."""
    common = set.intersection(*(set(seed.checkpointer.all_steps()) for seed in seeds))
    if not common:
        if any(seed.checkpointer.latest_step is not None for seed in seeds):
            logging.warning("[%s] no checkpoint step is common to all seeds: every seed starts from step 0",
                            seeds[0].run.task.name)
        return states, 0
    step = max(common)
    states = [seed.checkpointer.restore(state, data_iterator=seed.data, step=step)[0]
              for seed, state in zip(seeds, states)]
    logging.info("[%s] seeds resumed from step %d", seeds[0].run.task.name, step)
    return states, step


def _program(updates: list, state_shardings: list, vectorize: bool):
    """(states, batches) -> (states, metrics), one list entry per seed, as one jitted function. The vmapped
    form maps the first seed's update over all: the tasks differ only in their seed, so their losses are one
    function of (params, batch, rng, step)."""
    def unrolled(states, batches):
        new, metrics = zip(*[update(s, b) for update, s, b in zip(updates, states, batches)])
        return list(new), list(metrics)

    def vectorized(states, batches):
        stack = lambda *xs: jnp.stack(xs)  # noqa: E731
        new, metrics = jax.vmap(updates[0])(jax.tree.map(stack, *states), jax.tree.map(stack, *batches))
        split = lambda tree: [jax.tree.map(lambda x, k=k: x[k], tree) for k in range(len(states))]  # noqa: E731
        return split(new), split(metrics)
    return jax.jit(vectorized if vectorize else unrolled, donate_argnums=(0,), out_shardings=(state_shardings, None))


def train(runs: Sequence[SeedRun], *, mesh=None, vectorize: bool | None = None) -> list[dict]:
    """Trains every run's task in one program (resuming from their checkpoints); returns each final state.
    `vectorize`: vmap over the seeds (default: on accelerators, not on CPU; see the module docstring)."""
    check_same_but_seed(runs)
    config, task = runs[0].config, runs[0].task
    train_cfg, total_steps = task.train, int(task.train.steps)
    vectorize = jax.default_backend() != "cpu" if vectorize is None else vectorize
    mesh = mesh or sharding.make_mesh(config.mesh.shape)
    sharding.local_batch_size(int(train_cfg.batch_size), mesh)
    rules = sharding.axis_rules(config.mesh.rules)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tx = loop.make_optimizer(train_cfg, task.lr_multipliers)
        ema_decay = max(float(train_cfg.ema_decay), 0.0)
        states = [loop.init_state(run.task, tx, jax.random.PRNGKey(int(run.config.seed)), mesh, rules,
                                  use_ema=ema_decay > 0) for run in runs]
        state_shardings = [jax.tree.map(lambda x: x.sharding, state) for state in states]
        seeds = [_Seed(run, mesh) for run in runs]
        states, first_step = _restore(seeds, states)
        if first_step == 0:
            metric_writer.log_parameter_overview(states[0]["params"], f"{task.name} params (each seed)")
        step_fn = _program([loop.make_update_fn(run.task.loss_fn, tx, ema_decay) for run in runs],
                           state_shardings, vectorize)
        for seed in seeds:
            seed.open_writer(first_step)
        states = _loop(seeds, states, step_fn, first_step)
    return states


def _loop(seeds: list[_Seed], states: list[dict], step_fn, first_step: int) -> list[dict]:
    """The loop of `loop.train`, each seed reporting, evaluating and saving as its own run does."""
    train_cfg, name = seeds[0].run.task.train, seeds[0].run.task.name
    total_steps, schedule = int(train_cfg.steps), loop.learning_rate_schedule(train_cfg)
    numbers = [int(seed.run.config.seed) for seed in seeds]
    progress = metric_writer.ProgressReport(
        total_steps=total_steps, batch_size=len(seeds) * int(train_cfg.batch_size),
        every_steps=int(train_cfg.log_every), first_step=first_step, name=f"{name} seeds {numbers}")

    def report(step, pending):
        fetched = jax.device_get(pending)   # [(step, [metrics of each seed])]
        losses = {f"loss[{n}]": float(fetched[-1][1][k]["loss"]) for k, n in enumerate(numbers)}
        speed = progress(step, losses)
        speed["images_per_sec"] /= len(seeds)   # each seed's own images
        for k, seed in enumerate(seeds):
            seed.report(step, [(s, m[k]) for s, m in fetched], {"lr": float(schedule(step - 1)), **speed})

    step, pending = first_step, []
    with loop._Preemption() as preemption, contextlib.ExitStack() as stack:
        for seed in seeds:
            stack.enter_context(contextlib.closing(seed.data))
        while step < total_steps:
            states, metrics = step_fn(states, [loop._fetch_batch(seed.data) for seed in seeds])
            step += 1
            pending.append((step, metrics))
            preempted = preemption.reached(step)
            if progress.due(step) or preempted:
                report(step, pending)
                pending = []
            if train_cfg.eval_every and step % train_cfg.eval_every == 0 and step < total_steps:
                for seed, state in zip(seeds, states):
                    seed.evaluate(state, step)
            for seed, state in zip(seeds, states):
                if seed.checkpointer.should_save(step) or preempted:
                    seed.save(step, state, force=preempted)
            if preempted:
                for seed in seeds:
                    seed.close()
                logging.warning("[%s] seeds preempted: checkpoint of step %d saved; rerun the same command to "
                                "resume", name, step)
                raise SystemExit(0)
        if pending:   # as in `loop.train`: checked, not written
            fetched = jax.device_get(pending)
            for k, seed in enumerate(seeds):
                loop._stop_if_not_finite([(s, m[k]) for s, m in fetched], seed.checkpointer, seed.name)
        for seed, state in zip(seeds, states):
            seed.save(step, state, force=True)
            seed.checkpointer.close()
    for seed, state in zip(seeds, states):
        seed.evaluate(state, step)
        seed.writer.close()
    return states
