"""The one place for the device mesh, the logical-axis rules and moving data onto the mesh.

Models annotate every weight with *logical* axis names (`nn.with_logical_partitioning`) and
activations with `nn.with_logical_constraint`; this module maps those names onto the physical mesh
axes `data`, `fsdp` and `tensor` by the rules table `config.mesh.rules` (configs/base.py). Changing the
parallelism of a run is a config change, never a model change.

Logical names used by the models:

  weights      embed (model width) · mlp (MLP hidden) · heads (q/k/v features) · conv_in / conv_out
               (convolution channels) · classes · norm · none of ours are sharded on `data`
  activations  act_batch · act_len · act_embed · act_heads · act_mlp · act_height · act_width
               · act_channels
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Batch dimension of every global array: split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axis | tuple of mesh axes | None = replicated) pairs, as Flax's logical rules take them.
Rules = tuple[tuple[str, Any], ...]


def axis_rules(rules: Sequence[Sequence[Any]]) -> Rules:
    """`config.mesh.rules` as Flax takes them (tuples, also after a JSON round trip), checked against the mesh."""
    checked = []
    for entry in rules:
        if len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"config.mesh.rules entries are (logical name, mesh axes) pairs, got {entry!r}")
        name, axes = entry
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        unknown = [a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"config.mesh.rules maps {name!r} to {unknown}, which are not mesh axes; "
                             f"use {MESH_AXES} or None")
        checked.append((name, axes))
    return tuple(checked)


def maybe_initialize_distributed() -> None:
    """Starts JAX's multi-process runtime when this process is one of several.

    Cloud TPU, SLURM and the explicit coordinator variables are auto-detected by
    `jax.distributed.initialize()`; on a single CPU/GPU machine nothing is done.
    """
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
    if explicit or slurm or tpu_pod:
        if jax.distributed.is_initialized():
            return
        jax.distributed.initialize()
        logging.info("jax.distributed initialised: process %d of %d, %d global devices",
                     jax.process_index(), jax.process_count(), jax.device_count())


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces the (at most one) -1 entry with whatever devices remain; checks the product."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"config.mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh.shape may contain -1 at most once, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config.mesh.shape entries must be positive or -1, got {shape}")
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"config.mesh.shape {shape}: {num_devices} devices are not divisible "
                             f"by the fixed axes' product {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"config.mesh.shape {shape} uses {math.prod(shape)} devices but "
                         f"{num_devices} are available; use -1 for one axis to fill the rest")
    return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh over all devices of all processes.

    Axes are `Auto` so that Flax's logical constraints (sharding hints) apply; `jax.make_mesh`
    defaults to Explicit axes, which would turn every hint into a hard type-level sharding.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def _fit_spec_to_shape(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (e.g. a 1-channel conv on 8 devices)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if dim % size == 0 else None)
    return P(*fitted)


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a (possibly abstract) pytree whose leaves carry logical annotations.

    `abstract_tree` is typically `jax.eval_shape(init_fn, ...)`, still holding the
    `nn.LogicallyPartitioned` boxes. Unannotated leaves are replicated. Returns a tree of the
    *unboxed* structure, ready for `jax.jit(..., out_shardings=...)`.
    """
    specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    values = unbox(abstract_tree)
    return jax.tree.map(
        lambda x, spec: NamedSharding(mesh, _fit_spec_to_shape(spec if spec is not None else P(),
                                                               np.shape(x), mesh)),
        values, mesh_specs, is_leaf=lambda s: isinstance(s, P) or s is None)


def unbox(tree: Any) -> Any:
    """Strips Flax partitioning boxes without applying sharding constraints (safe outside jit)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of a global batch: leading dim over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_params(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Places a concrete, annotated params tree on the mesh; returns the unboxed, sharded tree."""
    shardings = logical_to_shardings(tree, mesh, rules)
    return jax.device_put(unbox(tree), shardings)


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """Per-process batch; the global batch must split evenly over processes and batch devices."""
    n_batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % n_batch_devices:
        raise ValueError(f"global batch size {global_batch} is not divisible by the {n_batch_devices} "
                         "devices of the mesh's (data, fsdp) axes; change config.batch_size or config.mesh")
    return global_batch // jax.process_count()


def host_to_global(batch: Any, mesh: Mesh) -> Any:
    """Turns this process's numpy batch (a pytree) into global arrays sharded over the batch axes."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), np.asarray(x)),
        batch)


def global_to_host(tree: Any) -> Any:
    """Fetches (possibly multi-process) global arrays as full numpy arrays on every process."""
    from jax.experimental import multihost_utils
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return multihost_utils.process_allgather(tree, tiled=True)
