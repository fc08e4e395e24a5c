"""The weight-import CLI: full-size models exported in PyTorch naming round-trip; wrong files are refused;
torch.save files are read without torch and without running their code."""

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import REPO_ROOT
from tools.make_resnet_golden import golden_state_dict
from xray_dit import checkpoint, sharding
from xray_dit.models import convert, factory
from xray_dit.models import resnet as resnet_lib
from xray_dit.models import vae as vae_lib
from xray_dit.models import weights
from xray_dit.models.convert import dit_torch, resnet_torchvision, vae_diffusers
from xray_dit.models.weights import WeightImportError
from xray_dit.tools import import_weights


def _random_like(abstract, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.02, sharding.unbox(abstract))


@pytest.mark.parametrize("kind, model_name, extra", [
    ("dit", "DiT-S/2", {"image_size": 256, "num_classes": 1000}),
    ("vae", "sd-vae-gray", {}),
    ("eva02", "Ti", {"image_size": 224, "num_classes": 3}),
    ("resnet", "resnet18", {"image_size": 224, "num_classes": 3}),
    ("resnet", "resnet50", {"image_size": 224, "num_classes": 3}),
])
def test_full_size_model_round_trips_through_pytorch_names(tmp_path, kind, model_name, extra):
    model = import_weights.build_model(kind, model_name, image_size=extra.get("image_size", 256),
                                       num_classes=extra.get("num_classes"), in_channels=1)
    # a ResNet export holds {"params", "batch_stats"}
    abstract = resnet_lib.abstract_variables(model) if kind == "resnet" else factory.abstract_params(model)
    params = _random_like(abstract)
    state_dict = convert.BY_KIND[kind].to_state_dict(params, model)
    src = tmp_path / "weights.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(src))

    result = subprocess.run([sys.executable, "-m", "xray_dit.tools.import_weights", f"--kind={kind}", f"--src={src}",
                             f"--out={tmp_path / 'export'}", f"--model={model_name}",
                             *[f"--{k}={v}" for k, v in extra.items()]],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    info = checkpoint.load_export_info(tmp_path / "export")
    assert info["kind"] == kind
    rebuilt = factory.model_from_info(info)
    loaded, _ = checkpoint.load_export(tmp_path / "export", params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert factory.model_fields(rebuilt) == factory.model_fields(model)
    if kind == "vae":
        assert info["scaling_factor"] == pytest.approx(0.18215)


def test_wrong_file_is_refused_with_the_list_and_nothing_written(tmp_path):
    model = import_weights.build_model("dit", "DiT-S/2", image_size=64, num_classes=0, in_channels=1)
    state_dict = dit_torch.to_state_dict(_random_like(factory.abstract_params(model)), model)
    state_dict["not.a.dit.tensor"] = np.zeros(3, np.float32)
    del state_dict["final_layer.linear.bias"]
    src = tmp_path / "bad.safetensors"
    save_file(state_dict, str(src))
    result = subprocess.run([sys.executable, "-m", "xray_dit.tools.import_weights", "--kind=dit", f"--src={src}",
                             f"--out={tmp_path / 'export'}", "--model=DiT-S/2", "--image_size=64", "--num_classes=0"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "not.a.dit.tensor" in result.stderr and "final_layer.linear.bias" in result.stderr
    assert "Nothing was written" in result.stderr
    assert not (tmp_path / "export").exists()


def test_vae_weights_given_as_dit_are_refused(tmp_path):
    vae = vae_lib.make_vae(dict(in_channels=1, out_channels=1, block_out_channels=(32, 32), layers_per_block=1))
    state_dict = vae_diffusers.to_state_dict(_random_like(factory.abstract_params(vae)), vae)
    save_file(state_dict, str(tmp_path / "vae.safetensors"))
    with pytest.raises(WeightImportError, match="encoder"):
        import_weights.import_weights("dit", str(tmp_path / "vae.safetensors"), str(tmp_path / "out"),
                                      model_name="DiT-S/2", image_size=64, num_classes=0)


# ---------------------------------------------------------------------------------------------- ResNet sources
GOLDEN = REPO_ROOT / "tests" / "golden"


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_and_timm_resnet_names_both_import_with_the_gray_rule(name):
    entries = json.loads((GOLDEN / "resnet_golden.json").read_text())["models"][name]
    model = resnet_lib.make_resnet(name, num_classes=2, in_channels=1, img_size=64)
    for source in ("state_dict", "timm_state_dict"):
        state_dict = golden_state_dict(entries[source])
        with pytest.warns(UserWarning, match="head for 5 classes"):
            variables = resnet_torchvision.from_state_dict(state_dict, model, source=source)
        np.testing.assert_allclose(variables["params"]["conv1"]["kernel"][:, :, 0, :],
                                   state_dict["conv1.weight"].sum(axis=1).transpose(1, 2, 0), rtol=1e-6)
        np.testing.assert_array_equal(variables["batch_stats"]["layer4_0"]["downsample_1"]["var"],
                                      state_dict["layer4.0.downsample.1.running_var"])


def test_real_torch_save_file_imports_and_a_wrong_file_writes_nothing(tmp_path):
    src = GOLDEN / "resnet_tiny.pth"   # written by torch.save (tools/make_resnet_golden.py), float16 tensors
    info = import_weights.import_weights("resnet", str(src), str(tmp_path / "export"), model_name="resnet_tiny",
                                         image_size=64, num_classes=5, in_channels=3)
    assert info["kind"] == "resnet" and info["model"]["in_channels"] == 3
    model = factory.model_from_info(info)
    loaded, _ = checkpoint.load_export(tmp_path / "export", sharding.unbox(resnet_lib.abstract_variables(model)))
    entries = json.loads((GOLDEN / "resnet_golden.json").read_text())["models"]["resnet_tiny"]["state_dict"]
    want = golden_state_dict(entries)
    np.testing.assert_array_equal(loaded["params"]["layer3_0"]["conv2"]["kernel"],
                                  want["layer3.0.conv2.weight"].astype(np.float16).astype(np.float32)
                                  .transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded["batch_stats"]["bn1"]["mean"],
                                  want["bn1.running_mean"].astype(np.float16).astype(np.float32))

    broken = dict(weights.load_state_dict(src))
    broken["layer9.0.conv1.weight"] = np.zeros((3, 3), np.float32)
    del broken["layer2.0.downsample.0.weight"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(weights.WeightImportError, match="layer9.0.conv1.weight(.|\n)*layer2.0.downsample.0.weight"):
        import_weights.import_weights("resnet", str(tmp_path / "broken.safetensors"), str(tmp_path / "nothing"),
                                      model_name="resnet_tiny", image_size=64, num_classes=5)
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("name", ["torch_legacy.pth", "torch_checkpoint.pth"])
def test_torch_files_of_both_formats_and_training_checkpoints_are_read_without_torch(name):
    want = np.load(GOLDEN / "torch_files.npz")
    got = weights.load_state_dict(GOLDEN / name)
    assert set(got) == set(want.files)
    for key in want.files:   # views and transposes come out as their values; half/bfloat16 as float32
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got[key].dtype == (np.float32 if want[key].dtype.kind == "f" else want[key].dtype)
    assert "torch" not in sys.modules


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_torch_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"weight": _RunsACommand(marker)}, protocol=2))
    (tmp_path / "evil.pth").write_bytes(buffer.getvalue())
    with pytest.raises(weights.WeightImportError, match=r"holding \w+\.system objects\), not a state dict"):
        weights.load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()
