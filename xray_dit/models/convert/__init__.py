"""PyTorch-name converters, one module per source format, each with the same two functions:

    from_state_dict(state_dict, model, *, source, ...) -> params   (unboxed numpy tree, `model.param_dtype`)
    to_state_dict(params, model) -> {PyTorch name: array}           (the inverse, float32 PyTorch layouts)

`dit_torch`: facebookresearch/DiT checkpoints; `vae_diffusers`: diffusers `AutoencoderKL`; `eva02_timm`:
timm `Eva`; `resnet_torchvision`: torchvision and timm ResNets (its params come with their BatchNorm
statistics: {"params", "batch_stats"}). Reading files and the strict bookkeeping they share live in `models/weights.py`.
"""

from xray_dit.models.convert import dit_torch, eva02_timm, resnet_torchvision, vae_diffusers

BY_KIND = {"dit": dit_torch, "vae": vae_diffusers, "eva02": eva02_timm, "resnet": resnet_torchvision}
