"""The weight-import CLI: full-size models exported in PyTorch naming round-trip; wrong files are refused."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import REPO_ROOT
from xray_dit import checkpoint, sharding
from xray_dit.models import dit as dit_lib
from xray_dit.models import eva02 as eva02_lib
from xray_dit.models import vae as vae_lib
from xray_dit.models.weights import WeightImportError
from xray_dit.tools import import_weights
from xray_dit.train import model_factory


def _random_like(abstract, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.02, sharding.unbox(abstract))


@pytest.mark.parametrize("kind, model_name, extra", [
    ("dit", "DiT-S/2", {"image_size": 256, "num_classes": 1000}),
    ("vae", "sd-vae-gray", {}),
    ("eva02", "Ti", {"image_size": 224, "num_classes": 3}),
])
def test_full_size_model_round_trips_through_pytorch_names(tmp_path, kind, model_name, extra):
    model = import_weights.build_model(kind, model_name, image_size=extra.get("image_size", 256),
                                       num_classes=extra.get("num_classes"), in_channels=1)
    if kind == "dit":
        params = _random_like(dit_lib.abstract_params(model)["params"])
        state_dict = dit_lib.to_torch_state_dict(params, model)
    elif kind == "vae":
        params = _random_like(vae_lib.abstract_params(model)["params"])
        state_dict = vae_lib.to_diffusers_state_dict(params, model)
    else:
        params = _random_like(eva02_lib.abstract_params(model))
        state_dict = eva02_lib.to_timm_state_dict(params, model)
    src = tmp_path / "weights.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(src))

    result = subprocess.run([sys.executable, "-m", "xray_dit.tools.import_weights", f"--kind={kind}", f"--src={src}",
                             f"--out={tmp_path / 'export'}", f"--model={model_name}",
                             *[f"--{k}={v}" for k, v in extra.items()]],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    info = checkpoint.load_export_info(tmp_path / "export")
    assert info["kind"] == kind
    rebuilt = model_factory.model_from_info(info)
    loaded, _ = checkpoint.load_export(tmp_path / "export", params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert model_factory.model_fields(rebuilt) == model_factory.model_fields(model)
    if kind == "vae":
        assert info["scaling_factor"] == pytest.approx(0.18215)


def test_wrong_file_is_refused_with_the_list_and_nothing_written(tmp_path):
    model = import_weights.build_model("dit", "DiT-S/2", image_size=64, num_classes=0, in_channels=1)
    state_dict = dit_lib.to_torch_state_dict(_random_like(dit_lib.abstract_params(model)["params"]), model)
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
    state_dict = vae_lib.to_diffusers_state_dict(_random_like(vae_lib.abstract_params(vae)["params"]), vae)
    save_file(state_dict, str(tmp_path / "vae.safetensors"))
    with pytest.raises(WeightImportError, match="encoder"):
        import_weights.import_weights("dit", str(tmp_path / "vae.safetensors"), str(tmp_path / "out"),
                                      model_name="DiT-S/2", image_size=64, num_classes=0)
