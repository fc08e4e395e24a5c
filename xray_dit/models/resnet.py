"""ResNet classifier (torchvision `resnet18/34/50` semantics, v1.5: the stride of a bottleneck sits on its
3x3 conv) with BatchNorm, on NHWC images.

Module names map one-to-one onto torchvision's state-dict names, a block index joined by "_":
`layer3_1/downsample_0/kernel` ↔ `layer3.1.downsample.0.weight`; BatchNorm's `scale`/`bias` are params and
its running `mean`/`var` live in the `batch_stats` collection (`running_mean`/`running_var`). The name map
is `convert/resnet_torchvision.py`.

BatchNorm follows torchvision's numbers: eps 1e-5, running averages updated with weight 0.1 per step
(Flax momentum 0.9). It normalises with the statistics of the (global) batch when `train=True` — call
`apply(..., train=True, mutable=["batch_stats"])` — and with the running statistics otherwise. The
running variance is the biased batch variance (torchvision keeps the unbiased one), a difference of
n/(n-1) in training only.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPS = 1e-5
BN_MOMENTUM = 0.9     # Flax's keep-fraction: torchvision's momentum 0.1
BOTTLENECK_EXPANSION = 4

# torchvision's resnet18/34/50. "resnet_tiny" is not a torchvision model: a CI/quickstart-sized
# network, one basic block per stage at a quarter of the widths.
RESNET_SIZES: dict[str, dict[str, Any]] = {
    "resnet18": dict(block="basic", stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512)),
    "resnet34": dict(block="basic", stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512)),
    "resnet50": dict(block="bottleneck", stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512)),
    "resnet_tiny": dict(block="basic", stage_sizes=(1, 1, 1, 1), widths=(16, 32, 64, 128)),
}
BLOCKS = ("basic", "bottleneck")


def _wlp(init, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, names)


# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") for every conv.
_conv_init = _wlp(nn.initializers.variance_scaling(2.0, "fan_out", "normal"), (None, None, "conv_in", "conv_out"))


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any, param_dtype: Any) -> nn.Conv:
    """A bias-free conv with torchvision's symmetric padding (kernel // 2 on every side)."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=_conv_init, name=name)


def _norm(name: str, train: bool, dtype: Any, param_dtype: Any) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype,
                        param_dtype=param_dtype, scale_init=_wlp(nn.initializers.ones_init(), ("norm",)),
                        bias_init=_wlp(nn.initializers.zeros_init(), ("norm",)), name=name)


class ResidualBlock(nn.Module):
    """torchvision's BasicBlock (two 3x3 convs) or Bottleneck (1x1, 3x3 with the stride, 1x1 to 4x width),
    each conv followed by BatchNorm; `downsample_0/1` (1x1 conv + BN) when the shortcut changes shape."""

    width: int
    stride: int
    bottleneck: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = lambda f, k, s, name: _conv(f, k, s, name, self.dtype, self.param_dtype)  # noqa: E731
        norm = lambda name: _norm(name, train, self.dtype, self.param_dtype)  # noqa: E731
        if self.bottleneck:
            out_width = self.width * BOTTLENECK_EXPANSION
            y = nn.relu(norm("bn1")(conv(self.width, 1, 1, "conv1")(x)))
            y = nn.relu(norm("bn2")(conv(self.width, 3, self.stride, "conv2")(y)))
            y = norm("bn3")(conv(out_width, 1, 1, "conv3")(y))
        else:
            out_width = self.width
            y = nn.relu(norm("bn1")(conv(self.width, 3, self.stride, "conv1")(x)))
            y = norm("bn2")(conv(self.width, 3, 1, "conv2")(y))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_width:
            shortcut = norm("downsample_1")(conv(out_width, 1, self.stride, "downsample_0")(x))
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet classifier on NHWC images of any size (global average pooling before `fc`).

    Methods: `__call__(x, train=False)` → float32 logits (B, num_classes); `features(x, train=False)` (the
    same call with `pre_logits=True`) → the pooled features (B, widths[-1]·expansion), the classifier's
    feature space. Calls with
    mutable=["intermediates"] also return `stem` (after the max-pool) and `layer1`..`layer4`.
    `img_size` is the resolution the model is initialised and exported at; it does not constrain inputs.
    """

    num_classes: int = 2
    in_channels: int = 1
    img_size: int = 224
    block: str = "basic"
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _check_config(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"ResNet block must be one of {BLOCKS}, got {self.block!r}")
        if len(self.stage_sizes) != len(self.widths) or not self.stage_sizes:
            raise ValueError(f"ResNet needs one width per stage, got stage_sizes {self.stage_sizes} and "
                             f"widths {self.widths}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            hint = " (this looks NCHW; transpose to NHWC)" if x.ndim == 4 and x.shape[1] == self.in_channels else ""
            raise ValueError(f"ResNet expects NHWC images with {self.in_channels} channel(s), got shape "
                             f"{tuple(x.shape)}{hint}")

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self(x, train=train, pre_logits=True)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, pre_logits: bool = False) -> jax.Array:
        self._check_config()
        self._check_input(x)
        x = _conv(self.widths[0], 7, 2, "conv1", self.dtype, self.param_dtype)(x.astype(self.dtype))
        x = nn.relu(_norm("bn1", train, self.dtype, self.param_dtype)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        self.sow("intermediates", "stem", x)
        for stage, (count, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                x = ResidualBlock(width, stride, self.block == "bottleneck", dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=f"layer{stage + 1}_{index}")(x, train)
            self.sow("intermediates", f"layer{stage + 1}", x)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if pre_logits:
            return pooled
        fc = fc_layer(self.num_classes, self.dtype, self.param_dtype, name="fc")
        return fc(pooled.astype(self.dtype)).astype(jnp.float32)


def fc_layer(num_classes: int, dtype: Any, param_dtype: Any, name: str | None = None) -> nn.Dense:
    """The classifier head (torchvision's default Linear init); shared with the importer's fresh head."""
    return nn.Dense(num_classes, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=_wlp(nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                                     ("embed", "classes")),
                    bias_init=_wlp(nn.initializers.zeros_init(), ("classes",)), name=name)


def make_resnet(name: str = "resnet50", *, num_classes: int, in_channels: int = 1, img_size: int = 224,
                **overrides: Any) -> ResNet:
    """ResNet of a named size (`RESNET_SIZES`: resnet18/34/50 as torchvision's, or "resnet_tiny")."""
    if name not in RESNET_SIZES:
        raise ValueError(f"unknown ResNet {name!r}; choose one of {sorted(RESNET_SIZES)}")
    return ResNet(num_classes=num_classes, in_channels=in_channels, img_size=int(img_size),
                  **{**RESNET_SIZES[name], **overrides})


def abstract_variables(model: ResNet) -> dict:
    """Shapes/dtypes of `{"params", "batch_stats"}` (params still boxed with their axis names), no memory used."""
    x = jnp.zeros((1, model.img_size, model.img_size, model.in_channels), model.dtype)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


_STAGE_RE = re.compile(r"layer(\d+)_\d+$")


def layer_id(param_path: Sequence[str], num_stages: int) -> int:
    """Layer index for layer-wise lr decay: stem (conv1, bn1) 0, stage i → i, fc → num_stages + 1.

    `param_path` is a flattened params path, e.g. ("layer3_1", "conv2", "kernel"), optionally starting with
    the "params" collection.
    """
    path = tuple(str(p) for p in param_path)
    if path and path[0] == "params":
        path = path[1:]
    if not path:
        raise ValueError("layer_id needs a non-empty parameter path")
    if path[0] in ("conv1", "bn1"):
        return 0
    match = _STAGE_RE.match(path[0])
    if match and 1 <= int(match.group(1)) <= num_stages:
        return int(match.group(1))
    if path[0] == "fc":
        return num_stages + 1
    raise ValueError(f"layer_id: unknown ResNet parameter path {path}")
