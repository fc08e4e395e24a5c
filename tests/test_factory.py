"""The model factory: parameters of every model kind made, shaped and loaded the same one way; the sizes check
(before anything runs, and in every model made from a config); the attention implementation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P


from configs import base
from tests.helpers import tiny_configs
from xray_dit import checkpoint, main, sharding
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


@pytest.mark.parametrize("backend, dtype, want", [("gpu", "bfloat16", "cudnn"), ("gpu", "float16", "cudnn"),
                                                   ("gpu", "float32", "xla"), ("tpu", "bfloat16", "xla"),
                                                   ("cpu", "bfloat16", "xla")])
def test_auto_attention_is_cudnn_only_where_it_runs(backend, dtype, want, monkeypatch):
    from configs import base
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    config = base.get_config()
    config.compute_dtype = dtype
    assert config.attention_impl == "auto" and factory.attention_impl(config) == want
    config.attention_impl = "xla"
    assert factory.attention_impl(config) == "xla"


@pytest.mark.parametrize("change, message", [
    (dict(image_size=60), "image size 60 is not divisible by the classifier's patch size 8; change data.image_size "
                          "(e.g. 56 or 64) or classifier.patch_size"),
    (dict(image_size=72), "latent size 9 (image 72 / VAE factor 8) is not divisible by the DiT patch size 2 of "
                          "DiT-S/2: the image size must be a multiple of 16; change data.image_size (e.g. 64 or 80)"),
    (dict(image_size=68, patch_size=4), "image size 68 is not divisible by the VAE's downsampling factor 8; change "
                                        "data.image_size (e.g. 64 or 72) or vae.block_out_channels"),
])
def test_inconsistent_sizes_stop_the_study_before_anything_runs(tmp_path, change, message):
    from configs import quickstart
    config = quickstart.get_config()
    config.classifier.model = "tiny"   # a ViT, whose patch size the image must fit too
    config.data.image_size = change["image_size"]
    config.classifier.patch_size = change.get("patch_size", 8)
    with pytest.raises(ValueError) as direct:
        factory.check_sizes(config)
    assert message in str(direct.value)
    workdir = tmp_path / "study"
    with pytest.raises(main.UsageError, match="the config's sizes do not fit together") as usage:
        main.run(config, str(workdir))
    assert message in str(usage.value) and not workdir.exists()
    assert factory.check_sizes(quickstart.get_config()) is None


def test_the_models_from_config_refuse_the_same_sizes():
    config = tiny_configs.tiny_config()
    config.data.image_size = 68
    with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 8"):
        factory.vae_from_config(config)
    config.data.image_size = 72
    with pytest.raises(ValueError, match="latent size 9 .* multiple of 16"):
        factory.dit_from_config(config, latent_size=9, latent_channels=4, num_classes=0)
    config.data.image_size = 60
    with pytest.raises(ValueError, match="classifier's patch size 8"):
        factory.classifier_from_config(config, num_classes=3)
