"""Golden reference tensors of torchvision's ResNets for `xray_dit/models/resnet.py` (parity test:
tests/test_resnet.py). Runs in a PyTorch environment, not the project's:

    /opt/torchref/bin/python tools/make_resnet_golden.py --out tests/golden/

For each of torchvision's `resnet18(num_classes=5)` and `resnet50(num_classes=5)`: the weights are drawn
with numpy by `golden_state_dict` (numpy only, so the test draws the same weights from the names and shapes
recorded in the .json instead of storing ~150 MB of them), loaded with `strict=True`; BatchNorm running
statistics are non-trivial; then `model.eval()` under `torch.no_grad()` on CPU in float32 runs a fixed
input (stored), and the logits, the pooled features and some intermediate feature maps (NCHW) are saved
to `resnet_golden.npz`; `resnet_golden.json` lists every key, the versions and the exact calls. The json
also records, per output, the largest difference between this float32 run and the same run in float64.

`resnet_tiny` is not a torchvision architecture (torchvision's stem is always 64 wide); it is built from
the same blocks as resnet18 (basic blocks), which the resnet18 golden covers.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import zlib

import numpy as np

SEED = 20240611
NUM_CLASSES = 5
INPUT_SHAPE = (2, 3, 64, 64)
MODELS = ("resnet18", "resnet50")
# Intermediate outputs kept per model (module name in torchvision → key); the larger maps of resnet50 are
# left out to keep the file small.
INTERMEDIATES = {"resnet18": ("maxpool", "layer1", "layer2", "layer3", "layer4"),
                 "resnet50": ("maxpool", "layer3", "layer4")}
WEIGHT_RECIPE = ("per tensor, numpy default_rng([SEED, crc32(name)]): conv weight N(0,1)·sqrt(2/fan_in); "
                 "fc.weight N(0,1)·sqrt(1/fan_in); fc.bias and BatchNorm bias N(0,1)·0.1; BatchNorm weight "
                 "U(0.5, 1.5); running_mean N(0,1)·0.1; running_var U(0.5, 2.0); num_batches_tracked 7")


def golden_state_dict(entries, seed: int = SEED) -> dict[str, np.ndarray]:
    """The deterministic weights of WEIGHT_RECIPE for [(name, shape), ...] (any order); numpy only."""
    out = {}
    for name, shape in entries:
        shape = tuple(int(s) for s in shape)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[name] = np.asarray(7, np.int64)
            continue
        if leaf == "running_mean":
            value = 0.1 * rng.standard_normal(shape)
        elif leaf == "running_var":
            value = rng.uniform(0.5, 2.0, shape)
        elif leaf == "weight" and len(shape) == 4:
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif leaf == "weight" and len(shape) == 2:
            value = rng.standard_normal(shape) * np.sqrt(1.0 / shape[1])
        elif leaf == "weight":
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        out[name] = value.astype(np.float32)
    return out


def _run(model, x, names):
    """Logits, pooled features and the named modules' outputs of one eval-mode forward pass."""
    import torch
    captured = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
             for n in (*names, "avgpool")]
    with torch.no_grad():
        logits = model(x)
    for hook in hooks:
        hook.remove()
    return logits, torch.flatten(captured["avgpool"], 1), {n: captured[n] for n in names}


def make(name: str, x: np.ndarray):
    import torch
    import torchvision
    model = getattr(torchvision.models, name)(num_classes=NUM_CLASSES)
    entries = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    weights = golden_state_dict(entries)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, strict=True)
    model.eval()
    logits, features, inter = _run(model, torch.from_numpy(x), INTERMEDIATES[name])
    arrays = {f"{name}/logits": logits, f"{name}/features": features,
              **{f"{name}/inter/{'stem' if k == 'maxpool' else k}": v for k, v in inter.items()}}
    arrays = {k: v.numpy().astype(np.float32) for k, v in arrays.items()}
    logits64, features64, inter64 = _run(model.double(), torch.from_numpy(x).double(), INTERMEDIATES[name])
    reference64 = {f"{name}/logits": logits64, f"{name}/features": features64,
                   **{f"{name}/inter/{'stem' if k == 'maxpool' else k}": v for k, v in inter64.items()}}
    float64_diff = {k: float(np.abs(arrays[k] - reference64[k].numpy()).max()) for k in arrays}
    call = (f"torchvision.models.{name}(num_classes={NUM_CLASSES}); load_state_dict(golden_state_dict(...), "
            f"strict=True); eval(); no_grad(); logits = model(x); features = flatten(avgpool output, 1); "
            f"forward hooks on {', '.join(INTERMEDIATES[name])} (maxpool saved as inter/stem)")
    return arrays, {"state_dict": [[k, list(s)] for k, s in entries], "call": call,
                    "float32_vs_float64_max_abs_diff": float64_diff}


def main() -> None:
    import torch
    import torchvision
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for resnet_golden.npz and resnet_golden.json")
    out = pathlib.Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    x = np.random.default_rng(SEED).standard_normal(INPUT_SHAPE).astype(np.float32)
    arrays, models = {"x": x}, {}
    for name in MODELS:
        model_arrays, models[name] = make(name, x)
        arrays.update(model_arrays)
    np.savez(out / "resnet_golden.npz", **arrays)
    keys = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}
    keys["x"]["description"] = f"input, NCHW, numpy default_rng({SEED}).standard_normal"
    info = {"keys": keys, "models": models, "seed": SEED, "num_classes": NUM_CLASSES, "weights": WEIGHT_RECIPE,
            "layouts": "images and feature maps NCHW; logits (N, classes); features (N, C) = flattened avgpool",
            "mode": "CPU, float32, model.eval(), torch.no_grad(), torch.set_num_threads(1)",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "numpy": np.__version__}}
    (out / "resnet_golden.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out / 'resnet_golden.npz'} ({(out / 'resnet_golden.npz').stat().st_size:,} bytes) and "
          f"{out / 'resnet_golden.json'}; float32 vs float64: "
          + ", ".join(f"{k} {v:.1e}" for m in models.values() for k, v in m["float32_vs_float64_max_abs_diff"].items()))


if __name__ == "__main__":
    main()
