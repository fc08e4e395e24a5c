"""DiT: golden parity with facebookresearch/DiT, checkpoint import/export, configs, sharding, label
dropout and bf16."""

import functools
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
from xray_dit.diffusion import samplers
from xray_dit.models import dit, factory, layers
from xray_dit.models.convert import dit_torch
from xray_dit.models.weights import WeightImportError, load_state_dict
from tests.helpers.golden import assert_close, nhwc

RULES = sharding.axis_rules(base.get_config().mesh.rules)

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0,
            class_dropout_prob=0.1, num_classes=3, learn_sigma=True)


def abstract_variables(model):
    """`{'params': ...}` shapes and dtypes, boxed with logical names, as `model.apply` takes them."""
    return {"params": factory.abstract_params(model)}


def randomized(variables, seed=0, scale=0.05):
    """Every param replaced by N(0, scale²) so that adaLN-Zero does not make outputs trivially zero."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32),
                        nn.meta.unbox(variables))


@pytest.fixture(scope="module")
def golden(golden_dir):
    with np.load(golden_dir / "dit_tiny.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def model():
    return dit.DiT(**TINY)


@pytest.fixture(scope="module")
def apply(model):
    """The tiny model's forward, compiled once per input shape for all tests of this file."""
    return jax.jit(model.apply)


@pytest.fixture(scope="module")
def golden_variables(golden_dir, model, tmp_path_factory):
    """The golden weights read back from a .safetensors file (the real checkpoint path) and imported."""
    path = tmp_path_factory.mktemp("dit") / "DiT-tiny.safetensors"
    save_file(load_state_dict(golden_dir / "dit_tiny.npz"), str(path))
    return {"params": dit_torch.from_state_dict(load_state_dict(path), model)}


def test_golden_config_matches_json(golden_dir):
    assert json.loads((golden_dir / "dit_tiny.json").read_text())["config"] == TINY


def test_golden_forward_and_intermediates(golden, model, golden_variables):
    with jax.default_matmul_precision("highest"):
        out, state = jax.jit(functools.partial(model.apply, capture_intermediates=True))(
            golden_variables, nhwc(golden["x"]), golden["t"], golden["y"])
        t_freq = layers.timestep_features(golden["t"], 256)
        t_emb = dit.TimestepEmbedder(64).apply({"params": golden_variables["params"]["t_embedder"]}, golden["t"])
    inter = state["intermediates"]
    assert out.shape == (2, 8, 8, 8) and out.dtype == jnp.float32
    assert_close(out, nhwc(golden["out"]))
    # float32 frequencies may differ from PyTorch's by an ulp of exp; at t=517 that moves the angle by up
    # to t·2⁻²³ (6e-5), more than the default 1e-5. A cos/sin mix-up would be off by O(1).
    np.testing.assert_allclose(t_freq, golden["t_freq"], rtol=0, atol=golden["t"].max() * 2.0 ** -23)
    assert_close(t_freq[0], golden["t_freq"][0])
    assert_close(t_emb, golden["t_emb"])
    assert_close(inter["t_embedder"]["__call__"][0], golden["inter/t_emb"])
    patch_tokens = inter["x_embedder"]["__call__"][0].reshape(2, 16, 64)
    assert_close(patch_tokens, golden["inter/x_embedder"])
    assert_close(patch_tokens + model.pos_embed()[None], golden["inter/tokens_in"])
    y_emb = golden_variables["params"]["y_embedder"][golden["y"]]
    assert_close(y_emb, golden["inter/y_emb"])
    assert_close(t_emb + y_emb, golden["inter/c"])
    assert_close(inter["blocks_0"]["__call__"][0], golden["inter/block0"])
    assert_close(inter["blocks_1"]["__call__"][0], golden["inter/block1"])
    assert_close(inter["final_layer"]["__call__"][0], golden["inter/final_layer"])


def test_golden_forward_with_doubled_weights(golden, apply, golden_variables):
    """×2 weights push the tiny model out of its near-linear regime: only this catches an erf GELU."""
    doubled = jax.tree.map(lambda w: 2.0 * w, golden_variables)
    with jax.default_matmul_precision("highest"):
        out = apply(doubled, nhwc(golden["x"]), golden["t"], golden["y"])
    assert_close(out, nhwc(golden["out_w2"]))


def test_golden_classifier_free_guidance(golden, apply, golden_variables):
    """Our guidance equals the reference's on ε channels 0-2 and, unlike it, also guides channel 3."""
    x, t, y = nhwc(golden["x_cfg"]), golden["t_cfg"], golden["y_cfg"]
    with jax.default_matmul_precision("highest"):
        both = apply(golden_variables, x, t, y)
    cond, uncond = both[:2], both[2:]
    guided = samplers.cfg_combine(cond, uncond, 4.0, eps_channels=4)
    ref = nhwc(golden["out_cfg"])
    assert_close(guided[..., :3], ref[:2, ..., :3])
    assert_close(guided[..., 3], uncond[..., 3] + 4.0 * (cond[..., 3] - uncond[..., 3]))
    assert not np.allclose(guided[..., 3], ref[:2, ..., 3], atol=1e-3)  # the reference leaves it unguided
    assert_close(guided[..., 4:], ref[:2, ..., 4:])  # variance values: the conditional pass's


def test_pos_embed_is_the_stored_table_column_half_first(golden):
    table = layers.sincos_2d_pos_embed(64, 4)
    np.testing.assert_array_equal(table[None], golden["param/pos_embed"])
    # Token 1 is (row 0, column 1): only the first (column) half differs from token 0.
    assert not np.allclose(table[1, :32], table[0, :32]) and np.allclose(table[1, 32:], table[0, 32:])


def test_unpatchify_places_values_as_the_reference():
    p, c, h, w = 2, 3, 2, 3
    tokens = np.arange(2 * h * w * p * p * c, dtype=np.float32).reshape(2, h * w, p * p * c)
    img = np.asarray(dit.unpatchify(jnp.asarray(tokens), h, w, p, c))
    assert img.shape == (2, h * p, w * p, c)
    for n, i, j, a, b, ch in np.ndindex(2, h, w, p, p, c):
        assert img[n, i * p + a, j * p + b, ch] == tokens[n, i * w + j, (a * p + b) * c + ch]


@pytest.mark.parametrize("resolution", ["256", "512"])
def test_released_dit_xl_checkpoint_names_map_completely(golden_dir, resolution):
    spec = json.loads((golden_dir / "dit_names.json").read_text())["models"][f"DiT-XL/2@{resolution}"]
    kwargs = spec["ctor_kwargs"]
    model = dit.make_dit("DiT-XL/2", **{k: v for k, v in kwargs.items() if k not in ("depth", "hidden_size",
                                                                                   "patch_size", "num_heads")})
    assert (model.depth, model.hidden_size, model.num_heads) == (kwargs["depth"], kwargs["hidden_size"],
                                                                 kwargs["num_heads"])
    # Zero-stride zeros: the 675M-parameter map is checked without allocating it.
    state = {name: np.broadcast_to(np.float32(0), shape) for name, shape in spec["params"].items()}
    state["pos_embed"] = model.pos_embed()[None]
    variables = dit_torch.from_state_dict(state, model)
    count = sum(np.size(v) for v in jax.tree.leaves(variables))
    assert count + state["pos_embed"].size == spec["num_parameters"]


def test_export_reproduces_the_checkpoint_and_round_trips_exactly(golden, model, golden_variables):
    exported = dit_torch.to_state_dict(golden_variables, model)
    checkpoint = {k[len("param/"):]: v for k, v in golden.items() if k.startswith("param/")}
    assert sorted(exported) == sorted(checkpoint)
    for name, value in checkpoint.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    variables = randomized(abstract_variables(model), seed=3)
    back = {"params": dit_torch.from_state_dict(dit_torch.to_state_dict(variables, model), model)}
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))


def test_qkv_layout_follows_timm(golden, model, golden_variables):
    """Rows of the fused PyTorch qkv weight are [q | k | v], each head-major."""
    kernel = golden_variables["params"]["blocks_0"]["attn"]["qkv"]["kernel"]
    torch_w = golden["param/blocks.0.attn.qkv.weight"]
    np.testing.assert_array_equal(kernel[:, 1, 2, 5], torch_w[64 + 2 * 16 + 5])


def test_importer_refuses_wrong_files_listing_the_names(golden, model):
    state = {k[len("param/"):]: v for k, v in golden.items() if k.startswith("param/")}
    with pytest.raises(WeightImportError, match=r"blocks\.9\.attn\.qkv\.weight"):
        dit_torch.from_state_dict({**state, "blocks.9.attn.qkv.weight": np.zeros((192, 64), np.float32)}, model)
    missing = dict(state)
    del missing["blocks.1.mlp.fc2.bias"], missing["final_layer.linear.weight"]
    with pytest.raises(WeightImportError, match=r"blocks\.1\.mlp\.fc2\.bias.*final_layer\.linear\.weight"):
        dit_torch.from_state_dict(missing, model)
    with pytest.raises(WeightImportError, match=r"blocks_0/mlp/fc1/kernel.*\(64, 256\)"):
        dit_torch.from_state_dict({**state, "blocks.0.mlp.fc1.weight": np.zeros((128, 64), np.float32)}, model)
    with pytest.raises(WeightImportError, match="pos_embed differs"):
        dit_torch.from_state_dict({**state, "pos_embed": np.zeros((1, 16, 64), np.float32)}, model)
    with pytest.raises(WeightImportError, match=r"pos_embed has shape \(1, 64, 64\)"):
        dit_torch.from_state_dict({**state, "pos_embed": np.zeros((1, 64, 64), np.float32)}, model)
    with pytest.raises(WeightImportError, match="y_embedder.embedding_table.weight"):
        dit_torch.from_state_dict(state, dit.DiT(**{**TINY, "num_classes": 0}))


@pytest.mark.parametrize("size", sorted(dit.DIT_SIZES))
@pytest.mark.parametrize("patch", dit.DIT_PATCH_SIZES)
def test_every_size_and_patch_has_the_paper_shapes(size, patch):
    model = dit.make_dit(f"DiT-{size}/{patch}", input_size=32, num_classes=1000)
    hidden, depth, heads = dit.DIT_SIZES[size]
    x = jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32)
    t = y = jax.ShapeDtypeStruct((2,), jnp.int32)
    params = nn.meta.unbox(abstract_variables(model))["params"]
    out = jax.eval_shape(lambda p, x, t, y: model.apply({"params": p}, x, t, y), params, x, t, y)
    assert out.shape == (2, 32, 32, 8)
    assert sum(1 for k in params if k.startswith("blocks_")) == depth
    assert params["blocks_0"]["attn"]["qkv"]["kernel"].shape == (hidden, 3, heads, hidden // heads)
    assert params["x_embedder"]["kernel"].shape == (patch, patch, 4, hidden)
    assert params["final_layer"]["linear"]["kernel"].shape == (hidden, patch * patch * 8)
    assert params["y_embedder"].shape == (1001, hidden)


def test_make_dit_and_model_refuse_bad_configs_and_inputs(model, golden_variables):
    with pytest.raises(ValueError, match="unknown DiT model 'DiT-M/2'"):
        dit.make_dit("DiT-M/2")
    with pytest.raises(ValueError, match="unknown DiT model 'DiT-B/3'"):
        dit.make_dit("DiT-B/3")
    with pytest.raises(ValueError, match="input_size 30 is not divisible by patch_size 4"):
        dit.make_dit("DiT-S/4", input_size=30)
    with pytest.raises(ValueError, match="cudnn"):
        abstract_variables(dit.DiT(**{**TINY, "attention_impl": "cudnn"}))
    x, t, y = np.zeros((2, 8, 8, 4), np.float32), np.array([1, 2]), np.array([0, 1])
    with pytest.raises(ValueError, match="NHWC"):
        model.apply(golden_variables, x.transpose(0, 3, 1, 2), t, y)
    with pytest.raises(ValueError, match="one timestep per example"):
        model.apply(golden_variables, x, t[:1], y)
    with pytest.raises(ValueError, match="pass labels"):
        model.apply(golden_variables, x, t)
    with pytest.raises(ValueError, match="unconditional"):
        dit.DiT(**{**TINY, "num_classes": 0}).apply({"params": {}}, x, t, y)


def test_fresh_init_is_adaln_zero_with_xavier_elsewhere(model, apply):
    variables = nn.meta.unbox({"params": jax.jit(functools.partial(factory.init_params, model))(jax.random.key(0))})
    params = variables["params"]
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    out = apply(variables, x, jnp.array([5, 900]), jnp.array([0, 3]))
    np.testing.assert_array_equal(out, 0.0)  # zero final layer
    for block in ("blocks_0", "blocks_1"):
        np.testing.assert_array_equal(params[block]["adaLN_modulation"]["kernel"], 0.0)
    fc1 = np.asarray(params["blocks_0"]["mlp"]["fc1"]["kernel"])
    limit = np.sqrt(6.0 / (64 + 256))  # xavier-uniform bound of a 64→256 Linear
    assert np.abs(fc1).max() <= limit and np.abs(fc1).max() > 0.9 * limit
    patch = np.asarray(params["x_embedder"]["kernel"])
    limit = np.sqrt(6.0 / (4 * 2 * 2 + 64))  # PyTorch views the conv kernel as a (64, 4·2·2) Linear
    assert np.abs(patch).max() <= limit and np.abs(patch).max() > 0.9 * limit
    assert abs(np.std(params["t_embedder"]["mlp_0"]["kernel"]) - 0.02) < 0.003
    np.testing.assert_array_equal(params["blocks_0"]["mlp"]["fc1"]["bias"], 0.0)


def test_unconditional_model_has_no_label_table():
    model = dit.DiT(**{**TINY, "num_classes": 0})
    variables = randomized(abstract_variables(model))
    assert "y_embedder" not in variables["params"]
    out = jax.jit(model.apply)(variables, np.ones((1, 8, 8, 4), np.float32), np.array([10]))
    assert out.shape == (1, 8, 8, 8) and np.all(np.isfinite(out))
    assert dit.DiT(**{**TINY, "class_dropout_prob": 0.0}).num_label_rows == 3  # no null row without dropout


def test_label_dropout_uses_the_null_class_at_the_given_rate():
    model = dit.DiT(**{**TINY, "input_size": 4, "hidden_size": 32, "depth": 1, "num_heads": 2,
                       "class_dropout_prob": 0.3})
    variables = randomized(abstract_variables(model), scale=0.3)
    n = 1000
    x = jnp.zeros((n, 4, 4, 4))
    t = jnp.full((n,), 7)
    y = jnp.arange(n) % 3
    apply = jax.jit(lambda y, train, rng: model.apply(variables, x, t, y, train=train,
                                                      rngs={"label_dropout": rng}), static_argnums=1)
    dropped = apply(y, True, jax.random.key(5))
    kept, null = apply(y, False, jax.random.key(5)), apply(jnp.full((n,), 3), False, jax.random.key(5))
    is_null = np.all(np.isclose(dropped, null, atol=1e-6), axis=(1, 2, 3))
    is_kept = np.all(np.isclose(dropped, kept, atol=1e-6), axis=(1, 2, 3))
    assert np.all(is_null ^ is_kept)  # every label is either kept or replaced by the null class
    assert abs(is_null.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
    np.testing.assert_array_equal(apply(y, False, jax.random.key(6)), kept)  # eval: no dropout
    assert not np.array_equal(apply(y, True, jax.random.key(6)), dropped)


def test_bfloat16_compute_stays_close_to_float32(golden, golden_variables):
    apply_bf16 = jax.jit(dit.DiT(**{**TINY, "dtype": jnp.bfloat16}).apply)
    out = apply_bf16(golden_variables, nhwc(golden["x"]), golden["t"], golden["y"])
    ref = nhwc(golden["out_w2"])
    out2 = apply_bf16(jax.tree.map(lambda w: 2.0 * w, golden_variables), nhwc(golden["x"]), golden["t"], golden["y"])
    assert out.dtype == jnp.float32
    assert np.abs(out - nhwc(golden["out"])).max() < 0.03 * np.abs(golden["out"]).max()
    assert np.abs(out2 - ref).max() < 0.03 * np.abs(ref).max()


@pytest.mark.parametrize("policy", ["dots", "full"])
def test_remat_keeps_parameters_and_gradients_but_recomputes(policy, unsharded_loss_and_grads):
    (x, t, y), _, (ref_loss, ref_grads) = unsharded_loss_and_grads
    remat_model = dit.DiT(**TINY, remat_policy=policy)
    values = randomized(abstract_variables(SHARDING_MODEL), seed=2)
    assert jax.tree.structure(abstract_variables(remat_model)) == jax.tree.structure(
        abstract_variables(SHARDING_MODEL))   # same checkpoint layout

    def loss(variables):
        out = remat_model.apply(variables, x, t, y)
        return jnp.mean(jnp.square(out - 0.5 * jnp.concatenate([x, x], axis=-1)))
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss))(values))   # the backward really rematerialises
    with jax.default_matmul_precision("highest"):
        got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(values)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7), got_grads, ref_grads)
    with pytest.raises(ValueError, match="remat_policy"):
        dit.DiT(**TINY, remat_policy="some").validate()


def test_modulated_layer_norm_is_adaln_rounded_once():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (2, 5, 16)).astype(np.float32)
    shift, scale = rng.normal(size=(2, 16)).astype(np.float32), rng.normal(size=(2, 16)).astype(np.float32)
    normalized = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    want = normalized * (1 + scale[:, None]) + shift[:, None]
    np.testing.assert_allclose(layers.modulated_layer_norm(x, shift, scale), want, rtol=1e-5, atol=1e-5)
    got_bf16 = layers.modulated_layer_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(shift, jnp.bfloat16),
                                           jnp.asarray(scale, jnp.bfloat16))
    assert got_bf16.dtype == jnp.bfloat16
    # One rounding at the end: within half a bf16 ulp of the float32 result computed from the bf16 inputs.
    xb, sb, cb = (np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32) for v in (x, shift, scale))
    nb = (xb - xb.mean(-1, keepdims=True)) / np.sqrt(xb.var(-1, keepdims=True) + 1e-6)
    exact = nb * (1 + cb[:, None]) + sb[:, None]
    assert np.all(np.abs(np.asarray(got_bf16, np.float32) - exact) <= np.abs(exact) * 2.0 ** -8 + 1e-6)


# ---------------------------------------------------------------------------------------------
# Sharding: FSDP and tensor parallelism give the unsharded numbers.

SHARDING_MODEL = dit.DiT(**TINY)


def _dit_loss(variables, x, t, y):
    out = SHARDING_MODEL.apply(variables, x, t, y)
    return jnp.mean(jnp.square(out - 0.5 * jnp.concatenate([x, x], axis=-1)))


@pytest.fixture(scope="module")
def unsharded_loss_and_grads():
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 4))
    t = jnp.arange(8) * 111
    y = jnp.arange(8) % 4
    boxed = abstract_variables(SHARDING_MODEL)
    values = randomized(boxed, seed=2)
    boxed = jax.tree.map(lambda box, v: box.replace_boxed(v), boxed, values,
                         is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(jax.value_and_grad(_dit_loss))(values, x, t, y)
    return (x, t, y), boxed, ref


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 2, 4)])
def test_sharded_forward_backward_equals_unsharded(mesh_shape, unsharded_loss_and_grads):
    (x, t, y), boxed, (ref_loss, ref_grads) = unsharded_loss_and_grads
    mesh = sharding.make_mesh(mesh_shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES), \
            jax.default_matmul_precision("highest"):
        shardings = sharding.logical_to_shardings(boxed, mesh, RULES)
        params = sharding.shard_params(boxed, mesh, RULES)
        batch = sharding.host_to_global((np.asarray(x), np.asarray(t), np.asarray(y)), mesh)
        step = jax.jit(jax.value_and_grad(_dit_loss),
                       in_shardings=(shardings,) + tuple(b.sharding for b in batch),
                       out_shardings=(jax.sharding.NamedSharding(mesh, P()), shardings))
        got_loss, got_grads = step(params, *batch)
    qkv = params["params"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == P("fsdp", None, "tensor", None)
    assert qkv.addressable_shards[0].data.size == qkv.size // (mesh_shape[1] * mesh_shape[2])
    assert got_grads["params"]["blocks_1"]["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    flat_got = traverse_util.flatten_dict(got_grads, sep="/")
    for key, ref in traverse_util.flatten_dict(ref_grads, sep="/").items():
        np.testing.assert_allclose(flat_got[key], ref, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(ref).max()),
                                   err_msg=key)
