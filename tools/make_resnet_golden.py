"""Golden reference tensors of torchvision's ResNets for `xray_dit/models/resnet.py` (parity test:
tests/test_resnet.py). Runs in a PyTorch environment, not the project's:

    /opt/torchref/bin/python tools/make_resnet_golden.py --out tests/golden/

For torchvision's `resnet18(num_classes=5)` and `resnet50(num_classes=5)` and for `resnet_tiny`: the
weights are drawn with numpy by `golden_state_dict` (numpy only, so the test draws the same weights from
the names and shapes recorded in the .json instead of storing ~150 MB of them) and loaded with
`strict=True`; BatchNorm running statistics are non-trivial; then `model.eval()` under `torch.no_grad()`
on CPU in float32 runs a fixed input (stored), and the logits, the pooled features and some intermediate
feature maps (NCHW) go to `resnet_golden.npz`; `resnet_golden.json` lists every key, the versions and the
exact calls, and per output the largest difference between this float32 run and the same run in float64.

`resnet_tiny` (one basic block per stage, widths 16..128) is not expressible as `torchvision.models.ResNet`
(whose stem is always 64 wide); it is assembled from torchvision's own `ResNet._make_layer` and
`BasicBlock`, with float16-rounded weights that are also written with `torch.save` as `resnet_tiny.pth`,
the real torch file the importer's tests read. `torch_legacy.pth` (the pre-1.6 format) and
`torch_checkpoint.pth` (a training checkpoint: the state dict under "model" beside an `argparse.Namespace`)
hold a few small tensors, listed with their values in `torch_files.npz`. The json also lists the names and
shapes of timm's resnet18/resnet50 state dicts (`timm_state_dict`; needs timm, 1.0.31 here).
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
MODELS = ("resnet18", "resnet50", "resnet_tiny")
# Intermediate outputs kept per model (module name in torchvision → key); a few, to keep the file small.
INTERMEDIATES = {"resnet18": ("maxpool", "layer2", "layer4"), "resnet50": ("layer3", "layer4"),
                 "resnet_tiny": ("maxpool", "layer1", "layer2", "layer3", "layer4")}
TINY_WIDTHS = (16, 32, 64, 128)
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


def tiny_resnet():
    """resnet_tiny from torchvision's parts: ResNet(BasicBlock, [1, 1, 1, 1]) with every layer rebuilt narrower."""
    from torch import nn
    from torchvision.models import resnet
    model = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=NUM_CLASSES)
    model.inplanes = TINY_WIDTHS[0]
    model.conv1 = nn.Conv2d(3, TINY_WIDTHS[0], kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(TINY_WIDTHS[0])
    for stage, width in enumerate(TINY_WIDTHS):
        setattr(model, f"layer{stage + 1}", model._make_layer(resnet.BasicBlock, width, 1, stride=1 if stage == 0 else 2))
    model.fc = nn.Linear(TINY_WIDTHS[-1], NUM_CLASSES)
    return model


def make(name: str, x: np.ndarray, out: pathlib.Path):
    import torch
    import torchvision
    model = tiny_resnet() if name == "resnet_tiny" else getattr(torchvision.models, name)(num_classes=NUM_CLASSES)
    entries = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    weights = golden_state_dict(entries)
    if name == "resnet_tiny":
        weights = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in weights.items()}
        torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, out / "resnet_tiny.pth")
        weights = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in weights.items()}
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
    built = "tiny_resnet()" if name == "resnet_tiny" else f"torchvision.models.{name}(num_classes={NUM_CLASSES})"
    call = (f"{built}; load_state_dict(golden_state_dict(...){' rounded to float16' * (name == 'resnet_tiny')}, "
            f"strict=True); eval(); no_grad(); logits = model(x); features = flatten(avgpool output, 1); "
            f"forward hooks on {', '.join(INTERMEDIATES[name])} (maxpool saved as inter/stem)")
    info = {"state_dict": [[k, list(s)] for k, s in entries], "call": call,
            "float32_vs_float64_max_abs_diff": float64_diff}
    if name != "resnet_tiny":
        import timm
        timm_model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
        info["timm_state_dict"] = [[k, list(v.shape)] for k, v in timm_model.state_dict().items()]
        info["timm_call"] = f"timm.create_model({name!r}, pretrained=False, num_classes={NUM_CLASSES}).state_dict()"
    return arrays, info


def write_torch_files(out: pathlib.Path) -> None:
    """Small torch.save files in the legacy format and as a training checkpoint, and their values."""
    import argparse as argparse_lib
    import collections

    import torch
    base = torch.from_numpy(np.random.default_rng(SEED).standard_normal((4, 6)).astype(np.float32))
    tensors = collections.OrderedDict(
        matrix=base, strided_view=base[1:3, ::2], transposed=base.t(), count=torch.tensor(7),
        half=base[0].half(), bfloat16=base[1].bfloat16(), parameter=torch.nn.Parameter(base[2].clone()))
    torch.save(tensors, out / "torch_legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"model": tensors, "args": argparse_lib.Namespace(lr=0.1), "epoch": 3}, out / "torch_checkpoint.pth")
    np.savez(out / "torch_files.npz", **{k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
                                        for k, v in tensors.items()})


def _timm_version() -> str:
    import timm
    return timm.__version__


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
        model_arrays, models[name] = make(name, x, out)
        arrays.update(model_arrays)
    np.savez(out / "resnet_golden.npz", **arrays)
    keys = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}
    keys["x"]["description"] = f"input, NCHW, numpy default_rng({SEED}).standard_normal"
    info = {"keys": keys, "models": models, "seed": SEED, "num_classes": NUM_CLASSES, "weights": WEIGHT_RECIPE,
            "layouts": "images and feature maps NCHW; logits (N, classes); features (N, C) = flattened avgpool",
            "mode": "CPU, float32, model.eval(), torch.no_grad(), torch.set_num_threads(1)",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "timm": _timm_version(), "numpy": np.__version__}}
    (out / "resnet_golden.json").write_text(json.dumps(info, indent=1) + "\n")
    write_torch_files(out)
    print(f"wrote {out / 'resnet_golden.npz'} ({(out / 'resnet_golden.npz').stat().st_size:,} bytes) and "
          f"{out / 'resnet_golden.json'}; float32 vs float64: "
          + ", ".join(f"{k} {v:.1e}" for m in models.values() for k, v in m["float32_vs_float64_max_abs_diff"].items()))


if __name__ == "__main__":
    main()
