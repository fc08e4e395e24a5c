"""Stable-Diffusion-style KL autoencoder (diffusers `AutoencoderKL`) in Flax.

The module tree mirrors the diffusers one name for name (`encoder/down_blocks_0/resnets_1/conv2`
is `encoder.down_blocks.0.resnets.1.conv2`), so its converter (`models/convert/vae_diffusers.py`)
derives every PyTorch name from the model's own parameter tree.

Images and latents are NHWC. The latent that the DiT sees is `sample * scaling_factor`; images are
decoded from `latents / scaling_factor` (the DiT / Stable Diffusion convention), so the factor is a
field of the model.

Also here: a PatchGAN discriminator and the hinge loss for the optional adversarial VAE objective.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

FEATURE_MAP_AXES = ("act_batch", "act_height", "act_width", "act_channels")
SEQUENCE_AXES = ("act_batch", "act_len", "act_embed")
CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
LOGVAR_RANGE = (-30.0, 20.0)
# diffusers uses GroupNorm eps 1e-6 throughout the VAE (PyTorch's default 1e-5 would not match).
NORM_EPS = 1e-6

# The sd-vae-ft-ema / sd-vae-ft-mse architecture (the hub checkpoints are RGB).
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    mid_attention=True,
    scaling_factor=0.18215,
)

VAE_PRESETS: dict[str, dict[str, Any]] = {
    "sd-vae-ft-ema": SD_VAE_CONFIG,
    "sd-vae-ft-mse": SD_VAE_CONFIG,
    # The SD architecture for grayscale X-rays; import the RGB checkpoints with adapt_rgb="auto".
    "sd-vae-gray": {**SD_VAE_CONFIG, "in_channels": 1, "out_channels": 1},
}


def _conv(features: int, kernel: int, *, strides: int = 1, padding: Any = "VALID", dtype: Dtype,
          param_dtype: Dtype, name: str) -> nn.Conv:
    return nn.Conv(
        features, (kernel, kernel), strides=(strides, strides), padding=padding, dtype=dtype,
        param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, CONV_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


def _conv3x3(features: int, *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Conv:
    return _conv(features, 3, padding=((1, 1), (1, 1)), dtype=dtype, param_dtype=param_dtype, name=name)


def _group_norm(num_groups: int, *, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    # float32 statistics with the two-pass variance (as PyTorch): E[x²]−E[x]² cancels badly in groups
    # whose mean is large next to their spread.
    return nn.GroupNorm(
        num_groups=num_groups, epsilon=NORM_EPS, dtype=jnp.float32, param_dtype=param_dtype,
        use_fast_variance=False, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


def _constrain(x: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x, FEATURE_MAP_AXES)


class ResnetBlock(nn.Module):
    """GN → SiLU → conv3x3 → GN → SiLU → conv3x3, plus a 1×1 shortcut conv when the width changes."""

    out_channels: int
    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(_group_norm(self.norm_num_groups, param_dtype=self.param_dtype, name="norm1")(x))
        h = _conv3x3(self.out_channels, name="conv1", **kw)(h.astype(self.dtype))
        h = nn.silu(_group_norm(self.norm_num_groups, param_dtype=self.param_dtype, name="norm2")(h))
        h = _conv3x3(self.out_channels, name="conv2", **kw)(h.astype(self.dtype))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return _constrain(x.astype(self.dtype) + h)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H·W positions (head dim = channels), GN first, residual."""

    norm_num_groups: int = 32
    attention_impl: str | None = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _dense(self, channels: int, axes: tuple[str, str], name: str) -> nn.Dense:
        return nn.Dense(
            channels, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        _check_attention_impl(self.attention_impl, self.dtype, head_dim=channels)
        h = _group_norm(self.norm_num_groups, param_dtype=self.param_dtype, name="group_norm")(x)
        h = nn.with_logical_constraint(h.reshape(batch, height * width, channels).astype(self.dtype),
                                       SEQUENCE_AXES)
        # (B, L, heads=1, C): the layout dot_product_attention expects; its default scale is C**-0.5.
        q, k, v = (self._dense(channels, ("embed", "heads"), name)(h)[:, :, None, :]
                   for name in ("to_q", "to_k", "to_v"))
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        out = self._dense(channels, ("heads", "embed"), "to_out_0")(out[:, :, 0, :])
        out = nn.with_logical_constraint(out, SEQUENCE_AXES).reshape(batch, height, width, channels)
        return _constrain(x.astype(self.dtype) + out)


def _check_attention_impl(impl: str | None, dtype: Dtype, head_dim: int) -> None:
    if impl not in (None, "xla", "cudnn"):
        raise ValueError(f"attention_impl must be None, 'xla' or 'cudnn', got {impl!r}")
    if impl != "cudnn":
        return
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"attention_impl='cudnn' needs dtype bfloat16 or float16, got {jnp.dtype(dtype)}; "
                         "use attention_impl='xla' for float32")
    # cuDNN's fused attention takes head dims <= 256 that are multiples of 8 (JAX refused 512 on an
    # H200 with jax 0.11); the SD VAE's single mid-block head is 512 wide.
    if head_dim > 256 or head_dim % 8:
        raise ValueError(f"attention_impl='cudnn' supports head dims <= 256 that are multiples of 8, but this "
                         f"single-head attention has head dim {head_dim} (its channel count); use attention_impl='xla'")
    if jax.default_backend() != "gpu":
        raise ValueError(f"attention_impl='cudnn' needs a GPU; use 'xla' on {jax.default_backend()}")


class MidBlock(nn.Module):
    """resnet → (attention) → resnet at the lowest resolution."""

    norm_num_groups: int = 32
    add_attention: bool = True
    attention_impl: str | None = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x.shape[-1]
        x = ResnetBlock(channels, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = SpatialSelfAttention(attention_impl=self.attention_impl, name="attentions_0", **kw)(x)
        return ResnetBlock(channels, name="resnets_1", **kw)(x)


class Downsample(nn.Module):
    """(top 0, bottom 1, left 0, right 1) zero pad, then a 3×3 stride-2 VALID conv (as diffusers/LDM).

    Symmetric SAME padding would shift the sampling grid by one pixel and not match the checkpoints.
    """

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = _conv(self.channels, 3, strides=2, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        return _constrain(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x = _conv3x3(self.channels, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        return _constrain(x)


class ResnetStage(nn.Module):
    """`num_layers` resnet blocks, then an optional resampler: diffusers' Down/UpEncoderBlock2D."""
    out_channels: int
    num_layers: int
    resample: str = ""          # "" | "down" | "up"
    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.norm_num_groups, name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample(self.out_channels, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


def _conv_out(h: jax.Array, out_channels: int, norm_num_groups: int, *, dtype: Dtype, param_dtype: Dtype
              ) -> jax.Array:
    """GN → SiLU → conv_out: how the encoder and the decoder both end (diffusers' conv_norm_out and conv_out)."""
    h = nn.silu(_group_norm(norm_num_groups, param_dtype=param_dtype, name="conv_norm_out")(h))
    return _constrain(_conv3x3(out_channels, name="conv_out", dtype=dtype, param_dtype=param_dtype)(h.astype(dtype)))


class Encoder(nn.Module):
    """conv_in → down blocks (downsampling after all but the last) → mid → GN → SiLU → conv_out."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    mid_attention: bool
    attention_impl: str | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _constrain(_conv3x3(self.block_out_channels[0], name="conv_in", **kw)(x.astype(self.dtype)))
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            h = ResnetStage(channels, self.layers_per_block, resample="down" if i != last else "",
                            norm_num_groups=self.norm_num_groups, name=f"down_blocks_{i}", **kw)(h)
        h = MidBlock(self.norm_num_groups, self.mid_attention, self.attention_impl, name="mid_block", **kw)(h)
        self.sow("intermediates", "mid_block_out", h)
        return _conv_out(h, self.out_channels, self.norm_num_groups, **kw)


class Decoder(nn.Module):
    """conv_in → mid → up blocks (reversed widths, layers_per_block+1 resnets, upsampling after all but
    the last) → GN → SiLU → conv_out."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    mid_attention: bool
    attention_impl: str | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = tuple(reversed(self.block_out_channels))
        h = _constrain(_conv3x3(widths[0], name="conv_in", **kw)(z.astype(self.dtype)))
        h = MidBlock(self.norm_num_groups, self.mid_attention, self.attention_impl, name="mid_block", **kw)(h)
        self.sow("intermediates", "mid_block_out", h)
        last = len(widths) - 1
        for i, channels in enumerate(widths):
            h = ResnetStage(channels, self.layers_per_block + 1, resample="up" if i != last else "",
                            norm_num_groups=self.norm_num_groups, name=f"up_blocks_{i}", **kw)(h)
        return _conv_out(h, self.out_channels, self.norm_num_groups, **kw)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) ‖ N(0, I)) summed over each example's latent: shape (batch,)."""
    mean = mean.astype(jnp.float32)
    logvar = logvar.astype(jnp.float32)
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mean.ndim)))


def sample_posterior(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """One reparameterised draw `mean + exp(logvar / 2) · ε`, ε ~ N(0, I), in float32."""
    mean = mean.astype(jnp.float32)
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps


# `AutoencoderKL.__call__` has a keyword argument of the same name, which hides the function there.
_draw_posterior = sample_posterior


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL` (quant/post-quant convs, mid-block attention, SiLU), NHWC.

    `encode(x) -> (mean, logvar)` with logvar clamped to [-30, 20]; `decode(z) -> image` (no
    scaling_factor applied: the caller multiplies latents by it after encoding and divides before
    decoding); `__call__(x) -> (reconstruction, mean, logvar)`, sampling the posterior with the
    `posterior` rng stream unless `rng` is given or `sample_posterior=False` (then it decodes the mean).
    Intermediate values are sown into the `intermediates` collection for debugging ports.
    """

    in_channels: int = 1
    out_channels: int = 1
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_attention: bool = True
    scaling_factor: float = 0.18215
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "xla"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self) -> None:
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if not self.block_out_channels or bad:
            raise ValueError(f"block_out_channels {tuple(self.block_out_channels)} must be non-empty and each "
                             f"divisible by norm_num_groups={self.norm_num_groups} (GroupNorm); offending: {bad}")
        common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, mid_attention=self.mid_attention,
                      attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(out_channels=2 * self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.quant_conv = _conv(2 * self.latent_channels, 1, name="quant_conv", **kw)
        self.post_quant_conv = _conv(self.latent_channels, 1, name="post_quant_conv", **kw)

    def _check_input(self, x: jax.Array, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be NHWC (batch, height, width, {channels}), got shape {tuple(x.shape)}; "
                             "transpose NCHW arrays with x.transpose(0, 2, 3, 1)")

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        self._check_input(x, self.in_channels, "encode input")
        factor = self.downsample_factor
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"image height and width must be multiples of {factor} (the encoder downsamples "
                             f"{len(self.block_out_channels) - 1} times), got {x.shape[1]}x{x.shape[2]}; "
                             "crop or pad the images")
        h = self.encoder(x)
        self.sow("intermediates", "encoder_out", h)
        moments = self.quant_conv(h).astype(jnp.float32)
        self.sow("intermediates", "moments", moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        self._check_input(z, self.latent_channels, "decode input (latent)")
        h = self.post_quant_conv(z.astype(self.dtype))
        self.sow("intermediates", "post_quant", h)
        return self.decoder(h).astype(jnp.float32)

    def __call__(self, x: jax.Array, *, sample_posterior: bool = True,
                 rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        mean, logvar = self.encode(x)
        if sample_posterior:
            z = _draw_posterior(self.make_rng("posterior") if rng is None else rng, mean, logvar)
        else:
            z = mean
        return self.decode(z), mean, logvar


def make_vae(name_or_overrides: str | Mapping[str, Any] = "sd-vae-gray", **fields: Any) -> AutoencoderKL:
    """An `AutoencoderKL` from a preset name (`VAE_PRESETS`) or from overrides of `SD_VAE_CONFIG`.

    Keyword `fields` (e.g. dtype, attention_impl) override either.
    """
    if isinstance(name_or_overrides, str):
        if name_or_overrides not in VAE_PRESETS:
            raise ValueError(f"unknown VAE preset {name_or_overrides!r}; choose one of {sorted(VAE_PRESETS)} "
                             "or pass a dict of AutoencoderKL fields")
        config = dict(VAE_PRESETS[name_or_overrides])
    else:
        config = {**SD_VAE_CONFIG, **dict(name_or_overrides)}
    config.update(fields)
    known = {f for f in AutoencoderKL.__dataclass_fields__ if f not in ("parent", "name")}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown AutoencoderKL field(s) {unknown}; valid fields are {sorted(known)}")
    config["block_out_channels"] = tuple(config["block_out_channels"])
    return AutoencoderKL(**config)


# ----------------------------------------------------------------------------------------------------------
# Adversarial loss parts
# ----------------------------------------------------------------------------------------------------------

class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming NLayerDiscriminator): a map of real/fake logits, one per patch.

    `num_layers` stride-2 4×4 convs (width doubling from `base_channels`, capped at
    `max_channel_multiplier`×), one stride-1 4×4 conv, and a stride-1 4×4 conv to one logit channel;
    LeakyReLU(0.2). GroupNorm replaces the original BatchNorm: no batch statistics to synchronise
    across devices or to carry between train and eval. The raw logits suit a hinge or an LSGAN loss.
    """

    base_channels: int = 64
    num_layers: int = 3
    max_channel_multiplier: int = 8
    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def min_input_size(self) -> int:
        # Each stride-2 conv (k4, p1) halves the size; each of the two stride-1 convs removes one pixel.
        return 3 * 2 ** self.num_layers

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}")
        if x.ndim != 4 or min(x.shape[1:3]) < self.min_input_size():
            raise ValueError(f"discriminator input must be NHWC with height and width >= {self.min_input_size()} "
                             f"for num_layers={self.num_layers}, got shape {tuple(x.shape)}")
        kw = dict(padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=self.param_dtype)
        h = x.astype(self.dtype)
        for i in range(self.num_layers + 1):
            channels = self.base_channels * min(2 ** i, self.max_channel_multiplier)
            h = _conv(channels, 4, strides=2 if i < self.num_layers else 1, name=f"conv_{i}", **kw)(h)
            if i > 0:
                # gcd keeps the group count valid for narrow test-size discriminators.
                groups = math.gcd(self.norm_num_groups, channels)
                h = _group_norm(groups, param_dtype=self.param_dtype, name=f"norm_{i}")(h).astype(self.dtype)
            h = _constrain(nn.leaky_relu(h, 0.2))
        return _conv(1, 4, name="conv_logits", **kw)(h).astype(jnp.float32)


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Discriminator hinge loss ½·(mean relu(1 − real) + mean relu(1 + fake)) (taming / LDM)."""
    real = jnp.mean(nn.relu(1.0 - real_logits.astype(jnp.float32)))
    fake = jnp.mean(nn.relu(1.0 + fake_logits.astype(jnp.float32)))
    return 0.5 * (real + fake)
