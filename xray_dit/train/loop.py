"""The one training loop. Each trainer (classifier, VAE, DiT) describes itself as a `TrainTask`; this
file does everything else: mesh, sharded init, optimiser, EMA, checkpoint/resume, the jitted update
step, NaN stop, progress line, TensorBoard, periodic evaluation and preemption.

The train state is a plain dict pytree: {params, ema_params (if EMA), opt_state, step, rng}, plus
model_state (and ema_model_state with EMA) for a model with mutable non-trained variables such as
BatchNorm's running statistics.
Randomness of step s is `fold_in(rng, s)`, and the data iterator's position is checkpointed with the
state, so a run killed at any step and restarted with the same command continues bit-identically
(on CPU, same device count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from xray_dit import checkpoint as ckpt_lib
from xray_dit import metric_writer, sharding

Params = Any
Batch = Mapping[str, np.ndarray]
# loss_fn(params, batch, rng, step) -> (scalar loss, {name: scalar}); runs inside jit. A task with model
# state: loss_fn(params, batch, rng, step, model_state) -> (scalar loss, ({name: scalar}, new model_state)).
LossFn = Callable[..., tuple[jax.Array, Any]]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf: the run stops, naming the step, the loss terms and the last checkpoint."""


@dataclasses.dataclass
class TrainTask:
    """What a trainer plugs into the loop."""
    name: str                                     # TensorBoard prefix, e.g. "dit"
    init_params: Callable[[jax.Array], Params]    # rng -> params (with logical-axis boxes)
    loss_fn: LossFn
    train: ml_collections.ConfigDict              # config.<task>.train
    data: grain.DatasetIterator                   # iter() of a grain.IterDataset of numpy batches
    # (state, step, the loop's writer) -> scalars, which the loop writes; called every train.eval_every steps
    # and at the end. May write artefacts, and images or texts through the writer.
    evaluate: Callable[[dict, int, metric_writer.MetricWriter], Mapping[str, float]] | None = None
    # Parameters to start from (imported/pretrained), same tree as init_params' output (unboxed).
    initial_params: Params | None = None
    # Per-parameter learning-rate multipliers (layer-wise decay); same tree as params.
    lr_multipliers: Params | None = None
    # The model's mutable non-trained variables, e.g. {"batch_stats": ...} of BatchNorm: rng -> tree. When
    # set, the state keeps them as "model_state", loss_fn takes and returns them (see LossFn), and with EMA
    # "ema_model_state" averages them like the parameters, so EMA parameters are evaluated with statistics
    # that follow them (timm's ModelEmaV2 does the same for BatchNorm buffers).
    init_model_state: Callable[[jax.Array], Any] | None = None
    initial_model_state: Any | None = None        # imported statistics, as initial_params
    # Extra non-trainable arrays the loss needs are closed over by loss_fn, not kept here.


# --------------------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------------------
def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    warmup = max(int(train.warmup_steps), 0)
    if train.schedule == "constant":
        decay = optax.constant_schedule(train.lr)
    elif train.schedule == "cosine":
        decay = optax.cosine_decay_schedule(train.lr, max(int(train.steps) - warmup, 1))
    else:
        raise ValueError(f"train.schedule must be 'cosine' or 'constant', got {train.schedule!r}")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, train.lr, warmup), decay], [warmup])


def _scale_by_tree(multipliers: Params) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m, updates, multipliers), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train: ml_collections.ConfigDict, lr_multipliers: Params | None = None):
    """AdamW (no decay on biases/norm scales/embedding vectors) after global-norm clipping."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    parts = []
    if train.grad_clip and train.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip))
    parts.append(optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                             weight_decay=train.weight_decay, mask=decay_mask))
    if lr_multipliers is not None:
        parts.append(_scale_by_tree(lr_multipliers))
    return optax.chain(*parts)


def ema_update(ema: Params, params: Params, decay: float) -> Params:
    return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema, params)


def make_update_fn(loss_fn: LossFn, tx: optax.GradientTransformation, ema_decay: float = 0.0):
    """(state, batch) -> (state, metrics): one optimiser step, EMA, and the non-finite guard.

    A non-finite loss leaves the state as it was, so the last good step can be saved and inspected.
    """
    def update(state, batch):
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        has_model_state = "model_state" in state
        model_state_args = (state["model_state"],) if has_model_state else ()
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, rng, step,
                                                                       *model_state_args)
        metrics, model_state = aux if has_model_state else (aux, None)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = dict(state, params=keep(params, state["params"]),
                         opt_state=keep(opt_state, state["opt_state"]), step=step + 1)
        if has_model_state:
            new_state["model_state"] = keep(model_state, state["model_state"])
        if ema_decay > 0:
            new_state["ema_params"] = keep(ema_update(state["ema_params"], params, ema_decay), state["ema_params"])
            if has_model_state:
                new_state["ema_model_state"] = keep(ema_update(state["ema_model_state"], model_state, ema_decay),
                                                    state["ema_model_state"])
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), finite=finite)
        return new_state, metrics
    return update


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
class _Preemption:
    """SIGTERM (spot/preemptible VMs) → finish the current step, save, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() > 1:  # jax.distributed's preemption notifier owns SIGTERM then
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: finishing this step, saving a checkpoint, then exiting")
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`. Several processes must agree on the step, or the
        collective checkpoint would hang: JAX's preemption sync point makes them agree."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, exc_type, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self.requested and exc_type is None:
            # Asked after the last step's check (steps are dispatched ahead of their results): the run ended
            # and saved, so stop here rather than let the caller start its next run with the request lost.
            logging.warning("SIGTERM received at the end of the run: its final checkpoint is saved; exiting")
            raise SystemExit(0)


class _GlobalBatches(grain.DatasetIterator):
    """The task's host batches as global (sharded) device arrays. A Grain DatasetIterator over the task's
    iterator, so it checkpoints like it (Grain's Orbax handler saves its state as JSON) and Grain's thread
    prefetch can run it ahead of the accelerator."""

    def __init__(self, data: grain.DatasetIterator, mesh):
        if not isinstance(data, grain.DatasetIterator):
            raise TypeError(f"TrainTask.data must be a checkpointable grain.DatasetIterator (iter() of a "
                            f"grain.IterDataset), got {type(data).__name__}")
        super().__init__(data)
        self._mesh = mesh

    def __next__(self) -> dict:
        return sharding.host_to_global(dict(next(self._parent)), self._mesh)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state) -> None:
        self._parent.set_state(state)


def _device_batches(data: grain.DatasetIterator, mesh, prefetch: int) -> grain.DatasetIterator:
    """Global batches, `prefetch` of them decoded and on the device ahead of the step that needs them
    (0: fetched when the step asks, in this thread).

    Grain's ThreadPrefetchDatasetIterator keeps with every buffered batch the iterator state right after
    it, so a checkpoint records the position of the last batch *consumed*, not of the last one
    prefetched, and resuming stays exact. It is not used for 0: Grain's checkpoint handler starts its
    thread after a restore whatever the buffer size, and with a size of 0 that thread and `next` would
    both draw from the iterator.
    """
    batches = _GlobalBatches(data, mesh)
    if prefetch <= 0:
        return batches
    return grain.experimental.ThreadPrefetchDatasetIterator(batches, int(prefetch))


def _fetch_batch(data: Iterator[dict]) -> dict:
    try:
        return next(data)
    except StopIteration as e:
        raise RuntimeError("the training data iterator ran out; make it repeat (num_epochs=None)") from e


def init_state(task: TrainTask, tx: optax.GradientTransformation, root_rng: jax.Array, mesh, rules, *,
               use_ema: bool) -> dict:
    """The step-0 state {params, opt_state, step, rng[, ema_params][, model_state...]}, each array created
    where its logical axes place it on `mesh` (imported `initial_params` are placed the same way)."""
    init_rng, state_rng = jax.random.split(root_rng)
    abstract = jax.eval_shape(task.init_params, init_rng)
    param_shardings = sharding.logical_to_shardings(abstract, mesh, rules)
    if task.initial_params is not None:
        params = jax.device_put(task.initial_params, param_shardings)
    else:
        params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)), out_shardings=param_shardings)(init_rng)
    # The optimiser's parameter-shaped moments are split like the parameters: zeros made inside jit
    # carry no sharding of their own, so without out_shardings every device would hold them whole.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
                                          transform_non_params=lambda _: replicated)
    state = {"params": params, "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params),
             "step": jnp.asarray(0, jnp.int32), "rng": state_rng}
    if use_ema:
        state["ema_params"] = jax.tree.map(jnp.copy, params)
    if task.init_model_state is not None:
        state["model_state"] = _initial_model_state(task, init_rng, mesh, rules)
        if use_ema:
            state["ema_model_state"] = jax.tree.map(jnp.copy, state["model_state"])
    return state


def train(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, task: TrainTask,
          *, mesh=None) -> dict:
    """Trains `task` in `workdir` (resuming from its checkpoints) and returns the final state."""
    workdir = epath.Path(workdir)
    train_cfg = task.train
    total_steps = int(train_cfg.steps)

    # ---- Mesh -------------------------------------------------------------------------------------
    mesh = mesh or sharding.make_mesh(config.mesh.shape)
    sharding.local_batch_size(int(train_cfg.batch_size), mesh)  # validates divisibility early
    rules = sharding.axis_rules(config.mesh.rules)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # ---- Model and state, initialised directly sharded --------------------------------------
        tx = make_optimizer(train_cfg, task.lr_multipliers)
        use_ema = float(train_cfg.ema_decay) > 0
        state = init_state(task, tx, jax.random.PRNGKey(int(config.seed)), mesh, rules, use_ema=use_ema)
        state_shardings = jax.tree.map(lambda x: x.sharding, state)

        # ---- Checkpoint: resume if this workdir has one -----------------------------------------
        checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", every_steps=train_cfg.checkpoint_every,
                                             keep=train_cfg.checkpoint_keep)
        data = _device_batches(task.data, mesh, int(train_cfg.prefetch_batches))
        restored = checkpointer.restore(state, data_iterator=data)
        if restored is not None:
            state, first_step = restored
            logging.info("[%s] resumed from step %d in %s", task.name, first_step, checkpointer.directory)
        else:
            first_step = 0
            metric_writer.log_parameter_overview(state["params"], f"{task.name} params")

        # ---- The update step -------------------------------------------------------------------
        update = make_update_fn(task.loss_fn, tx, float(train_cfg.ema_decay) if use_ema else 0.0)
        update_step = jax.jit(update, donate_argnums=(0,), out_shardings=(state_shardings, None))

        # ---- Loop --------------------------------------------------------------------------------
        writer = metric_writer.MetricWriter(workdir / "tensorboard")
        if first_step == 0:
            writer.write_hparams(metric_writer.flatten_config(config))
        progress = metric_writer.ProgressReport(total_steps=total_steps, batch_size=int(train_cfg.batch_size),
                                                every_steps=int(train_cfg.log_every), first_step=first_step,
                                                name=task.name)
        pending: list[tuple[int, dict]] = []   # metrics stay on device until the next report
        schedule = learning_rate_schedule(train_cfg)
        step = first_step
        with _Preemption() as preemption, contextlib.closing(data):
            while step < total_steps:
                batch = _fetch_batch(data)
                state, metrics = update_step(state, batch)
                step += 1
                pending.append((step, metrics))
                preempted = preemption.reached(step)
                report = progress.due(step) or preempted
                if report:
                    fetched = jax.device_get(pending)
                    pending = []
                    _stop_if_not_finite(fetched, checkpointer, task.name)
                    last = fetched[-1][1]
                    scalars = {k: float(v) for k, v in last.items() if k != "finite"}
                    scalars["lr"] = float(schedule(step - 1))
                    scalars.update(progress(step, {"loss": scalars["loss"]}))
                    writer.write_scalars(step, {f"{task.name}/train/{k}": v for k, v in scalars.items()})
                if task.evaluate is not None and train_cfg.eval_every and step % train_cfg.eval_every == 0 \
                        and step < total_steps:
                    _evaluate(task, state, step, writer)
                if checkpointer.should_save(step) or preempted:
                    checkpointer.save(step, state, data_iterator=data, config=config, force=preempted)
                if preempted:
                    checkpointer.close()
                    writer.close()
                    logging.warning("[%s] preempted: checkpoint of step %d saved; rerun the same command to resume",
                                    task.name, step)
                    raise SystemExit(0)
            if pending:
                _stop_if_not_finite(jax.device_get(pending), checkpointer, task.name)
            checkpointer.save(step, state, data_iterator=data, config=config, force=True)
            checkpointer.close()
        if task.evaluate is not None:
            _evaluate(task, state, step, writer)
        writer.close()
    return state


def _initial_model_state(task: TrainTask, rng: jax.Array, mesh, rules) -> Any:
    shardings = sharding.logical_to_shardings(jax.eval_shape(task.init_model_state, rng), mesh, rules)
    if task.initial_model_state is not None:
        return jax.device_put(task.initial_model_state, shardings)
    return jax.jit(lambda r: nn.meta.unbox(task.init_model_state(r)), out_shardings=shardings)(rng)


def _evaluate(task: TrainTask, state: dict, step: int, writer: metric_writer.MetricWriter) -> None:
    start = time.perf_counter()
    results = task.evaluate(state, step, writer) or {}
    if results:
        writer.write_scalars(step, {f"{task.name}/eval/{k}": v for k, v in results.items()})
        logging.info("[%s] eval at step %d (%.1fs): %s", task.name, step, time.perf_counter() - start,
                     " ".join(f"{k}={float(v):.4f}" for k, v in results.items()))


def _stop_if_not_finite(fetched: list[tuple[int, dict]], checkpointer: ckpt_lib.Checkpointer, name: str) -> None:
    for step, metrics in fetched:
        if not bool(metrics["finite"]):
            terms = {k: float(np.asarray(v)) for k, v in metrics.items() if k != "finite"}
            checkpointer.wait()
            last = checkpointer.latest_step
            where = (f"the last good checkpoint is step {last} in {checkpointer.directory}" if last is not None
                     else "no checkpoint was written yet")
            raise NonFiniteLossError(
                f"[{name}] non-finite loss at step {step} (loss terms: {terms}); the update was not applied "
                f"and {where}. Lower the learning rate, enable grad_clip, or check the input data for NaN.")
