"""Where a run's prepared datasets live, and preparing the configured one on first use."""

from __future__ import annotations

import jax
import ml_collections
from etils import epath

from xray_dit.data import builders


def data_dir(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
    """Where prepared datasets live: `config.data.data_dir`, else `<workdir>/tfds`."""
    return epath.Path(config.data.data_dir) if config.data.data_dir else epath.Path(workdir) / "tfds"


def ensure_prepared(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
    """Prepares the configured dataset once (no-op when done); returns the data dir.

    Only process 0 writes; the others wait for it at a barrier so that nobody reads half a dataset.
    """
    directory = data_dir(config, workdir)
    if jax.process_index() == 0:
        try:  # prepared already (also custom configs, e.g. a test's own phantom spec): nothing to do
            builders.load_prepared(config.data.name, config.data.builder_config or None, data_dir=directory)
        except builders.NotPreparedError:
            builders.prepare(config.data.name, config.data.builder_config or None, data_dir=directory,
                             manual_dir=config.data.manual_dir or None)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("dataset prepared")
    return directory
