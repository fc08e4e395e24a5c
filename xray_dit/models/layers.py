"""Small building blocks shared by the transformer models (DiT here; reused by later models).

Arrays are (batch, length, features) for tokens and (batch, length, heads, head_dim) for attention,
matching `jax.nn.dot_product_attention`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_IMPLS = ("xla", "cudnn")


def check_attention_impl(implementation: str, dtype: Any) -> None:
    """Fails early, with the fix, instead of deep inside XLA when cuDNN attention cannot run."""
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {implementation!r}")
    if implementation == "cudnn":
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"attention_impl='cudnn' needs a bfloat16/float16 compute dtype, got "
                             f"{jnp.dtype(dtype).name}; set the compute dtype to bfloat16 or use 'xla'")
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention_impl='cudnn' only runs on NVIDIA GPUs, but the backend is "
                             f"{jax.default_backend()!r}; use attention_impl='xla'")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "xla") -> jax.Array:
    """Full (non-causal) softmax attention with scale head_dim**-0.5; inputs (B, L, heads, head_dim).

    `jax.nn.dot_product_attention` keeps the logits and the softmax in float32 even for bf16 inputs.
    """
    check_attention_impl(implementation, q.dtype)
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q, k, v of shape (batch, length, heads, head_dim) with "
                         f"matching batch/heads/head_dim, got {q.shape}, {k.shape}, {v.shape}")
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def modulated_layer_norm(x: jax.Array, shift: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    """adaLN: `LayerNorm(x) * (1 + scale) + shift` (no affine parameters of its own), per example.

    x (B, L, D); shift/scale (B, D). Normalising and modulating happen in one float32 expression with a
    single cast back to x's dtype, so a bf16 stream is rounded once, and XLA emits one fusion that reads
    x once and writes the modulated activations once.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normalized = (x32 - mean) * jax.lax.rsqrt(var + eps)
    scale32, shift32 = scale.astype(jnp.float32)[:, None, :], shift.astype(jnp.float32)[:, None, :]
    return (normalized * (1 + scale32) + shift32).astype(x.dtype)


def timestep_features(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of (possibly fractional) timesteps, (B,) → (B, dim) float32, cos half first.

    Frequencies f_i = exp(-ln(max_period)·i/half) for i < half = dim // 2; an odd `dim` gets one
    trailing zero column (as in DiT).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None, :]
    features = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        features = jnp.pad(features, ((0, 0), (0, 1)))
    return features


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[sin(p·ω), cos(p·ω)] with ω_k = 10000^(-k/(dim/2)); float64, (len(positions), dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_pos_embed(dim: int, grid: int | tuple[int, int]) -> np.ndarray:
    """Fixed 2-D sin-cos position table (grid_h·grid_w, dim) float32, tokens in row-major (h, w) order.

    The first dim/2 channels encode the column (w) index, the last dim/2 the row (h) index — the
    MAE/DiT layout that the released checkpoints store. Computed in float64 and rounded once, as
    the reference does, so it equals the stored `pos_embed` to the last bit.
    """
    grid_h, grid_w = (grid, grid) if isinstance(grid, int) else grid
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                             indexing="ij")
    table = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    return table.astype(np.float32)


def dense_init(kernel_names: tuple[str | None, ...]):
    """Xavier-uniform kernel with logical axis names (the DiT/timm Linear init)."""
    return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), kernel_names)


def zeros_init(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class Mlp(nn.Module):
    """fc1 → GELU (tanh approximation) → fc2, the timm `Mlp` used by DiT; hidden sharded on `mlp`."""

    hidden_features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_features = x.shape[-1]
        h = nn.Dense(self.hidden_features, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=dense_init(("embed", "mlp")), bias_init=zeros_init(("mlp",)),
                     name="fc1")(x)
        h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
        h = nn.gelu(h, approximate=True)
        return nn.Dense(out_features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=dense_init(("mlp", "embed")), bias_init=zeros_init(("embed",)),
                        name="fc2")(h)
