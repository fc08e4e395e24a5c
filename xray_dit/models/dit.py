"""Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers") in Flax linen.

Numerically the facebookresearch/DiT `models.py` (checked against golden tensors), with NHWC latents,
logical-axis annotations for FSDP / tensor parallelism, and an unconditional variant
(`num_classes=0`: no label embedder, conditioning is the timestep alone).

`models/convert/dit_torch.py` converts to and from the released PyTorch checkpoints' names.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xray_dit.models import layers

# name → (hidden_size, depth, num_heads), the paper's configurations.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
DIT_PATCH_SIZES = (2, 4, 8)
# Activation rematerialisation of each block in the backward pass: memory against recomputation.
#   none  keep every activation (fastest while it fits: DiT-B/2 at batch 256 peaks at 27 GiB on an H200)
#   dots  keep the matmul outputs, recompute the cheap element-wise work (norms, GELU, modulation)
#   full  keep only each block's input and recompute the block (least memory, ~1/3 more FLOPs)
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}
TIMESTEP_FEATURES = 256


def _dense(features, kernel_names, bias_names, dtype, param_dtype, name, *, zero=False):
    """A Linear with logical names; `zero` is the adaLN-Zero init of modulation/final layers."""
    if zero:
        kernel_init, bias_init = layers.zeros_init(kernel_names), layers.zeros_init(bias_names)
    else:
        kernel_init, bias_init = layers.dense_init(kernel_names), layers.zeros_init(bias_names)
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                    bias_init=bias_init, name=name)


class HeadsDense(nn.Module):
    """A Linear whose input and/or output features are split over several axes, e.g. D → (3, heads,
    head_dim), contracting the last `num_in_axes` input axes.

    Written out instead of `nn.DenseGeneral`, which initialises a flattened kernel and then cannot
    apply a multi-axis logical sharding under a mesh. The init is xavier-uniform over the
    flattened fans, i.e. exactly PyTorch's for the equivalent (out, in) Linear.
    """

    features: tuple[int, ...]
    kernel_names: tuple[str | None, ...]
    bias_names: tuple[str | None, ...]
    num_in_axes: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = self.num_in_axes, len(self.features)
        in_shape = x.shape[-n_in:]
        xavier = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=tuple(range(n_in)),
                                                  out_axis=tuple(range(n_in, n_in + n_out)))
        kernel = self.param("kernel", nn.with_logical_partitioning(xavier, self.kernel_names),
                            in_shape + tuple(self.features), self.param_dtype)
        bias = self.param("bias", layers.zeros_init(self.bias_names), tuple(self.features), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x, kernel, (contract, ((), ()))) + bias


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm `Attention`, qkv_bias=True).

    The qkv kernel is stored as (D, 3, heads, head_dim) and proj as (heads, head_dim, D) so that tensor
    parallelism splits whole heads; they are the PyTorch (3D, D) / (D, D) weights transposed and
    reshaped (qkv rows are [q | k | v], head-major).
    """

    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        head_dim = width // self.num_heads
        qkv = HeadsDense((3, self.num_heads, head_dim), ("embed", None, "heads", None), (None, "heads", None),
                         dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
        qkv = nn.with_logical_constraint(qkv, ("act_batch", "act_len", None, "act_heads", None))
        out = layers.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=self.attention_impl)
        out = nn.with_logical_constraint(out, ("act_batch", "act_len", "act_heads", None))
        return HeadsDense((width,), ("heads", None, "embed"), ("embed",), num_in_axes=2, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="proj")(out)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: gates start at zero, so the block starts as identity."""

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        width = x.shape[-1]
        # The modulation output is a wide (6·D) projection like an MLP hidden, so it shards on `mlp`.
        modulation = _dense(6 * width, ("embed", "mlp"), ("mlp",), self.dtype, self.param_dtype,
                            "adaLN_modulation", zero=True)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)
        h = layers.modulated_layer_norm(x, shift_msa, scale_msa)
        h = Attention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                      attention_impl=self.attention_impl, name="attn")(h)
        x = x + gate_msa[:, None, :] * h
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        h = layers.modulated_layer_norm(x, shift_mlp, scale_mlp)
        h = layers.Mlp(int(width * self.mlp_ratio), dtype=self.dtype, param_dtype=self.param_dtype,
                       name="mlp")(h)
        x = x + gate_mlp[:, None, :] * h
        return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a zero-initialised linear map to p·p·C_out values per token."""

    out_features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        width = x.shape[-1]
        modulation = _dense(2 * width, ("embed", "mlp"), ("mlp",), self.dtype, self.param_dtype,
                            "adaLN_modulation", zero=True)(nn.silu(c))
        shift, scale = jnp.split(modulation, 2, axis=-1)
        x = layers.modulated_layer_norm(x, shift, scale)
        return _dense(self.out_features, ("embed", None), (None,), self.dtype, self.param_dtype,
                      "linear", zero=True)(x)


class DiT(nn.Module):
    """Latent DiT: NHWC latents (B, H, W, C), integer timesteps (B,), labels (B,) → (B, H, W, C or 2C).

    With `learn_sigma` the last C output channels are the learned-range variance values v ∈ [-1, 1]
    (interpolating between log β_t and the clipped log posterior variance). Labels use `num_classes`
    as the null (unconditional) label; label dropout (rate `class_dropout_prob`) happens only when
    `train=True` and draws from the `'label_dropout'` rng stream. The output is float32 whatever the
    compute dtype, because the diffusion math downstream is float32.
    """

    input_size: int
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    in_channels: int = 4
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 0
    learn_sigma: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str = "none"      # a key of REMAT_POLICIES

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_label_rows(self) -> int:
        """Label-table rows: a null row for classifier-free guidance exists only if labels are dropped."""
        return self.num_classes + (1 if self.class_dropout_prob > 0 else 0)

    def validate(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"DiT input_size {self.input_size} is not divisible by patch_size "
                             f"{self.patch_size}; choose a latent size that is a multiple of the patch")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiT hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"DiT hidden_size must be divisible by 4 for the 2-D sin-cos position "
                             f"embedding, got {self.hidden_size}")
        if self.num_classes < 0 or not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"DiT needs num_classes >= 0 and 0 <= class_dropout_prob < 1, got "
                             f"{self.num_classes} and {self.class_dropout_prob}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"DiT remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
        layers.check_attention_impl(self.attention_impl, self.dtype)

    def pos_embed(self) -> np.ndarray:
        """The fixed (grid², hidden) sin-cos table; a constant, not a parameter."""
        return layers.sincos_2d_pos_embed(self.hidden_size, self.grid_size)

    def _check_inputs(self, x, t, y) -> None:
        want = (self.input_size, self.input_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"DiT expects NHWC latents of shape (batch, {want[0]}, {want[1]}, {want[2]}), "
                             f"got {tuple(x.shape)}; transpose NCHW inputs with x.transpose(0, 2, 3, 1)")
        if jnp.shape(t) != (x.shape[0],):
            raise ValueError(f"DiT expects one timestep per example, shape ({x.shape[0]},), got {jnp.shape(t)}")
        if self.num_classes == 0 and y is not None:
            raise ValueError("this DiT is unconditional (num_classes=0) but labels y were given; pass y=None")
        if self.num_classes > 0:
            if y is None:
                raise ValueError(f"this DiT is class-conditional (num_classes={self.num_classes}); pass labels "
                                 f"y of shape ({x.shape[0]},), using {self.num_classes} for the null label")
            if jnp.shape(y) != (x.shape[0],):
                raise ValueError(f"DiT expects one label per example, shape ({x.shape[0]},), got {jnp.shape(y)}")

    def _labels_after_dropout(self, y: jax.Array) -> jax.Array:
        key = self.make_rng("label_dropout")
        drop = jax.random.uniform(key, y.shape) < self.class_dropout_prob
        return jnp.where(drop, self.num_classes, y)

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
        self.validate()
        self._check_inputs(x, t, y)
        batch = x.shape[0]
        p, width = self.patch_size, self.hidden_size

        x = nn.with_logical_constraint(x.astype(self.dtype), ("act_batch", "act_height", "act_width", "act_channels"))
        # Conv2d(kernel = stride = p). PyTorch's init views the kernel as (D, C·p·p), hence these fans.
        tokens = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                         param_dtype=self.param_dtype,
                         kernel_init=nn.with_logical_partitioning(
                             nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                                              out_axis=3),
                             (None, None, None, "embed")),
                         bias_init=layers.zeros_init(("embed",)), name="x_embedder")(x)
        tokens = tokens.reshape(batch, self.grid_size * self.grid_size, width)
        tokens = tokens + jnp.asarray(self.pos_embed(), self.dtype)[None]
        tokens = nn.with_logical_constraint(tokens, ("act_batch", "act_len", "act_embed"))

        c = TimestepEmbedder(width, dtype=self.dtype, param_dtype=self.param_dtype, name="t_embedder")(t)
        if self.num_classes > 0:
            y = jnp.asarray(y)
            if train and self.class_dropout_prob > 0:
                y = self._labels_after_dropout(y)
            table = self.param("y_embedder", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("classes", "embed")), (self.num_label_rows, width),
                self.param_dtype)
            c = c + jnp.take(jnp.asarray(table, self.dtype), y, axis=0)
        c = nn.with_logical_constraint(c, ("act_batch", "act_embed"))

        policy = REMAT_POLICIES[self.remat_policy]
        block = DiTBlock if policy is None else nn.remat(DiTBlock, policy=policy)  # same parameter names
        for i in range(self.depth):
            tokens = block(self.num_heads, self.mlp_ratio, dtype=self.dtype, param_dtype=self.param_dtype,
                           attention_impl=self.attention_impl, name=f"blocks_{i}")(tokens, c)
        out = FinalLayer(p * p * self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="final_layer")(tokens, c)
        return unpatchify(out.astype(jnp.float32), self.grid_size, self.grid_size, p, self.out_channels)


class TimestepEmbedder(nn.Module):
    """256 sin-cos features (cos first) → Linear → SiLU → Linear; weights N(0, 0.02) as in DiT."""

    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        features = layers.timestep_features(t, TIMESTEP_FEATURES).astype(self.dtype)
        normal = nn.initializers.normal(0.02)
        h = nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.with_logical_partitioning(normal, (None, "embed")),
                     bias_init=layers.zeros_init(("embed",)), name="mlp_0")(features)
        return nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.with_logical_partitioning(normal, ("mlp", "embed")),
                        bias_init=layers.zeros_init(("embed",)), name="mlp_2")(nn.silu(h))


def unpatchify(tokens: jax.Array, grid_h: int, grid_w: int, p: int, channels: int) -> jax.Array:
    """(B, h·w, p·p·C) → (B, h·p, w·p, C): token i·w + j, value (a·p + b)·C + c lands at pixel (i·p + a, j·p + b)."""
    batch = tokens.shape[0]
    x = tokens.reshape(batch, grid_h, grid_w, p, p, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(batch, grid_h * p, grid_w * p, channels)


def make_dit(name: str = "DiT-B/2", **overrides: Any) -> DiT:
    """A `DiT` from a paper name such as "DiT-S/4" or "DiT-XL/2"; other fields via keyword overrides."""
    match = re.fullmatch(r"DiT-([A-Za-z]+)/(\d+)", name)
    if not match or match.group(1) not in DIT_SIZES or int(match.group(2)) not in DIT_PATCH_SIZES:
        raise ValueError(f"unknown DiT model {name!r}; use 'DiT-<size>/<patch>' with size in "
                         f"{sorted(DIT_SIZES)} and patch in {DIT_PATCH_SIZES}, e.g. 'DiT-B/2'")
    hidden, depth, heads = DIT_SIZES[match.group(1)]
    fields = dict(input_size=32, patch_size=int(match.group(2)), hidden_size=hidden, depth=depth, num_heads=heads)
    fields.update(overrides)
    model = DiT(**fields)
    model.validate()
    return model
