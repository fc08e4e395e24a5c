"""Entry point: `python -m xray_dit.main --config=configs/<file>.py --workdir=<dir> [--config.a.b=value]`.

Parses the config (locked: an unknown key is an error that names it), starts JAX's multi-process runtime
when there are several processes, checks that the workdir can be written, and runs `config.task`.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import sys

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from xray_dit import sharding

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config(arg); `file.py:arg` passes arg.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (local path or gs://...); rerun to resume.")

# task name → "module:function(config, workdir)". Imported lazily so that one task's heavy imports
# (or a task not yet written) never stand in the way of another.
TASKS = {
    "check": (None, "run_check", None),
    "train_classifier": ("xray_dit.train.classifier", "run", "issue #5"),
    "train_vae": ("xray_dit.train.vae", "run", "issue #5"),
    "train_dit": ("xray_dit.train.dit", "run", "issue #5"),
    "sample": ("xray_dit.train.sample", "run", "issue #5"),
    "study": ("xray_dit.study.phases", "run", "issue #6"),
}


class UsageError(Exception):
    """A mistake on the command line or in the config: printed as one line, exit code 2."""


def _config_keys(config, prefix=""):
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if hasattr(value, "items"):
            keys.extend(_config_keys(value, prefix + key + "."))
    return keys


def _check_argv(argv: list[str]) -> None:
    """Finds command-line mistakes before absl/ml_collections turn them into tracebacks."""
    config_arg = None
    for arg in argv[1:]:
        if arg.startswith("--config="):
            config_arg = arg.split("=", 1)[1]
    if config_arg is None:
        raise UsageError("missing --config. Run e.g. `python -m xray_dit.main --config=configs/quickstart.py "
                         "--workdir=workdir/quickstart`; configs/ lists the available configs.")
    path = epath.Path(config_arg.split(":", 1)[0])
    if not path.exists():
        available = sorted(p.name for p in epath.Path("configs").glob("*.py") if not p.name.startswith("_"))
        raise UsageError(f"config file {path} does not exist (looked relative to {os.getcwd()}). "
                         f"Available in configs/: {', '.join(available) or 'none found'}")
    module = config_flags.config_flags._LoadConfigModule("config", str(path))
    if not callable(getattr(module, "get_config", None)):
        raise UsageError(f"config file {path} defines no get_config(arg=None) function; see configs/quickstart.py")
    overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    if not overrides:
        return
    config = module.get_config(*([config_arg.split(":", 1)[1]] if ":" in config_arg else []))
    known = set(_config_keys(config))
    for override in overrides:
        key = override[len("config."):]
        if key not in known:
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            while parent and parent not in known:  # deepest part of the key that does exist
                parent = parent.rsplit(".", 1)[0] if "." in parent else ""
            siblings = [k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"unknown config key '{key}' in --{override}=...; the config has no such key."
                             f"{hint} Keys at that level: {', '.join(sorted(siblings))}")


def _prepare_workdir(workdir: str) -> epath.Path:
    path = epath.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to workdir {path}: {e}. Choose a folder you can write to "
                         "(--workdir=...).") from e
    return path


def run_check(config, workdir: epath.Path) -> dict:
    """Task `check`: devices, mesh, a sharded computation, a TensorBoard file. Proves the install works."""
    import jax.numpy as jnp
    from xray_dit import metric_writer

    mesh = sharding.make_mesh(config.mesh.shape)
    x = sharding.host_to_global(jnp.arange(mesh.size * 2, dtype=jnp.float32)[: 2 * mesh.size // jax.process_count()],
                                mesh)
    total = float(jax.jit(jnp.sum)(x))
    writer = metric_writer.MetricWriter(workdir / "tensorboard")
    writer.write_scalars(0, {"check/sum": total})
    writer.write_hparams(metric_writer.flatten_config(config))
    writer.close()
    result = {"devices": jax.device_count(), "processes": jax.process_count(),
              "mesh": dict(mesh.shape), "sum": total}
    logging.info("check: %s", result)
    return result


def _use_compilation_cache(directory: str) -> None:
    if not directory:
        return
    path = os.path.expanduser(directory)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the compilation cache folder {path} ({e}); point "
                         "--config.compilation_cache_dir elsewhere, or set it to '' to turn the cache off") from e
    jax.config.update("jax_compilation_cache_dir", path)


def run(config, workdir: str):
    """Runs `config.task` in `workdir` (importable, so tests call it without a subprocess)."""
    if config.task not in TASKS:
        raise UsageError(f"unknown task {config.task!r}; choose one of: {', '.join(TASKS)}")
    _use_compilation_cache(config.compilation_cache_dir)
    if config.task == "study":
        from xray_dit.train import model_factory
        try:
            model_factory.check_sizes(config)
        except ValueError as e:
            raise UsageError(f"the config's sizes do not fit together: {e}") from e
    if config.task in ("train_classifier", "study"):
        from xray_dit.train import classifier
        try:
            classifier.check_init_from(config)
        except ValueError as e:
            raise UsageError(str(e)) from e
    path = _prepare_workdir(workdir)
    if jax.process_index() == 0:
        (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=repr))
    module_name, function_name, issue = TASKS[config.task]
    if module_name is None:
        return globals()[function_name](config, path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(module_name.rsplit(".", 1)[0]) and issue:
            logging.warning("task %r is not implemented yet (%s adds it).", config.task, issue)
            print(f"task {config.task!r} is not implemented yet ({issue} adds it); nothing was run.")
            return None
        raise
    return getattr(module, function_name)(config, path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _WORKDIR.value is None:
        raise UsageError("missing --workdir: the folder where checkpoints, logs and results go "
                         "(rerunning with the same --workdir resumes).")
    sharding.maybe_initialize_distributed()
    logging.info("JAX %s: process %d/%d, %d devices (%s)", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.devices()[0].platform)
    run(_CONFIG.value, _WORKDIR.value)


def cli(argv=None) -> None:
    argv = list(sys.argv if argv is None else argv)
    try:
        _check_argv(argv)
        app.run(main, argv=argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
