"""AutoencoderKL: golden parity with diffusers, weight import/export, RGB→gray adaptation, sharding,
discriminator and losses."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from configs import base
from xray_dit import sharding
from xray_dit.models import factory, vae
from xray_dit.models.convert import vae_diffusers
from xray_dit.models.weights import WeightImportError, load_state_dict
from tests.helpers.golden import assert_close, nhwc

RULES = sharding.axis_rules(base.get_config().mesh.rules)

TINY_GOLDEN_FIELDS = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                          latent_channels=4, norm_num_groups=32)


def imported(state_dict, model, **kwargs):
    """`{'params': ...}` from a diffusers state dict, as `model.apply` takes them."""
    return {"params": vae_diffusers.from_state_dict(state_dict, model, **kwargs)}


def abstract_variables(model):
    return {"params": factory.abstract_params(model)}


@pytest.fixture(scope="module")
def golden(golden_dir):
    with np.load(golden_dir / "vae_tiny.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def golden_state_dict(golden_dir, tmp_path_factory):
    """The golden weights, read back from a .safetensors file as a real checkpoint would be."""
    path = tmp_path_factory.mktemp("vae") / "diffusion_pytorch_model.safetensors"
    save_file(load_state_dict(golden_dir / "vae_tiny.npz"), str(path))
    return load_state_dict(path)


@pytest.fixture(scope="module")
def rgb_model():
    return vae.AutoencoderKL(**TINY_GOLDEN_FIELDS)


@pytest.fixture(scope="module")
def rgb_params(golden_state_dict, rgb_model):
    return imported(golden_state_dict, rgb_model)


def test_golden_config_matches_json(golden_dir):
    config = json.loads((golden_dir / "vae_tiny.json").read_text())["resolved_config"]
    assert {k: config[k] for k in TINY_GOLDEN_FIELDS} == {**TINY_GOLDEN_FIELDS, "block_out_channels": [32, 64]}
    assert config["scaling_factor"] == vae.AutoencoderKL().scaling_factor
    assert config["mid_block_add_attention"] and config["use_quant_conv"] and config["act_fn"] == "silu"


def test_encode_matches_diffusers(golden, rgb_model, rgb_params):
    with jax.default_matmul_precision("highest"):
        (mean, logvar), state = rgb_model.apply(rgb_params, nhwc(golden["x"]), method=rgb_model.encode,
                                                mutable=["intermediates"])
    inter = state["intermediates"]
    assert_close(inter["encoder"]["mid_block_out"][0], nhwc(golden["enc/mid_block_out"]))
    assert_close(inter["encoder_out"][0], nhwc(golden["enc/encoder_out"]))
    assert_close(inter["moments"][0], nhwc(golden["enc/moments"]))
    assert_close(mean, nhwc(golden["latent_mean"]))
    assert_close(logvar, nhwc(golden["latent_logvar"]))
    assert_close(jnp.exp(0.5 * logvar), nhwc(golden["latent_std"]))
    assert_close(mean + jnp.exp(0.5 * logvar) * nhwc(golden["latent_sample_eps"]), nhwc(golden["latent_sample"]))


def test_decode_and_reconstruction_match_diffusers(golden, rgb_model, rgb_params):
    with jax.default_matmul_precision("highest"):
        image, state = rgb_model.apply(rgb_params, nhwc(golden["z"]), method=rgb_model.decode,
                                       mutable=["intermediates"])
        recon, mean, _ = rgb_model.apply(rgb_params, nhwc(golden["x"]), sample_posterior=False)
    assert_close(state["intermediates"]["post_quant"][0], nhwc(golden["dec/post_quant"]))
    assert_close(state["intermediates"]["decoder"]["mid_block_out"][0], nhwc(golden["dec/mid_block_out"]))
    assert_close(image, nhwc(golden["decoded"]))
    assert_close(recon, nhwc(golden["recon_mode"]))
    assert_close(mean, nhwc(golden["latent_mean"]))


def test_logvar_is_clamped(golden, rgb_model, rgb_params):
    for shift, bound in ((100.0, 20.0), (-100.0, -30.0)):
        params = jax.tree.map(np.array, rgb_params)
        params["params"]["quant_conv"]["bias"][4:] += shift  # channels 4:8 are the raw logvar
        with jax.default_matmul_precision("highest"):
            mean, logvar = rgb_model.apply(params, nhwc(golden["x"]), method=rgb_model.encode)
        np.testing.assert_array_equal(logvar, bound)
        assert_close(mean, nhwc(golden["latent_mean"]))


def test_posterior_sampling_uses_the_rng(golden, rgb_model, rgb_params):
    x = nhwc(golden["x"])
    rng = jax.random.key(5)
    recon, mean, logvar = rgb_model.apply(rgb_params, x, rng=rng)
    expected = rgb_model.apply(rgb_params, vae.sample_posterior(rng, mean, logvar), method=rgb_model.decode)
    np.testing.assert_allclose(recon, expected, rtol=1e-6, atol=1e-6)
    from_stream, _, _ = rgb_model.apply(rgb_params, x, rngs={"posterior": jax.random.key(6)})
    assert np.abs(np.asarray(from_stream) - np.asarray(recon)).max() > 1e-3
    draw = vae.sample_posterior(jax.random.key(0), jnp.full((4000,), 2.0), jnp.full((4000,), np.log(0.25)))
    assert abs(float(draw.mean()) - 2.0) < 0.05 and abs(float(draw.std()) - 0.5) < 0.05


def _legacy_names(state_dict):
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for name, value in state_dict.items():
        for new, old in renames.items():
            name = name.replace(new, old)
        out[name] = value
    return out


def test_legacy_attention_names_load_the_same(golden_state_dict, rgb_model, rgb_params):
    legacy = _legacy_names(golden_state_dict)
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert not any(".to_q." in k for k in legacy)
    legacy_params = imported(legacy, rgb_model)
    jax.tree.map(np.testing.assert_array_equal, legacy_params, rgb_params)


def test_mixed_attention_names_in_one_block_are_refused(golden_state_dict, rgb_model):
    mixed = dict(golden_state_dict)
    mixed["decoder.mid_block.attentions.0.proj_attn.weight"] = mixed.pop(
        "decoder.mid_block.attentions.0.to_out.0.weight")
    with pytest.raises(WeightImportError) as err:
        imported(mixed, rgb_model)
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in str(err.value)
    assert "decoder.mid_block.attentions.0.to_out.0.weight" in str(err.value)


def test_round_trip_is_exact(golden_state_dict, rgb_model, rgb_params):
    exported = vae_diffusers.to_state_dict(rgb_params, rgb_model)
    assert sorted(exported) == sorted(golden_state_dict)
    for name, value in golden_state_dict.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    reimported = imported(exported, rgb_model)
    jax.tree.map(np.testing.assert_array_equal, reimported, rgb_params)


def test_export_refuses_params_of_another_model(rgb_params):
    other = vae.AutoencoderKL(**{**TINY_GOLDEN_FIELDS, "latent_channels": 8})
    with pytest.raises(ValueError, match="quant_conv"):
        vae_diffusers.to_state_dict(rgb_params, other)


def _sd_zero_state_dict(golden_dir):
    names = json.loads((golden_dir / "vae_sd_names.json").read_text())
    return names, {name: np.zeros(shape, np.float32) for name, shape in names["params"].items()}


def test_sd_checkpoint_names_map_completely(golden_dir):
    names, state_dict = _sd_zero_state_dict(golden_dir)
    assert len(state_dict) == names["num_tensors"] == 248
    rgb = vae.make_vae("sd-vae-ft-ema")
    params = imported(state_dict, rgb)
    leaves = jax.tree.leaves(params)
    assert len(leaves) == 248 and sum(x.size for x in leaves) == names["num_parameters"]
    assert params["params"]["encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 128)

    gray = vae.make_vae("sd-vae-gray")
    params = imported(state_dict, gray)
    assert params["params"]["encoder"]["conv_in"]["kernel"].shape == (3, 3, 1, 128)
    assert params["params"]["decoder"]["conv_out"]["kernel"].shape == (3, 3, 128, 1)
    assert params["params"]["decoder"]["conv_out"]["bias"].shape == (1,)
    legacy = imported(_legacy_names(state_dict), gray)
    assert jax.tree.structure(legacy) == jax.tree.structure(params)


def test_rgb_weights_on_a_gray_model_follow_the_documented_rule(golden, golden_state_dict, rgb_model, rgb_params):
    gray_model = vae.AutoencoderKL(**{**TINY_GOLDEN_FIELDS, "in_channels": 1, "out_channels": 1})
    gray_params = imported(golden_state_dict, gray_model)
    g = nhwc(golden["x"])[..., :1]
    z = nhwc(golden["z"])
    with jax.default_matmul_precision("highest"):
        gray_mean, gray_logvar = gray_model.apply(gray_params, g, method=gray_model.encode)
        rgb_mean, rgb_logvar = rgb_model.apply(rgb_params, np.repeat(g, 3, axis=-1), method=rgb_model.encode)
        gray_image = gray_model.apply(gray_params, z, method=gray_model.decode)
        rgb_image = rgb_model.apply(rgb_params, z, method=rgb_model.decode)
    assert gray_image.shape == (1, 32, 32, 1)
    assert_close(gray_mean, rgb_mean)
    assert_close(gray_logvar, rgb_logvar)
    assert_close(gray_image, np.asarray(rgb_image).mean(axis=-1, keepdims=True))


def test_channel_mismatches_other_than_rgb_to_gray_are_refused(golden_state_dict):
    gray_model = vae.AutoencoderKL(**{**TINY_GOLDEN_FIELDS, "in_channels": 1, "out_channels": 1})
    with pytest.raises(WeightImportError, match="encoder/conv_in/kernel") as err:
        imported(golden_state_dict, gray_model, adapt_rgb="off")
    assert "decoder/conv_out/kernel" in str(err.value)
    two_channel = vae.AutoencoderKL(**{**TINY_GOLDEN_FIELDS, "in_channels": 2, "out_channels": 2})
    with pytest.raises(WeightImportError, match="shape mismatch at encoder/conv_in/kernel"):
        imported(golden_state_dict, two_channel)
    with pytest.raises(ValueError, match="adapt_rgb"):
        imported(golden_state_dict, gray_model, adapt_rgb="yes")


def test_wrong_files_are_refused_with_every_name_listed(golden_dir, golden_state_dict, rgb_model):
    dit_like = load_state_dict(golden_dir / "dit_tiny.npz")
    with pytest.raises(WeightImportError) as err:
        imported(dit_like, rgb_model)
    message = str(err.value)
    assert "x_embedder.proj.weight" in message and "blocks.1.attn.qkv.weight" in message
    assert "encoder.conv_in.weight" in message and "post_quant_conv.bias" in message

    missing = dict(golden_state_dict)
    del missing["decoder.up_blocks.1.resnets.1.norm2.bias"]
    del missing["quant_conv.weight"]
    with pytest.raises(WeightImportError) as err:
        imported(missing, rgb_model)
    assert "2 tensor(s) the model needs are not in the file" in str(err.value)
    assert "decoder.up_blocks.1.resnets.1.norm2.bias" in str(err.value)
    assert "quant_conv.weight" in str(err.value)

    wrong_shape = dict(golden_state_dict)
    wrong_shape["encoder.mid_block.attentions.0.to_k.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(WeightImportError, match=r"shape mismatch at encoder/mid_block/attentions_0/to_k/kernel"):
        imported(wrong_shape, rgb_model)


def test_sd_config_shapes_at_256px_grayscale():
    model = vae.make_vae("sd-vae-gray")
    assert model.scaling_factor == 0.18215 and model.downsample_factor == 8
    variables = abstract_variables(model)
    x = jax.ShapeDtypeStruct((2, 256, 256, 1), jnp.float32)
    mean, logvar = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode), variables, x)
    assert mean.shape == logvar.shape == (2, 32, 32, 4)
    image = jax.eval_shape(lambda v, z: model.apply(v, z, method=model.decode), variables, mean)
    assert image.shape == (2, 256, 256, 1)


def test_every_weight_has_logical_axis_names():
    model = vae.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1)
    boxed = traverse_util.flatten_dict(abstract_variables(model)["params"], sep="/")
    for path, leaf in boxed.items():
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        module = path.split("/")[-2]
        if "norm" in module:
            want = ("norm",)
        elif "conv" in module:
            want = (None, None, "conv_in", "conv_out") if path.endswith("kernel") else ("conv_out",)
        else:
            kernel_axes = {"to_q": ("embed", "heads"), "to_k": ("embed", "heads"), "to_v": ("embed", "heads"),
                           "to_out_0": ("heads", "embed")}[module]
            want = kernel_axes if path.endswith("kernel") else kernel_axes[1:]
        assert tuple(leaf.names) == want, path


# One resolution level keeps the three XLA compilations of this test cheap on the shared CPUs.
SHARDING_MODEL = vae.AutoencoderKL(block_out_channels=(16,), layers_per_block=1, norm_num_groups=8)


def _vae_loss(params, x):
    recon, mean, logvar = SHARDING_MODEL.apply(params, x, rng=jax.random.key(2))
    return jnp.mean(jnp.square(recon - x)) + 1e-3 * jnp.mean(vae.kl_divergence(mean, logvar))


@pytest.fixture(scope="module")
def unsharded_loss_and_grads():
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
    # One jitted init with an 'rbg' key: threefry initialisers compile slowly on CPU, op by op even more.
    boxed = jax.jit(lambda: {"params": factory.init_params(SHARDING_MODEL, jax.random.key(0, impl="rbg"))})()
    return x, boxed, jax.jit(jax.value_and_grad(_vae_loss))(nn.meta.unbox(boxed), x)


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 2, 4)])
def test_sharded_forward_backward_equals_unsharded(mesh_shape, unsharded_loss_and_grads):
    x, boxed, (ref_loss, ref_grads) = unsharded_loss_and_grads
    mesh = sharding.make_mesh(mesh_shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        params = sharding.shard_params(boxed, mesh, RULES)
        xs = jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
        got_loss, got_grads = jax.jit(jax.value_and_grad(_vae_loss))(params, xs)
    # The weights really are split: conv channels over fsdp (in) and tensor (out).
    kernel = params["params"]["encoder"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert kernel.sharding.spec == P(None, None, "fsdp", "tensor")
    assert len(kernel.addressable_shards[0].data.reshape(-1)) == kernel.size // (mesh_shape[1] * mesh_shape[2])
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6), got_grads, ref_grads)


def test_bad_inputs_and_configs_are_refused_clearly(rgb_model, rgb_params):
    with pytest.raises(ValueError, match="NHWC"):
        rgb_model.apply(rgb_params, np.zeros((1, 3, 32, 32), np.float32), method=rgb_model.encode)
    with pytest.raises(ValueError, match="multiples of 2"):
        rgb_model.apply(rgb_params, np.zeros((1, 31, 32, 3), np.float32), method=rgb_model.encode)
    with pytest.raises(ValueError, match="latent"):
        rgb_model.apply(rgb_params, np.zeros((1, 16, 16, 3), np.float32), method=rgb_model.decode)
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        factory.abstract_params(vae.AutoencoderKL(block_out_channels=(48, 64)))
    with pytest.raises(ValueError, match="cudnn' needs dtype bfloat16"):
        factory.abstract_params(vae.AutoencoderKL(block_out_channels=(32, 64), attention_impl="cudnn"))
    with pytest.raises(ValueError, match="head dim 512"):
        factory.abstract_params(vae.make_vae("sd-vae-gray", dtype=jnp.bfloat16, attention_impl="cudnn"))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            factory.abstract_params(vae.AutoencoderKL(block_out_channels=(32, 64), dtype=jnp.bfloat16,
                                                      attention_impl="cudnn"))
    with pytest.raises(ValueError, match="attention_impl must be"):
        factory.abstract_params(vae.AutoencoderKL(block_out_channels=(32, 64), attention_impl="flash"))
    with pytest.raises(ValueError, match="unknown VAE preset"):
        vae.make_vae("sd-vae-ft-xyz")
    with pytest.raises(ValueError, match="latent_chanels"):
        vae.make_vae({"latent_chanels": 8})


def test_make_vae_presets_and_overrides():
    assert vae.make_vae("sd-vae-ft-mse") == vae.AutoencoderKL(**vae.SD_VAE_CONFIG)
    model = vae.make_vae({"in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64]},
                         dtype=jnp.bfloat16)
    assert model.block_out_channels == (32, 64) and model.layers_per_block == 2
    assert model.dtype == jnp.bfloat16 and model.in_channels == 1


def test_kl_divergence_hand_computed():
    mean = np.zeros((2, 2, 2, 1), np.float32)
    logvar = np.zeros((2, 2, 2, 1), np.float32)
    mean[0, 0, 0, 0] = 2.0      # 0.5 * 4 = 2
    logvar[1, 1, 1, 0] = 1.0    # 0.5 * (e - 1 - 1)
    np.testing.assert_allclose(vae.kl_divergence(mean, logvar), [2.0, 0.5 * (np.e - 2.0)], rtol=1e-6)


def test_patch_discriminator_shapes():
    disc = vae.PatchDiscriminator(base_channels=8, num_layers=2)
    x = jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32)
    variables = jax.eval_shape(disc.init, jax.random.key(0), x)
    logits = jax.eval_shape(disc.apply, variables, x)
    # 32 → 16 → 8 (stride-2 convs) → 7 → 6 (stride-1 4×4 convs with padding 1).
    assert logits.shape == (2, 6, 6, 1) and logits.dtype == jnp.float32
    kernels = {k: v.shape for k, v in traverse_util.flatten_dict(nn.meta.unbox(variables["params"]), sep="/").items()
               if k.endswith("kernel")}
    assert kernels == {"conv_0/kernel": (4, 4, 1, 8), "conv_1/kernel": (4, 4, 8, 16),
                       "conv_2/kernel": (4, 4, 16, 32), "conv_logits/kernel": (4, 4, 32, 1)}
    smallest = jax.ShapeDtypeStruct((1, 12, 12, 3), jnp.float32)
    assert jax.eval_shape(disc.apply, jax.eval_shape(disc.init, jax.random.key(0), smallest),
                          smallest).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match=">= 12"):
        jax.eval_shape(disc.apply, variables, jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))


def test_hinge_d_loss_hand_computed():
    real = jnp.array([[2.0, 0.5], [-1.0, 1.0]])   # relu(1 - real) = 0, 0.5, 2, 0 → mean 0.625
    fake = jnp.array([[-2.0, 0.0], [0.5, -0.5]])  # relu(1 + fake) = 0, 1, 1.5, 0.5 → mean 0.75
    np.testing.assert_allclose(vae.hinge_d_loss(real, fake), 0.5 * (0.625 + 0.75), rtol=1e-6)
    assert float(vae.hinge_d_loss(jnp.full((3, 4), 1.5), jnp.full((3, 4), -1.5))) == 0.0
