"""Converts a PyTorch-named state dict into a model export that configs can name as initialisation.

    python -m xray_dit.tools.import_weights --kind=vae --src=diffusion_pytorch_model.safetensors --out=weights/sd_vae
    python -m xray_dit.tools.import_weights --kind=eva02 --model=S --image_size=224 --num_classes=3 \\
        --src=model.safetensors --out=weights/eva02_s
    python -m xray_dit.tools.import_weights --kind=dit --model=DiT-XL/2 --image_size=256 --num_classes=1000 \\
        --src=DiT-XL-2-256x256.safetensors --out=weights/dit_xl
    python -m xray_dit.tools.import_weights --kind=resnet --model=resnet50 --image_size=256 --num_classes=14 \\
        --src=resnet50-11ad3fa6.pth --out=weights/resnet50

Sources: `.safetensors` (timm hub `model.safetensors`, diffusers `diffusion_pytorch_model.safetensors`),
`.npz`, or a `torch.save` file (`.pth`/`.pt`/`.bin`: torchvision's hub weights, a training checkpoint's
`state_dict`/`model` entry), read without torch. For DiT `train.py` checkpoints, save the `"ema"` entry
as its own file first. ResNet takes torchvision's and timm's resnet18/34/50 names alike
(`models/convert/resnet_torchvision.py`). Any tensor that maps to nothing, is missing or has the wrong
shape stops the import with the full list; nothing is written then.
Then: `--config.classifier.init_from=weights/eva02_s` (or `weights/resnet50`), `--config.vae.init_from=
weights/sd_vae` (fine-tune) or `--config.dit.vae_dir=weights/sd_vae` (use as is).
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging

from xray_dit import checkpoint
from xray_dit.models import dit as dit_lib
from xray_dit.models import eva02 as eva02_lib
from xray_dit.models import resnet as resnet_lib
from xray_dit.models import vae as vae_lib
from xray_dit.models import weights
from xray_dit.models.convert import resnet_torchvision
from xray_dit.train import model_factory

_KIND = flags.DEFINE_enum("kind", None, ["dit", "vae", "eva02", "resnet"], "Which model the weights are for.")
_SRC = flags.DEFINE_string("src", None, "The state dict: .safetensors, .npz or .pth/.pt/.bin, PyTorch names.")
_OUT = flags.DEFINE_string("out", None, "Folder for the export (params/ + model.json).")
_MODEL = flags.DEFINE_string("model", None, "dit: DiT-XL/2 …; vae: a preset (sd-vae-gray, sd-vae-ft-mse, …); "
                             "eva02: Ti | S | B; resnet: resnet18 | resnet34 | resnet50. "
                             "Default: DiT-XL/2, sd-vae-gray, S, resnet50.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Image size the model will run at (DiT: latent = size/8).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "dit: label count (1000 for the released DiT); "
                                    "eva02/resnet: classifier outputs (a head of another size is re-initialised).")
_IN_CHANNELS = flags.DEFINE_integer("in_channels", 1, "eva02/resnet/vae image channels: 1 (X-rays; RGB weights "
                                    "are adapted) or 3.")

DEFAULT_MODEL = {"dit": "DiT-XL/2", "vae": "sd-vae-gray", "eva02": "S", "resnet": "resnet50"}


def build_model(kind: str, model_name: str, *, image_size: int, num_classes: int | None, in_channels: int):
    if kind == "dit":
        return dit_lib.make_dit(model_name, input_size=image_size // 8, num_classes=num_classes or 0)
    if kind == "vae":
        return vae_lib.make_vae(model_name, in_channels=in_channels, out_channels=in_channels)
    if kind == "resnet":
        return resnet_lib.make_resnet(model_name, img_size=image_size, num_classes=num_classes or 1,
                                      in_channels=in_channels)
    return eva02_lib.make_eva02(model_name, img_size=image_size, num_classes=num_classes or 1,
                                in_channels=in_channels)


def import_weights(kind: str, src: str, out: str, *, model_name: str | None = None, image_size: int = 256,
                   num_classes: int | None = None, in_channels: int = 1) -> dict:
    """Reads `src`, maps it onto the model (refusing any mismatch), writes the export; returns its info."""
    model_name = model_name or DEFAULT_MODEL[kind]
    model = build_model(kind, model_name, image_size=image_size, num_classes=num_classes, in_channels=in_channels)
    state_dict = weights.load_state_dict(src)
    if kind == "dit":
        params = dit_lib.from_torch_state_dict(state_dict, model, source=src)["params"]
    elif kind == "vae":
        params = vae_lib.from_diffusers_state_dict(state_dict, model, source=src)["params"]
    elif kind == "resnet":   # with its BatchNorm statistics: {"params", "batch_stats"}
        params = resnet_torchvision.from_torchvision_state_dict(state_dict, model, source=src)
    else:
        params = eva02_lib.from_timm_state_dict(state_dict, model, source=src)
    info = {"kind": kind, "model": model_factory.model_fields(model), "source": str(src), "name": model_name}
    if kind == "vae":
        info["scaling_factor"] = float(model.scaling_factor)
    checkpoint.save_export(out, jax.tree.map(jax.numpy.asarray, params), info)
    logging.info("wrote %s export of %s to %s", kind, src, out)
    return info


def main(argv):
    del argv
    for flag in (_KIND, _SRC, _OUT):
        if flag.value is None:
            raise app.UsageError(f"--{flag.name} is required")
    try:
        import_weights(_KIND.value, _SRC.value, _OUT.value, model_name=_MODEL.value, image_size=_IMAGE_SIZE.value,
                       num_classes=_NUM_CLASSES.value, in_channels=_IN_CHANNELS.value)
    except (weights.WeightImportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}\nNothing was written to {_OUT.value}.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
