"""The model factory: parameters of every model kind made, shaped and loaded the same one way."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P


from configs import base
from xray_dit import checkpoint, sharding
from xray_dit.models import dit, eva02, factory, vae

TINY_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=2)
MODELS = {
    "dit": dit.DiT(**TINY_DIT),
    "vae": vae.AutoencoderKL(block_out_channels=(16,), layers_per_block=1, norm_num_groups=8),
    "eva02": eva02.make_eva02("tiny", img_size=16, num_classes=2, patch_size=8),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_abstract_params_are_the_boxed_params_collection_whatever_the_kind(kind):
    model = MODELS[kind]
    assert factory.kind_of(model) == kind
    abstract = factory.abstract_params(model)
    assert "params" not in abstract   # the collection itself, as TrainTask.init_params returns it
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    with pytest.raises(TypeError, match="not a model kind the factory knows"):
        factory.kind_of(nn.Dense(3))


def test_load_export_rebuilds_the_model_and_places_the_params_on_the_mesh(tmp_path):
    model = MODELS["dit"]
    params = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), sharding.unbox(factory.abstract_params(model)))
    checkpoint.save_export(tmp_path / "export", params, {"kind": "dit", "model": factory.model_fields(model)})

    loaded_model, loaded, info = factory.load_export(tmp_path / "export", sharding.make_mesh((1, 8, 1)),
                                                     rules=base.get_config().mesh.rules, kind="dit",
                                                     dtype=jnp.bfloat16)
    assert info["kind"] == "dit" and loaded_model.dtype == jnp.bfloat16
    assert factory.model_fields(loaded_model) == dict(factory.model_fields(model), dtype="bfloat16")
    qkv = loaded["blocks_0"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == P("fsdp", None, "tensor", None)   # by the logical axes, not where it was saved
    np.testing.assert_array_equal(np.asarray(qkv), 0.5)

    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="not a 'vae' model"):
        factory.load_export(tmp_path / "export", kind="vae")
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="do not fit"):
        factory.load_export(tmp_path / "export", model=dit.DiT(**dict(TINY_DIT, hidden_size=64)))
