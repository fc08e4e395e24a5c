"""The mesh and sharding: mesh shapes, logical axis rules, parameters and host batches placed on the mesh.

Several processes joining one mesh are tested in test_sharding_multiprocess.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xray_dit import sharding


@pytest.mark.parametrize("n, shape, expect", [
    (1, (-1, 1, 1), (1, 1, 1)), (2, (-1, 1, 1), (2, 1, 1)), (4, (1, -1, 2), (1, 2, 2)),
    (8, (2, 2, 2), (2, 2, 2)), (8, (1, 8, 1), (1, 8, 1)), (8, (-1, 1, 4), (2, 1, 4))])
def test_mesh_shapes(n, shape, expect):
    mesh = sharding.make_mesh(shape, devices=jax.devices()[:n])
    assert tuple(mesh.shape.values()) == expect and mesh.axis_names == sharding.MESH_AXES
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape", [(3, 1, 1), (-1, -1, 1), (2, 0, 1), (1, 1)])
def test_bad_mesh_shapes_are_refused(shape):
    with pytest.raises(ValueError, match="mesh.shape"):
        sharding.make_mesh(shape)


def _annotated_tree():
    import flax.linen as nn
    return {"dense": nn.LogicallyPartitioned(jnp.ones((16, 32)), ("embed", "mlp")),
            "conv": nn.LogicallyPartitioned(jnp.ones((3, 3, 1, 8)), (None, None, "conv_in", "conv_out")),
            "bias": jnp.zeros((32,))}


def _config_rules(**changes):
    from configs import base
    rules = dict(base.get_config().mesh.rules)
    rules.update(changes)
    return sharding.axis_rules(tuple(rules.items()))


def test_shard_params_follows_the_configs_logical_rules():
    mesh = sharding.make_mesh((2, 2, 2))
    params = sharding.shard_params(_annotated_tree(), mesh, _config_rules())
    assert params["dense"].sharding.spec == P("fsdp", "tensor")
    # 1 input channel cannot be split over fsdp=2: that dimension is replicated instead of failing.
    assert params["conv"].sharding.spec == P(None, None, None, "tensor")
    assert params["bias"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(params["dense"]), np.ones((16, 32)))
    # Another table is another placement, with no model change: here the MLP hidden goes over fsdp and tensor.
    params = sharding.shard_params(_annotated_tree(), mesh, _config_rules(embed=None, mlp=["fsdp", "tensor"]))
    assert params["dense"].sharding.spec == P(None, ("fsdp", "tensor"))


@pytest.mark.parametrize("rules, message", [
    ((("embed", "model"),), r"maps 'embed' to \['model'\], which are not mesh axes"),
    ((("embed",),), "pairs"),
])
def test_bad_axis_rules_are_refused(rules, message):
    with pytest.raises(ValueError, match=message):
        sharding.axis_rules(rules)


def test_host_batch_becomes_global_sharded_array():
    mesh = sharding.make_mesh((2, 4, 1))
    local = {"image": np.arange(16 * 4, dtype=np.float32).reshape(16, 2, 2, 1), "label": np.arange(16)}
    batch = sharding.host_to_global(local, mesh)
    assert batch["image"].shape == (16, 2, 2, 1)
    assert batch["image"].sharding.spec == P(("data", "fsdp"), None, None, None)
    assert len(batch["image"].addressable_shards) == 8
    np.testing.assert_array_equal(sharding.global_to_host(batch)["label"], np.arange(16))
    with pytest.raises(ValueError, match="not divisible"):
        sharding.local_batch_size(12, mesh)
