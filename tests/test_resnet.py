"""ResNet classifier: golden parity with torchvision through the converter, the gray-input rule, the head,
BatchNorm's two modes, refused files and layer ids."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from tests.helpers.golden import assert_close, nhwc
from tools.make_resnet_golden import golden_state_dict
from xray_dit import sharding
from xray_dit.models import resnet
from xray_dit.models.convert import resnet_torchvision as convert
from xray_dit.models.weights import WeightImportError, load_state_dict

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"


def random_variables(model, seed=0):
    """Variables with the model's real structure, drawn with numpy (no initialiser compiled)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        scale = 1.0 if name == "scale" else 0.0
        return (scale + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, sharding.unbox(resnet.abstract_variables(model)))


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet_tiny"])
def test_golden_parity_with_torchvision(tmp_path, name):
    """resnet18/50 through a safetensors file of the regenerated weights; resnet_tiny through the real
    torch.save file the generator wrote."""
    golden = np.load(GOLDEN_DIR / "resnet_golden.npz")
    info = json.loads((GOLDEN_DIR / "resnet_golden.json").read_text())
    path = GOLDEN_DIR / "resnet_tiny.pth"
    if name != "resnet_tiny":
        path = tmp_path / "model.safetensors"
        save_file(golden_state_dict(info["models"][name]["state_dict"]), str(path))
    model = resnet.make_resnet(name, num_classes=info["num_classes"], in_channels=3, img_size=64)
    variables = convert.from_torchvision_state_dict(load_state_dict(path), model)

    def forward(variables, x):   # one program: compiling ResNet-50 costs more CPU than running it
        logits, state = model.apply(variables, x, mutable=["intermediates"])
        return logits, state["intermediates"], model.apply(variables, x, method="features")

    with jax.default_matmul_precision("highest"):
        logits, intermediates, pooled = jax.jit(forward)(variables, nhwc(golden["x"]))
    assert_close(logits, golden[f"{name}/logits"])
    assert_close(pooled, golden[f"{name}/features"])
    keys = [k for k in golden.files if k.startswith(f"{name}/inter/")]
    assert len(keys) >= 2
    for key in keys:
        assert_close(intermediates[key.rsplit("/", 1)[-1]][0], nhwc(golden[key]))


# ---------------------------------------------------------------------------------------------- import rules

def test_gray_model_from_rgb_weights_computes_what_the_rgb_model_computes_on_three_copies():
    rgb = resnet.make_resnet("resnet_tiny", num_classes=3, in_channels=3, img_size=32)
    gray = resnet.make_resnet("resnet_tiny", num_classes=3, in_channels=1, img_size=32)
    state_dict = convert.to_torchvision_state_dict(random_variables(rgb), rgb)
    gray_variables = convert.from_torchvision_state_dict(state_dict, gray)
    assert gray_variables["params"]["conv1"]["kernel"].shape == (7, 7, 1, 16)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(rgb.apply)(convert.from_torchvision_state_dict(state_dict, rgb), np.repeat(images, 3, axis=-1))
        got = jax.jit(gray.apply)(gray_variables, images)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_head_for_other_classes_is_replaced_and_a_missing_one_initialised(caplog):
    model = resnet.make_resnet("resnet_tiny", num_classes=3, in_channels=1, img_size=32)
    imagenet = resnet.make_resnet("resnet_tiny", num_classes=1000, in_channels=1, img_size=32)
    state_dict = convert.to_torchvision_state_dict(random_variables(imagenet), imagenet)
    with pytest.warns(UserWarning, match="1000 classes.*has 3"):
        variables = convert.from_torchvision_state_dict(state_dict, model)
    assert variables["params"]["fc"]["kernel"].shape == (128, 3)
    np.testing.assert_array_equal(variables["params"]["layer4_0"]["conv2"]["kernel"],
                                  np.transpose(state_dict["layer4.0.conv2.weight"], (2, 3, 1, 0)))
    del state_dict["fc.weight"], state_dict["fc.bias"]
    headless = convert.from_torchvision_state_dict(state_dict, model)
    np.testing.assert_array_equal(headless["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])


def test_round_trip_keeps_every_tensor_and_data_parallel_prefix_is_stripped():
    model = resnet.make_resnet("resnet_tiny", num_classes=3, in_channels=1, img_size=32)
    variables = random_variables(model)
    state_dict = convert.to_torchvision_state_dict(variables, model)
    assert "layer2.0.downsample.1.running_var" in state_dict and "layer1.0.bn1.num_batches_tracked" in state_dict
    back = convert.from_torchvision_state_dict({f"module.{k}": v for k, v in state_dict.items()}, model)
    want = traverse_util.flatten_dict(variables)
    got = traverse_util.flatten_dict(back)
    assert set(got) == set(want)
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def test_wrong_files_are_refused_naming_the_tensors():
    model = resnet.make_resnet("resnet_tiny", num_classes=3, in_channels=1, img_size=32)
    state_dict = convert.to_torchvision_state_dict(random_variables(model), model)
    broken = dict(state_dict, **{"layer1.0.extra.weight": np.zeros(3, np.float32)})
    del broken["layer3.0.bn2.running_mean"]
    with pytest.raises(WeightImportError, match="layer1.0.extra.weight(.|\n)*layer3.0.bn2.running_mean"):
        convert.from_torchvision_state_dict(broken, model)
    deep_stem = dict(state_dict, **{"conv1.0.weight": np.zeros((32, 3, 3, 3), np.float32)})
    with pytest.raises(WeightImportError, match="deep stem.*ResNet-D"):
        convert.from_torchvision_state_dict(deep_stem, model)
    bigger = resnet.make_resnet("resnet18", num_classes=3, in_channels=1, img_size=32)
    with pytest.raises(WeightImportError, match="shape mismatch at params/layer1_0/conv1/kernel"):
        convert.from_torchvision_state_dict(state_dict, bigger)


# ---------------------------------------------------------------------------------------------- BatchNorm

def test_training_mode_updates_running_statistics_and_eval_mode_uses_them():
    model = resnet.make_resnet("resnet_tiny", num_classes=2, in_channels=1, img_size=32)
    variables = random_variables(model)
    images = jnp.asarray(np.random.default_rng(2).normal(0.5, 2.0, (4, 32, 32, 1)), jnp.float32)
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    in_training, updates = train(variables, images)
    # Running averages move a tenth of the way (torchvision's momentum 0.1) to the batch's statistics.
    stem = jax.lax.conv_general_dilated(images, variables["params"]["conv1"]["kernel"], (2, 2), ((3, 3), (3, 3)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)
    old, new = variables["batch_stats"]["bn1"], updates["batch_stats"]["bn1"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * stem.var((0, 1, 2)), rtol=1e-4, atol=1e-5)
    # Eval mode: an image's output does not depend on the rest of the batch; training mode: it does.
    others = images.at[1:].set(-images[1:] * 3.0)
    evaluate = jax.jit(model.apply)
    np.testing.assert_allclose(evaluate(variables, images)[0], evaluate(variables, others)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(in_training[0], train(variables, others)[0][0], atol=1e-3)


def test_input_layout_errors_say_what_to_do():
    model = resnet.make_resnet("resnet_tiny", num_classes=2, in_channels=1, img_size=32)
    variables = random_variables(model)
    with pytest.raises(ValueError, match="NCHW; transpose to NHWC"):
        model.apply(variables, jnp.zeros((2, 1, 32, 32)))
    with pytest.raises(ValueError, match="unknown ResNet 'resnet101'"):
        resnet.make_resnet("resnet101", num_classes=2)


def test_layer_ids_for_layer_decay():
    model = resnet.make_resnet("resnet_tiny", num_classes=2, in_channels=1, img_size=32)
    params = sharding.unbox(resnet.abstract_variables(model))["params"]
    ids = {path: resnet.layer_id(path, 4) for path in traverse_util.flatten_dict(params)}
    assert ids[("conv1", "kernel")] == 0 and ids[("bn1", "scale")] == 0
    assert ids[("layer3_0", "downsample_0", "kernel")] == 3
    assert ids[("fc", "kernel")] == 5
    with pytest.raises(ValueError, match="unknown ResNet parameter path"):
        resnet.layer_id(("layer9_0", "conv1", "kernel"), 4)
