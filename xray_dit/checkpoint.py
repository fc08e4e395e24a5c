"""Orbax checkpoints of a run: train state + data-iterator position + config, saved together.

A rerun of the same command restores the newest complete checkpoint, so preemption costs at most the
steps since the last save. When to save and which checkpoints to keep are Orbax's own policies (a fixed
interval or JAX's preemption notice; the newest K). Orbax writes each step into a temporary folder and
renames it when complete, so a kill during a write leaves no checkpoint that looks finished; a latest
checkpoint that is nevertheless unreadable (truncated files, a half-copied bucket) is skipped, with a
warning, in favour of the one before it.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class IncompatibleCheckpointError(RuntimeError):
    """The workdir holds checkpoints of a different model/config than the one being run."""


def _absolute(directory: str | epath.PathLike) -> epath.Path:
    """Orbax refuses relative paths; a local relative one (e.g. `--workdir=workdir/quickstart`) is made
    absolute against the current folder. Bucket URLs (gs://...) are absolute already."""
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _abstract(tree: Any) -> Any:
    """Restore target: shapes, dtypes and the *current* shardings (so a new mesh shape works)."""
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Saves every `every_steps` (0: never by itself), on a preemption notice and when forced; keeps the newest
    `keep`; restores the newest readable one."""

    def __init__(self, directory: str | epath.PathLike, *, every_steps: int, keep: int = 3,
                 async_save: bool = True):
        self.directory = _absolute(directory)
        policies = ocp.checkpoint_managers
        when = [policies.PreemptionCheckpointingPolicy()]
        if int(every_steps) > 0:
            when.append(policies.FixedIntervalPolicy(int(every_steps)))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(when), preservation_policy=policies.LatestN(keep),
            create=True, enable_async_checkpointing=async_save,
            # Remove leftovers of writes that were killed half-way, so they are never mistaken for data.
            cleanup_tmp_directories=True)
        on_disk = _step_folders(self.directory)   # listed before the manager removes unfinished ones
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.interrupted_steps = sorted(on_disk - set(self.manager.all_steps()))
        if self.interrupted_steps:
            latest = self.manager.latest_step()
            logging.warning(
                "checkpoint step(s) %s in %s were still being written when an earlier run stopped; they are "
                "incomplete and are removed. %s", self.interrupted_steps, self.directory,
                f"Resuming from the last complete checkpoint, step {latest}." if latest is not None
                else "No complete checkpoint exists, so the run starts from step 0.")

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, *, data_iterator: Any = None,
             config: ml_collections.ConfigDict | None = None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = _iterator_save_args(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(_jsonable_config(config))
        if step in self.manager.all_steps():
            return False
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, state_like: Any, *, data_iterator: Any = None, step: int | None = None) -> tuple[Any, int] | None:
        """Restores onto the shardings of `state_like` (concrete or abstract); None if nothing to restore.

        Tries the newest step first and falls back to older ones when a checkpoint cannot be read.
        A checkpoint whose tree or shapes differ from `state_like` raises `IncompatibleCheckpointError`.
        """
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        target = _abstract(state_like)
        errors = []
        for candidate in steps:
            items = {"state": ocp.args.StandardRestore(target)}
            if data_iterator is not None and self._has_item(candidate, "data"):
                items["data"] = _iterator_restore_args(data_iterator)
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
            except (ValueError, KeyError, TypeError) as e:
                if _looks_incompatible(e):
                    raise IncompatibleCheckpointError(
                        f"the checkpoint at {self.directory / str(candidate)} does not match this model/config "
                        f"({type(e).__name__}: {str(e)[:400]}). Use a new --workdir, or delete {self.directory} "
                        "if you really mean to start over.") from e
                errors.append((candidate, e))
                logging.warning("checkpoint step %d in %s is unreadable (%s); trying an older one",
                                candidate, self.directory, e)
                continue
            except Exception as e:  # noqa: BLE001 - any read failure of one step means: fall back
                errors.append((candidate, e))
                logging.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                                candidate, self.directory, type(e).__name__, e)
                continue
            if errors:
                logging.warning("resumed from step %d; newer unreadable checkpoints: %s", candidate,
                                [s for s, _ in errors])
            return restored["state"], candidate
        if errors:
            raise RuntimeError(f"no readable checkpoint in {self.directory}; tried steps "
                               f"{[s for s, _ in errors]}; last error: {errors[-1][1]}")
        return None

    def _has_item(self, step: int, name: str) -> bool:
        return (self.directory / str(step) / name).exists()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _step_folders(directory: epath.Path) -> set[int]:
    """Steps with a folder on disk, finished or not: Orbax writes `<step>.orbax-checkpoint-tmp...` and renames
    it (local disks), or writes `<step>/` and adds a commit file last (GCS)."""
    if not directory.is_dir():
        return set()
    return {int(m.group(1)) for p in directory.iterdir() if (m := re.match(r"(\d+)(\.|$)", p.name)) and p.is_dir()}


def _looks_incompatible(e: Exception) -> bool:
    text = str(e).lower()
    return any(word in text for word in ("shape", "structure", "tree", "missing", "unexpected key",
                                         "does not match", "mismatch"))


def _iterator_save_args(it):
    import grain
    if hasattr(it, "get_state"):
        return grain.checkpoint.CheckpointSave(it)
    raise TypeError(f"cannot checkpoint a data iterator of type {type(it).__name__}")


def _iterator_restore_args(it):
    import grain
    return grain.checkpoint.CheckpointRestore(it)


def _jsonable_config(config: ml_collections.ConfigDict) -> dict:
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.generic,)):
            return v.item()
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return repr(v)
    return clean(config.to_dict())


# --------------------------------------------------------------------------------------------------
# Exports: a model's parameters + what is needed to rebuild it, for other tasks to load.
# Written by every trainer at the end of a run and by tools/import_weights; read by `init_from`,
# `dit.vae_dir`, `sample.dit_dir`. Layout: <dir>/params (Orbax) and <dir>/model.json.
# --------------------------------------------------------------------------------------------------
EXPORT_INFO = "model.json"


def export_dir(workdir: str | epath.PathLike) -> epath.Path:
    """Where a training run in `workdir` writes its export."""
    return epath.Path(workdir) / "export"


def save_export(directory: str | epath.PathLike, params: Any, info: dict) -> epath.Path:
    """Writes params (Orbax, atomically) and `info` (kind, model fields, scaling factor, provenance)."""
    import json
    directory = _absolute(directory)
    target = directory / "params"
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / EXPORT_INFO).exists():
            (directory / EXPORT_INFO).unlink()   # written last: an export without it is incomplete
        if target.exists():
            target.rmtree()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("export folder ready")
    with ocp.StandardCheckpointer() as checkpointer:   # collective: every process calls it
        checkpointer.save(target, params)
    if jax.process_index() == 0:
        (directory / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=repr))
    return directory


def load_export_info(directory: str | epath.PathLike) -> dict:
    import json
    directory = _absolute(directory)
    path = directory / EXPORT_INFO
    if not path.exists() or not (directory / "params").exists():
        raise FileNotFoundError(
            f"{directory} is not a model export (no {EXPORT_INFO} and params/). Point the config at the "
            "`export` folder of a finished training run, or create one with "
            "`python -m xray_dit.tools.import_weights`.")
    return json.loads(path.read_text())


def load_export(directory: str | epath.PathLike, target: Any = None, *, kind: str | None = None) -> tuple[Any, dict]:
    """Returns (params, info). `target` (abstract or concrete tree) gives shapes and shardings."""
    directory = _absolute(directory)
    info = load_export_info(directory)
    if kind is not None and info.get("kind") != kind:
        raise IncompatibleCheckpointError(f"{directory} holds a {info.get('kind')!r} model, not a {kind!r} model")
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            params = checkpointer.restore(directory / "params", _abstract(target) if target is not None else None)
        except (ValueError, KeyError, TypeError) as e:
            raise IncompatibleCheckpointError(
                f"the parameters in {directory} do not fit the configured model ({str(e)[:300]}); "
                f"its model.json says: {info.get('model')}") from e
    return params, info
