"""Models from configs, and back: the fields that rebuild a model are stored with every export.

An export (`checkpoint.save_export`) carries `info["model"]`, the model's constructor fields, so a later
task (the DiT reading the VAE, `sample` reading the DiT) rebuilds exactly the trained architecture
without needing the config of the run that trained it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from xray_dit.models import dit as dit_lib
from xray_dit.models import eva02 as eva02_lib
from xray_dit.models import resnet as resnet_lib
from xray_dit.models import vae as vae_lib

KINDS = {"dit": dit_lib.DiT, "vae": vae_lib.AutoencoderKL, "eva02": eva02_lib.Eva02, "resnet": resnet_lib.ResNet}


def dtype_from_name(name: str) -> Any:
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {name!r}")
    return jnp.dtype(name)


def attention_impl(config: ml_collections.ConfigDict) -> str:
    """`config.attention_impl`, with "auto" resolved: cuDNN's fused attention where it runs (NVIDIA GPUs with
    a 16-bit compute dtype; +24 % DiT-B/2 training speed on an H200, bench/RESULTS.md), XLA's elsewhere."""
    if config.attention_impl != "auto":
        return config.attention_impl
    sixteen_bit = dtype_from_name(config.compute_dtype) in (jnp.dtype("bfloat16"), jnp.dtype("float16"))
    return "cudnn" if jax.default_backend() == "gpu" and sixteen_bit else "xla"


def model_fields(model) -> dict:
    """JSON-able constructor fields (dtypes as names) of a Flax module dataclass."""
    fields = {}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name"):
            continue
        value = getattr(model, f.name)
        if f.name.endswith("dtype"):
            value = jnp.dtype(value).name
        elif isinstance(value, tuple):
            value = list(value)
        fields[f.name] = value
    return fields


def kind_of(model) -> str:
    """The export kind of a model (the key of `KINDS` its class is under)."""
    for kind, cls in KINDS.items():
        if isinstance(model, cls):
            return kind
    raise ValueError(f"no export kind for a {type(model).__name__}; expected one of {sorted(KINDS)}")


def model_from_info(info: dict, **overrides):
    """Rebuilds the model of an export; `overrides` (e.g. dtype for inference) win."""
    kind = info.get("kind")
    if kind not in KINDS:
        raise ValueError(f"export of unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    fields = dict(info["model"], **overrides)
    for key, value in list(fields.items()):
        if key.endswith("dtype") and isinstance(value, str):
            fields[key] = jnp.dtype(value)
        elif isinstance(value, list):
            fields[key] = tuple(value)
    return KINDS[kind](**fields)


def _check_classifier_patch(config: ml_collections.ConfigDict) -> None:
    if config.classifier.model in resnet_lib.RESNET_SIZES:   # no patches: any size pools to one vector
        return
    size, patch = int(config.data.image_size), int(config.classifier.patch_size)
    if size and patch and size % patch:
        raise ValueError(f"image size {size} is not divisible by the classifier's patch size {patch}; change "
                         f"data.image_size (e.g. {_nearby_multiples(size, patch)}) or classifier.patch_size")


def classifier_from_config(config: ml_collections.ConfigDict, *, num_classes: int):
    """`classifier.model` names an EVA-02 size (tiny, Ti, S, B) or a ResNet (resnet_tiny, resnet18/34/50)."""
    c = config.classifier
    if c.model in resnet_lib.RESNET_SIZES:
        return _resnet_from_config(config, num_classes=num_classes)
    if c.model not in eva02_lib.EVA02_SIZES:
        raise ValueError(f"unknown classifier.model {c.model!r}; choose an EVA-02 size "
                         f"({', '.join(eva02_lib.EVA02_SIZES)}) or a ResNet ({', '.join(resnet_lib.RESNET_SIZES)})")
    _check_classifier_patch(config)
    overrides = {k: v for k, v in dict(embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads).items() if v}
    return eva02_lib.make_eva02(c.model, img_size=config.data.image_size, num_classes=num_classes, in_channels=1,
                                patch_size=c.patch_size, drop_path_rate=c.drop_path_rate,
                                dtype=dtype_from_name(config.compute_dtype), attention_impl=attention_impl(config),
                                **overrides)


def _resnet_from_config(config: ml_collections.ConfigDict, *, num_classes: int):
    c = config.classifier
    for key in ("drop_path_rate", "embed_dim", "depth", "num_heads"):
        if c[key]:
            raise ValueError(f"classifier.{key}={c[key]} is an EVA-02 setting that {c.model} does not have; "
                             f"set --config.classifier.{key}=0")
    return resnet_lib.make_resnet(c.model, img_size=config.data.image_size, num_classes=num_classes, in_channels=1,
                                  dtype=dtype_from_name(config.compute_dtype))


def vae_from_config(config: ml_collections.ConfigDict):
    v = config.vae
    model = vae_lib.make_vae(dict(in_channels=1, out_channels=1, block_out_channels=tuple(v.block_out_channels),
                                  layers_per_block=v.layers_per_block, latent_channels=v.latent_channels,
                                  norm_num_groups=v.norm_num_groups),
                             # The mid-block attention is one head as wide as the channels (512 in SD),
                             # beyond cuDNN's fused-attention limit of 256; it is a small cost, so XLA's.
                             dtype=dtype_from_name(config.compute_dtype), attention_impl="xla")
    if config.data.image_size % model.downsample_factor:
        raise ValueError(f"image size {config.data.image_size} is not divisible by the VAE's downsampling "
                         f"factor {model.downsample_factor}; change data.image_size "
                         f"(e.g. {_nearby_multiples(config.data.image_size, model.downsample_factor)}) "
                         "or vae.block_out_channels")
    return model


def _nearby_multiples(size: int, multiple: int) -> str:
    below = max(multiple, size // multiple * multiple)
    return f"{below} or {below + multiple}"


def _check_dit_patch(config: ml_collections.ConfigDict, latent_size: int) -> None:
    model = config.dit.model
    patch = int(model.rsplit("/", 1)[-1]) if "/" in model else 0
    if patch and latent_size % patch:
        image_size = int(config.data.image_size)
        factor = max(1, image_size // latent_size)
        multiple = factor * patch
        raise ValueError(f"latent size {latent_size} (image {image_size} / VAE factor {factor}) is not divisible by "
                         f"the DiT patch size {patch} of {model}: the image size must be a multiple of {multiple}; "
                         f"change data.image_size (e.g. {_nearby_multiples(image_size, multiple)}) or dit.model")


def dit_from_config(config: ml_collections.ConfigDict, *, latent_size: int, latent_channels: int,
                    num_classes: int):
    d = config.dit
    _check_dit_patch(config, latent_size)
    overrides = {k: v for k, v in dict(hidden_size=d.hidden_size, depth=d.depth, num_heads=d.num_heads).items() if v}
    return dit_lib.make_dit(d.model, input_size=latent_size, in_channels=latent_channels, num_classes=num_classes,
                            learn_sigma=d.learn_sigma, class_dropout_prob=d.class_dropout_prob if num_classes else 0.0,
                            dtype=dtype_from_name(config.compute_dtype), attention_impl=attention_impl(config),
                            remat_policy=d.remat_policy, **overrides)


def check_sizes(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError if `data.image_size` does not fit the classifier's patch, the VAE's factor and the DiT's
    patch on the VAE's latents. The study builds the DiT only after the baseline and the VAE are trained, so
    this runs before it starts: a mismatch found hours later would mean retraining everything at a new size.
    Sizes only: the models' other checks (e.g. cuDNN needs a GPU) belong to the hosts that run them."""
    size = int(config.data.image_size)
    if not size:   # 0 = whatever was prepared: the trainers check it once the dataset is known
        return
    _check_classifier_patch(config)
    factor = vae_from_config(config).downsample_factor
    _check_dit_patch(config, size // factor)
