"""EVA-02 classifier: golden parity with timm, weight import/export, resolution and channel adaptation,
drop-path, sharding and layer ids."""

import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from configs import base
from xray_dit import sharding
from xray_dit.models import eva02, factory
from xray_dit.models.convert import eva02_timm
from xray_dit.models.weights import WeightImportError, load_state_dict
from tests.helpers.golden import assert_close, nhwc

RULES = sharding.axis_rules(base.get_config().mesh.rules)

GOLDEN = ("eva02_tiny", "eva02_tiny_fused")
TIMM_NAMES = {"Ti": "eva02_tiny_patch14_224", "S": "eva02_small_patch14_224", "B": "eva02_base_patch14_224"}
WEIGHT_NAMES = {"embed", "mlp", "heads", "classes", "norm", None}



def golden_model(golden_dir, name, **overrides):
    kwargs = json.loads((golden_dir / f"{name}.json").read_text())["kwargs"]
    config = dict(img_size=kwargs["img_size"], patch_size=kwargs["patch_size"], in_channels=kwargs["in_chans"],
                  num_classes=kwargs["num_classes"], embed_dim=kwargs["embed_dim"], depth=kwargs["depth"],
                  num_heads=kwargs["num_heads"], mlp_ratio=kwargs["mlp_ratio"],
                  qkv_fused=kwargs.get("qkv_fused", True), scale_mlp=kwargs.get("scale_mlp", False),
                  ref_feat_shape=tuple(kwargs["ref_feat_shape"]))
    return eva02.Eva02(**{**config, **overrides})


def tiny_model(**overrides):
    config = dict(img_size=16, patch_size=4, in_channels=1, num_classes=3, embed_dim=64, depth=2, num_heads=4,
                  ref_feat_shape=(8, 8))
    return eva02.Eva02(**{**config, **overrides})


def random_params(model, seed=0, boxed=False):
    """Params with the model's real structure and axis names (from `abstract_params`), values drawn
    as the golden files were (LayerNorm scales 1 + 0.1·N, everything else 0.1·N). Running
    `model.init` would compile every initialiser, which costs seconds of CPU per configuration."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
        names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return noise + 1.0 if names[-1] == "scale" else noise

    params = jax.tree_util.tree_map_with_path(draw, factory.abstract_params(model))
    return params if boxed else nn.meta.unbox(params)


def apply(model, params, x, **kwargs):
    # Eager on purpose: the per-op compilations are cached across tests (same tiny shapes), which
    # costs less CPU in total than one whole-model compilation per call site.
    return model.apply({"params": params}, x, **kwargs)



# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("name", GOLDEN)
def test_golden_parity_through_safetensors(golden_dir, tmp_path, name):
    golden = np.load(golden_dir / f"{name}.npz")
    path = tmp_path / "model.safetensors"
    save_file({k[len("param/"):]: golden[k] for k in golden.files if k.startswith("param/")}, str(path))
    model = golden_model(golden_dir, name)
    params = eva02_timm.from_state_dict(load_state_dict(path), model)
    x = nhwc(golden["x"])
    with jax.default_matmul_precision("highest"):
        logits, state = apply(model, params, x, mutable=["intermediates"])
        tokens = apply(model, params, x, method="forward_features")
        pre_logits = apply(model, params, x, method="features")
    assert_close(logits, golden["logits"])
    assert_close(logits, golden["logits_forward"])
    assert_close(tokens, golden["features"])
    assert_close(pre_logits, golden["pre_logits"])
    inter = state["intermediates"]
    assert_close(inter["patch_tokens"][0], golden["inter/patch_embed"])
    assert_close(inter["tokens_in"][0], golden["inter/tokens_in"])
    for i in range(model.depth):
        assert_close(inter[f"block{i}"][0], golden[f"inter/block{i}"])


@pytest.mark.parametrize("name", GOLDEN)
def test_rope_table_matches_timm(golden_dir, name):
    golden = np.load(golden_dir / f"{name}.npz")
    model = golden_model(golden_dir, name)
    sin, cos = eva02.rope_table(model.grid, model.embed_dim // model.num_heads, model.ref_feat_shape)
    assert_close(np.concatenate([sin, cos], axis=-1), golden["rope_embed"])


def test_rope_rescale_and_rotation():
    # With the reference shape equal to the grid there is nothing to rescale.
    np.testing.assert_array_equal(eva02.rope_table(4, 16, (4, 4))[0], eva02.rope_table(4, 16, None)[0])
    sin, cos = eva02.rope_table((2, 3), 8, (4, 6))  # coordinates doubled: patch 5 = (1, 2) → y 2, x 4
    assert sin.shape == (6, 8)
    np.testing.assert_allclose(cos[5, 0::2], np.cos([2.0, 0.02, 4.0, 0.04]), rtol=1e-6)
    np.testing.assert_allclose(sin[5, 1::2], np.sin([2.0, 0.02, 4.0, 0.04]), rtol=1e-6)
    # The pair rotation preserves norms and rotates (1, 0) to (cos, sin).
    x = jnp.asarray(np.tile([1.0, 0.0], 4)[None, None, None, :].repeat(6, axis=1), jnp.float32)
    rotated = np.asarray(eva02.apply_rope(x, sin, cos))[0, :, 0]
    np.testing.assert_allclose(rotated[:, 0::2], cos[:, 0::2], rtol=1e-6)
    np.testing.assert_allclose(rotated[:, 1::2], sin[:, 0::2], rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        eva02.rope_table(4, 6)


# ---------------------------------------------------------------------------------------- weight maps

@pytest.mark.parametrize("size", ["Ti", "S", "B"])
def test_timm_names_map_completely(golden_dir, caplog, size):
    spec = json.loads((golden_dir / "eva02_names.json").read_text())["models"][TIMM_NAMES[size]]
    state_dict = {k: np.zeros(shape, np.float32) for k, shape in spec["params"].items()}
    model = eva02.make_eva02(size, img_size=224, num_classes=4, in_channels=3)
    with caplog.at_level(logging.INFO):
        params = eva02_timm.from_state_dict(state_dict, model, rng=jax.random.key(1))
    assert "freshly initialised" in caplog.text
    head = params["head"]["kernel"]
    assert head.shape == (model.embed_dim, 4) and np.any(head != 0)
    num_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    assert num_params == spec["num_parameters"] + model.embed_dim * 4 + 4
    exported = eva02_timm.to_state_dict(params, model)
    assert {k: list(v.shape) for k, v in exported.items() if not k.startswith("head.")} == spec["params"]


def test_gray_model_takes_rgb_names(golden_dir):
    spec = json.loads((golden_dir / "eva02_names.json").read_text())["models"][TIMM_NAMES["Ti"]]
    state_dict = {k: np.ones(shape, np.float32) for k, shape in spec["params"].items()}
    params = eva02_timm.from_state_dict(state_dict, eva02.make_eva02("Ti", num_classes=2))
    np.testing.assert_array_equal(params["patch_embed"]["kernel"], np.full((14, 14, 1, 192), 3.0, np.float32))


@pytest.mark.parametrize("name", GOLDEN)
def test_round_trip_is_exact(golden_dir, name):
    state_dict = load_state_dict(golden_dir / f"{name}.npz")
    model = golden_model(golden_dir, name)
    exported = eva02_timm.to_state_dict(eva02_timm.from_state_dict(state_dict, model), model)
    assert exported.keys() == state_dict.keys()
    for key in state_dict:
        np.testing.assert_array_equal(exported[key], state_dict[key], err_msg=key)


@pytest.mark.parametrize("qkv_fused", [True, False])
def test_params_round_trip_is_exact(qkv_fused):
    model = tiny_model(qkv_fused=qkv_fused, scale_mlp=not qkv_fused)
    params = random_params(model)
    back = eva02_timm.from_state_dict(eva02_timm.to_state_dict({"params": params}, model), model)
    flat, flat_back = (traverse_util.flatten_dict(p, sep="/") for p in (params, back))
    assert flat.keys() == flat_back.keys()
    for key in flat:
        np.testing.assert_array_equal(flat_back[key], flat[key], err_msg=key)


def test_wrong_files_are_refused_with_names(golden_dir):
    fused = load_state_dict(golden_dir / "eva02_tiny_fused.npz")
    unfused_model = golden_model(golden_dir, "eva02_tiny", depth=1)
    with pytest.raises(WeightImportError) as err:
        eva02_timm.from_state_dict(fused, unfused_model)
    assert "blocks.0.attn.qkv.weight" in str(err.value) and "blocks.0.attn.q_proj.weight" in str(err.value)
    assert "blocks.0.mlp.fc1_g.weight" in str(err.value)

    model = golden_model(golden_dir, "eva02_tiny_fused")
    broken = dict(fused, **{"blocks.0.attn.proj.weight": np.zeros((64, 32), np.float32), "extra.weight": np.ones(3)})
    del broken["fc_norm.bias"]
    with pytest.raises(WeightImportError) as err:
        eva02_timm.from_state_dict(broken, model)
    message = str(err.value)
    assert "shape mismatch at blocks_0/attn/proj/kernel" in message
    assert "extra.weight" in message and "fc_norm.bias" in message

    with pytest.raises(WeightImportError, match="final `norm`"):
        eva02_timm.from_state_dict(dict(fused, **{"norm.weight": np.ones(64), "norm.bias": np.zeros(64)}), model)


def test_head_of_other_class_count_is_replaced_with_warning(golden_dir):
    state_dict = load_state_dict(golden_dir / "eva02_tiny_fused.npz")
    model = golden_model(golden_dir, "eva02_tiny_fused", num_classes=5)
    with pytest.warns(UserWarning, match="head for 3 classes"):
        params = eva02_timm.from_state_dict(state_dict, model)
    assert params["head"]["kernel"].shape == (64, 5)
    np.testing.assert_array_equal(params["fc_norm"]["scale"], state_dict["fc_norm.weight"])


# -------------------------------------------------------------------------- resolution and channels

def test_other_resolution_resamples_pos_embed(golden_dir):
    golden = np.load(golden_dir / "eva02_tiny_fused.npz")
    state_dict = load_state_dict(golden_dir / "eva02_tiny_fused.npz")
    # Same resolution, stated explicitly: the original weights and outputs, untouched.
    same = golden_model(golden_dir, "eva02_tiny_fused")
    params = eva02_timm.from_state_dict(state_dict, same, img_size=56)
    np.testing.assert_array_equal(params["pos_embed"], state_dict["pos_embed"])
    with jax.default_matmul_precision("highest"):
        assert_close(apply(same, params, nhwc(golden["x"])), golden["logits"])

    bigger = golden_model(golden_dir, "eva02_tiny_fused", img_size=84)
    params = eva02_timm.from_state_dict(state_dict, bigger)
    assert params["pos_embed"].shape == (1, 1 + 36, 64)
    np.testing.assert_array_equal(params["pos_embed"][:, 0], state_dict["pos_embed"][:, 0])
    # Each corner of the new grid is mostly the old corner (row-major order kept, not transposed).
    old, new = state_dict["pos_embed"][0, 1:].reshape(4, 4, 64), params["pos_embed"][0, 1:].reshape(6, 6, 64)
    for (i, j), (k, m) in [((0, 0), (0, 0)), ((0, 3), (0, 5)), ((3, 0), (5, 0))]:
        assert np.corrcoef(old[i, j], new[k, m])[0, 1] > 0.9
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 84, 84, 3)))
    logits = jax.jit(lambda p, x: bigger.apply({"params": p}, x))(params, x)
    assert logits.shape == (2, 3) and np.all(np.isfinite(logits))


def test_resample_pos_embed_keeps_constants_and_needs_grid_for_rectangles():
    pos = np.concatenate([np.full((1, 1, 4), 7.0), np.broadcast_to(np.arange(4.0), (1, 6, 4))], axis=1)
    with pytest.raises(ValueError, match="not a square grid"):
        eva02_timm.resample_pos_embed(pos, (4, 6))
    resized = eva02_timm.resample_pos_embed(pos.astype(np.float32), (4, 6), old_grid=(2, 3))
    np.testing.assert_allclose(resized[0, 1:], np.broadcast_to(np.arange(4.0), (24, 4)), atol=1e-5)
    np.testing.assert_array_equal(resized[0, 0], np.full(4, 7.0))
    ramp = np.concatenate([np.zeros((1, 1, 1)), np.arange(8.0).reshape(1, 8, 1)], axis=1).astype(np.float32)
    down = eva02_timm.resample_pos_embed(ramp, (2, 2), old_grid=(2, 4))[0, 1:, 0]
    assert down[0] < down[1] and down[2] < down[3]  # columns were shrunk, in order
    np.testing.assert_allclose(down[2:] - down[:2], [4.0, 4.0], rtol=1e-5)  # rows (unchanged count) intact


def test_rgb_to_gray_adaptation_matches_rgb_model_on_gray_input(golden_dir):
    state_dict = load_state_dict(golden_dir / "eva02_tiny_fused.npz")
    rgb_model = golden_model(golden_dir, "eva02_tiny_fused")
    gray_model = golden_model(golden_dir, "eva02_tiny_fused", in_channels=1)
    rgb_params = eva02_timm.from_state_dict(state_dict, rgb_model)
    gray_params = eva02_timm.from_state_dict(state_dict, gray_model)
    assert gray_params["patch_embed"]["kernel"].shape == (14, 14, 1, 64)
    gray = np.asarray(jax.random.normal(jax.random.key(3), (2, 56, 56, 1)))
    with jax.default_matmul_precision("highest"):
        want = apply(rgb_model, rgb_params, np.repeat(gray, 3, axis=-1), method="forward_features")
        got = apply(gray_model, gray_params, gray, method="forward_features")
    assert_close(got, want)


# --------------------------------------------------------------------------------- model structure

@pytest.mark.parametrize("size", ["Ti", "S", "B"])
@pytest.mark.parametrize("img_size,patch_size", [(224, 14), (252, 14), (256, 16)])
def test_shapes(size, img_size, patch_size):
    model = eva02.make_eva02(size, img_size=img_size, num_classes=5, patch_size=patch_size)
    x = jax.ShapeDtypeStruct((2, img_size, img_size, 1), jnp.float32)
    logits, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
    tokens = jax.eval_shape(lambda v, x: model.apply(v, x, method="forward_features"), variables, x)
    grid = img_size // patch_size
    dim = eva02.EVA02_SIZES[size]["embed_dim"]
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert tokens.shape == (2, 1 + grid * grid, dim)
    assert variables["params"]["pos_embed"].unbox().shape == (1, 1 + grid * grid, dim)


def test_bad_configurations_and_inputs_are_explained():
    with pytest.raises(ValueError, match="unknown EVA-02 size 'XL'"):
        eva02.make_eva02("XL", num_classes=2)
    with pytest.raises(ValueError, match="not divisible by the patch size 14"):
        eva02.make_eva02("S", img_size=256, num_classes=2)
    model = tiny_model()
    params = random_params(model)
    with pytest.raises(ValueError, match="looks NCHW"):
        apply(model, params, jnp.zeros((2, 1, 16, 16)))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        random_params(tiny_model(img_size=18))
    with pytest.raises(ValueError, match="cudnn"):
        random_params(tiny_model(attention_impl="cudnn"))


def test_every_weight_has_logical_axis_names():
    for fused in (True, False):
        abstract = factory.abstract_params(tiny_model(qkv_fused=fused, scale_mlp=not fused))
        leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), leaf
            assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= WEIGHT_NAMES, leaf.names


def test_bfloat16_compute_stays_close():
    params = random_params(tiny_model())
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
    full = jax.jit(lambda p, x: tiny_model().apply({"params": p}, x))(params, x)
    half = jax.jit(lambda p, x: tiny_model(dtype=jnp.bfloat16).apply({"params": p}, x))(params, x)
    assert half.dtype == jnp.float32
    assert not np.array_equal(half, full)  # really computed in bf16
    np.testing.assert_allclose(half, full, atol=0.05 * float(np.abs(full).max()))


def test_drop_path_only_in_training():
    # depth 2: rates (0, 0.9); a per-sample drop at 0.9 makes "nothing dropped" practically impossible.
    model = tiny_model(drop_path_rate=0.9)
    params = random_params(model)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
    eval_out = apply(model, params, x)
    np.testing.assert_array_equal(eval_out, apply(tiny_model(), params, x))
    np.testing.assert_array_equal(eval_out, apply(tiny_model(), params, x, train=True))  # rate 0: no rng needed
    train = jax.jit(lambda p, x, key: model.apply({"params": p}, x, train=True, rngs={"dropout": key}))
    train_a, train_b = train(params, x, jax.random.key(0)), train(params, x, jax.random.key(1))
    assert not np.allclose(train_a, eval_out)
    assert not np.allclose(train_a, train_b)
    with pytest.raises(Exception, match="dropout"):
        apply(model, params, x, train=True)  # training needs the 'dropout' rng stream


def test_drop_path_drops_whole_samples():
    x = jnp.ones((64, 5, 3))
    out = np.asarray(eva02.drop_path(x, 0.25, jax.random.key(0)))
    per_sample = out.reshape(64, -1)
    assert set(np.unique(per_sample).tolist()) <= {0.0, float(np.float32(1.0) / np.float32(0.75))}
    assert np.all(per_sample.min(1) == per_sample.max(1))
    assert 0 < np.sum(per_sample[:, 0] == 0) < 64


def test_layer_id_on_real_param_paths():
    model = tiny_model(depth=3)
    flat = traverse_util.flatten_dict(random_params(model))
    ids = {path: eva02.layer_id(("params",) + path, model.depth) for path in flat}
    assert ids[("cls_token",)] == ids[("pos_embed",)] == ids[("patch_embed", "kernel")] == 0
    assert ids[("blocks_0", "attn", "qkv", "kernel")] == 1
    assert ids[("blocks_2", "mlp", "fc2", "bias")] == 3
    assert ids[("fc_norm", "scale")] == ids[("head", "kernel")] == 4
    assert set(ids.values()) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="unknown"):
        eva02.layer_id(("decoder", "kernel"), 3)
    with pytest.raises(ValueError, match="depth 3"):
        eva02.layer_id(("blocks_3", "attn", "proj", "kernel"), 3)


# ------------------------------------------------------------------------------------------ sharding

@pytest.mark.parametrize("mesh_shape,fused", [((1, 8, 1), True), ((1, 2, 4), False)])
def test_sharded_forward_backward_equals_unsharded(mesh_shape, fused):
    model = tiny_model(qkv_fused=fused, scale_mlp=not fused, embed_dim=32, num_heads=4, depth=1)
    boxed = random_params(model, boxed=True)
    params = nn.meta.unbox(boxed)
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 1))
    labels = jnp.arange(8) % 3

    def loss_fn(p, x):
        logits = model.apply({"params": p}, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    with jax.default_matmul_precision("highest"):
        want_loss, want_grads = jax.jit(jax.value_and_grad(loss_fn))(params, x)
        mesh = sharding.make_mesh(mesh_shape)
        with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
            sharded = sharding.shard_params(boxed, mesh, RULES)
            attn = sharded["blocks_0"]["attn"]
            kernel = attn["qkv"]["kernel"] if fused else attn["q_proj"]["kernel"]
            axis = "fsdp" if mesh_shape[1] > 1 else "tensor"
            assert axis in jax.tree.leaves(tuple(kernel.sharding.spec)), kernel.sharding.spec
            # A fresh jit, traced under the rules, so the activation constraints are part of it.
            step = jax.jit(jax.value_and_grad(loss_fn))
            got_loss, got_grads = step(sharded, sharding.host_to_global(np.asarray(x), mesh))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
