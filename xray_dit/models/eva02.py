"""EVA-02 vision transformer classifier (timm `Eva` semantics); its timm converter is `convert/eva02_timm.py`.

The model follows `timm.models.eva.Eva` as configured for `eva02_{tiny,small,base}_patch14_224`:
a class token and an absolute position embedding that includes the cls slot, 2-D rotary position
embedding (RoPE) on q/k of the patch tokens only, SwiGLU MLPs, LayerNorm eps 1e-6, mean pooling over
the patch tokens (cls excluded) followed by `fc_norm`, then a linear head. Images are NHWC.

Parameter names mirror timm's (`blocks_3/attn/qkv` ↔ `blocks.3.attn.qkv`) so that the converter's map
and the layer-wise learning-rate decay (`layer_id`) stay readable.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xray_dit.models import layers

LN_EPS = 1e-6
ROPE_TEMPERATURE = 10000.0
# timm's Eva scales the freshly initialised head down so that fine-tuning starts from ~zero logits.
HEAD_INIT_SCALE = 1e-3

# timm eva02_*_patch14_224 (pretrained on a 16x16 grid, hence the RoPE reference shape). Ti/S use a
# fused qkv and a packed SwiGLU; B uses separate q/k/v projections and a LayerNorm inside the SwiGLU.
# "tiny" is not a timm model: a CI/quickstart-sized network with the Ti/S layout.
EVA02_SIZES: dict[str, dict[str, Any]] = {
    "Ti": dict(embed_dim=192, depth=12, num_heads=3, qkv_fused=True, scale_mlp=False, ref_feat_shape=(16, 16)),
    "S": dict(embed_dim=384, depth=12, num_heads=6, qkv_fused=True, scale_mlp=False, ref_feat_shape=(16, 16)),
    "B": dict(embed_dim=768, depth=12, num_heads=12, qkv_fused=False, scale_mlp=True, ref_feat_shape=(16, 16)),
    "tiny": dict(embed_dim=64, depth=4, num_heads=2, qkv_fused=True, scale_mlp=False, ref_feat_shape=None),
}


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"expected an int or an (height, width) pair, got {value}")
    return value


def _wlp(init, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, names)


def _trunc_normal(std: float):
    return nn.initializers.truncated_normal(stddev=std)


# ----------------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------------

def rope_table(grid: int | tuple[int, int], head_dim: int,
               ref_feat_shape: tuple[int, int] | None = None,
               temperature: float = ROPE_TEMPERATURE) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos tables (grid_h·grid_w, head_dim) float32 of timm's `RotaryEmbeddingCat` (EVA-02).

    head_dim/4 bands f_j = temperature^(-j/(head_dim/4)); patch (i, j) (row-major position) gets the
    angles [y·f_0.., x·f_0..] with y = i·ref_h/grid_h, x = j·ref_w/grid_w (EVA's rescale, so a model run
    at another resolution sees the coordinate range it was pretrained on; no rescale without a
    reference shape), each angle repeated twice in place for the interleaved pair rotation.
    `concatenate([sin, cos], -1)` equals timm's `rope.get_embed()`.
    """
    grid_h, grid_w = pair(grid)
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head_dim divisible by 4 (two axes x sin/cos pairs), got {head_dim}; "
                         "choose embed_dim / num_heads accordingly")
    num_bands = head_dim // 4
    # float32 throughout, in timm's order of operations, so the table matches the reference closely.
    exponents = np.arange(num_bands, dtype=np.float32) / np.float32(num_bands)
    bands = (np.float32(1.0) / np.float32(temperature) ** exponents).astype(np.float32)
    coords = [np.arange(grid_h, dtype=np.float32), np.arange(grid_w, dtype=np.float32)]
    if ref_feat_shape is not None:
        coords = [c / np.float32(g) * np.float32(r) for c, g, r in zip(coords, (grid_h, grid_w), pair(ref_feat_shape))]
    rows, cols = np.meshgrid(*coords, indexing="ij")
    angles = np.concatenate([rows.reshape(-1, 1) * bands, cols.reshape(-1, 1) * bands], axis=1).astype(np.float32)
    angles = np.repeat(angles, 2, axis=1)
    return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Interleaved (GPT-J) pair rotation of x (B, L, heads, head_dim) by tables (L, head_dim).

    Within each pair (2m, 2m+1): x'[2m] = x[2m]·cos − x[2m+1]·sin, x'[2m+1] = x[2m+1]·cos + x[2m]·sin.
    Computed in float32 (the angles reach ~grid size, where bf16 would lose the phase).
    """
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    sin = jnp.asarray(sin, jnp.float32)[None, :, None, :]
    cos = jnp.asarray(cos, jnp.float32)[None, :, None, :]
    return (x32 * cos + rotated * sin).astype(x.dtype)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Stochastic depth: zeroes a residual branch for whole samples, rescaling the survivors."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------

def _layer_norm(name: str | None, param_dtype: Any) -> nn.LayerNorm:
    # float32 statistics regardless of the compute dtype.
    return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, param_dtype=param_dtype,
                        scale_init=_wlp(nn.initializers.ones_init(), ("norm",)),
                        bias_init=_wlp(nn.initializers.zeros_init(), ("norm",)), name=name)


def classifier_head(num_classes: int, dtype: Any, param_dtype: Any, name: str | None = None) -> nn.Dense:
    """The classifier head; shared by the model and by the importer's fresh-head initialisation."""
    return nn.Dense(num_classes, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=_wlp(_trunc_normal(0.02 * HEAD_INIT_SCALE), ("embed", "classes")),
                    bias_init=_wlp(nn.initializers.zeros_init(), ("classes",)), name=name)


class StackedDense(nn.Module):
    """Dense layer with stacked outputs: kernel (in, parts, features), output (..., parts, features).

    Keeps q/k/v (or gate/value) as a separate axis so that tensor parallelism splits each part evenly
    over its heads/hidden units. (flax's DenseGeneral initialises a flattened kernel and unboxes it under
    the mesh with the 3-D axis names, which fails; hence this small layer.)
    """

    parts: int
    features: int
    use_bias: bool
    kernel_names: tuple[str | None, ...]
    bias_names: tuple[str | None, ...] = ()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _wlp(_trunc_normal(0.02), self.kernel_names),
                            (x.shape[-1], self.parts, self.features), self.param_dtype)
        y = jnp.einsum("...d,dpf->...pf", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", _wlp(nn.initializers.zeros_init(), self.bias_names),
                              (self.parts, self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class EvaAttention(nn.Module):
    """Multi-head self-attention with RoPE on the patch tokens (the first `num_prefix` are not rotated).

    Fused layout (Ti/S): one `qkv` kernel (D, 3, D) plus `q_bias`/`v_bias` (k has no bias).
    Unfused layout (B): `q_proj` (bias), `k_proj` (no bias), `v_proj` (bias).
    """

    num_heads: int
    qkv_fused: bool
    proj_init_std: float = 0.02
    proj_drop_rate: float = 0.0
    num_prefix: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, sin: np.ndarray, cos: np.ndarray, *, train: bool = False) -> jax.Array:
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        kernel_init = _wlp(_trunc_normal(0.02), ("embed", "heads"))
        if self.qkv_fused:
            qkv = StackedDense(3, dim, use_bias=False, kernel_names=("embed", None, "heads"),
                               dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
            q_bias = self.param("q_bias", _wlp(nn.initializers.zeros_init(), ("heads",)), (dim,), self.param_dtype)
            v_bias = self.param("v_bias", _wlp(nn.initializers.zeros_init(), ("heads",)), (dim,), self.param_dtype)
            q = qkv[:, :, 0] + q_bias.astype(self.dtype)
            k = qkv[:, :, 1]
            v = qkv[:, :, 2] + v_bias.astype(self.dtype)
        else:
            def proj(name, use_bias):
                return nn.Dense(dim, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                                kernel_init=kernel_init, bias_init=_wlp(nn.initializers.zeros_init(), ("heads",)),
                                name=name)(x)
            q, k, v = proj("q_proj", True), proj("k_proj", False), proj("v_proj", True)

        heads_spec = ("act_batch", "act_len", "act_heads", None)
        q, k, v = (nn.with_logical_constraint(t.reshape(batch, length, self.num_heads, head_dim), heads_spec)
                   for t in (q, k, v))
        p = self.num_prefix
        q = jnp.concatenate([q[:, :p], apply_rope(q[:, p:], sin, cos)], axis=1)
        k = jnp.concatenate([k[:, :p], apply_rope(k[:, p:], sin, cos)], axis=1)
        out = layers.attention(q, k, v, implementation=self.attention_impl).reshape(batch, length, dim)
        out = nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=_wlp(_trunc_normal(self.proj_init_std), ("heads", "embed")),
                       bias_init=_wlp(nn.initializers.zeros_init(), ("embed",)), name="proj")(out)
        return nn.Dropout(self.proj_drop_rate)(out, deterministic=not train)


class EvaSwiGLU(nn.Module):
    """SwiGLU MLP: h = SiLU(gate(x)) · value(x), [LayerNorm(h)], fc2(h).

    `scale_mlp=True` (B): separate `fc1_g` (gate) and `fc1_x` (value) and a LayerNorm `norm` on h.
    `scale_mlp=False` (Ti/S, timm GluMlp): one packed `fc1` kernel (D, 2, hidden), gate = index 0.
    """

    hidden: int
    scale_mlp: bool
    fc2_init_std: float = 0.02
    drop_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        dim = x.shape[-1]
        act_spec = ("act_batch", "act_len", "act_mlp")
        if self.scale_mlp:
            def fc1(name):
                return nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                                kernel_init=_wlp(_trunc_normal(0.02), ("embed", "mlp")),
                                bias_init=_wlp(nn.initializers.zeros_init(), ("mlp",)), name=name)(x)
            gate, value = fc1("fc1_g"), fc1("fc1_x")
        else:
            packed = StackedDense(2, self.hidden, use_bias=True, kernel_names=("embed", None, "mlp"),
                                  bias_names=(None, "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                                  name="fc1")(x)
            gate, value = packed[..., 0, :], packed[..., 1, :]
        h = nn.with_logical_constraint(nn.silu(gate) * value, act_spec)
        h = nn.Dropout(self.drop_rate)(h, deterministic=not train)
        if self.scale_mlp:
            h = _layer_norm("norm", self.param_dtype)(h).astype(self.dtype)
        out = nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=_wlp(_trunc_normal(self.fc2_init_std), ("mlp", "embed")),
                       bias_init=_wlp(nn.initializers.zeros_init(), ("embed",)), name="fc2")(h)
        return nn.Dropout(self.drop_rate)(out, deterministic=not train)


class EvaBlock(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)), each branch under stochastic depth."""

    num_heads: int
    hidden: int
    qkv_fused: bool
    scale_mlp: bool
    layer_index: int
    drop_path_rate: float = 0.0
    proj_drop_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, sin: np.ndarray, cos: np.ndarray, *, train: bool = False) -> jax.Array:
        # timm's `fix_init_weight`: output projections of deeper blocks start smaller.
        out_std = 0.02 / math.sqrt(2.0 * (self.layer_index + 1))
        branch = EvaAttention(self.num_heads, self.qkv_fused, proj_init_std=out_std,
                              proj_drop_rate=self.proj_drop_rate, dtype=self.dtype, param_dtype=self.param_dtype,
                              attention_impl=self.attention_impl, name="attn")(
            _layer_norm("norm1", self.param_dtype)(x).astype(self.dtype), sin, cos, train=train)
        x = x + self._drop_path(branch, train)
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        branch = EvaSwiGLU(self.hidden, self.scale_mlp, fc2_init_std=out_std, drop_rate=self.proj_drop_rate,
                           dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
            _layer_norm("norm2", self.param_dtype)(x).astype(self.dtype), train=train)
        x = x + self._drop_path(branch, train)
        return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

    def _drop_path(self, branch: jax.Array, train: bool) -> jax.Array:
        if not train or self.drop_path_rate <= 0.0:
            return branch
        return drop_path(branch, self.drop_path_rate, self.make_rng("dropout"))


class Eva02(nn.Module):
    """EVA-02 ViT classifier on NHWC images.

    Methods: `__call__(x, train=False)` → float32 logits (B, num_classes); `features(x, train=False)` →
    pre-logits (B, embed_dim): mean of the patch tokens (cls excluded) then `fc_norm`, the classifier's
    feature space; `forward_features(x, train=False)` → all tokens (B, 1 + grid_h·grid_w, embed_dim),
    cls first. Pass `method="features"` etc. to `apply`. Calls with mutable=["intermediates"] also
    return `patch_tokens` (golden `inter/patch_embed`), `tokens_in` and `block{i}` token values.

    Dropout and drop-path draw from the 'dropout' rng stream and act only when `train=True`;
    `drop_path_rate` rises linearly from 0 (first block) to the given rate (last block), as in timm.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 14
    in_channels: int = 1
    num_classes: int = 2
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4 * 2 / 3
    qkv_fused: bool = True
    scale_mlp: bool = False
    ref_feat_shape: tuple[int, int] | None = (16, 16)
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0        # dropout before the head
    pos_drop_rate: float = 0.0    # dropout on the tokens after the position embedding
    proj_drop_rate: float = 0.0   # dropout after the attention projection and inside/after the MLP
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @property
    def grid(self) -> tuple[int, int]:
        height, width = pair(self.img_size)
        return height // self.patch_size, width // self.patch_size

    @property
    def hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def _check_config(self) -> None:
        height, width = pair(self.img_size)
        if self.patch_size <= 0 or height % self.patch_size or width % self.patch_size:
            raise ValueError(f"img_size {(height, width)} is not divisible by patch_size {self.patch_size}; "
                             f"use a multiple of {self.patch_size}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"head_dim = embed_dim / num_heads = {self.embed_dim // self.num_heads} must be "
                             "divisible by 4 for the 2-D rotary embedding")
        for name in ("drop_path_rate", "drop_rate", "pos_drop_rate", "proj_drop_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        layers.check_attention_impl(self.attention_impl, self.dtype)

    def setup(self) -> None:
        self._check_config()
        dim = self.embed_dim
        grid_h, grid_w = self.grid
        self.patch_embed = nn.Conv(dim, (self.patch_size, self.patch_size), strides=(self.patch_size, self.patch_size),
                                   padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                                   kernel_init=_wlp(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                                   bias_init=_wlp(nn.initializers.zeros_init(), ("embed",)))
        self.cls_token = self.param("cls_token", _wlp(_trunc_normal(0.02), (None, None, "embed")),
                                    (1, 1, dim), self.param_dtype)
        self.pos_embed = self.param("pos_embed", _wlp(_trunc_normal(0.02), (None, None, "embed")),
                                    (1, 1 + grid_h * grid_w, dim), self.param_dtype)
        self.pos_drop = nn.Dropout(self.pos_drop_rate)
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        self.blocks = [EvaBlock(self.num_heads, self.hidden, self.qkv_fused, self.scale_mlp, layer_index=i,
                                drop_path_rate=float(rates[i]), proj_drop_rate=self.proj_drop_rate,
                                dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)
                       for i in range(self.depth)]
        self.fc_norm = _layer_norm(None, self.param_dtype)
        self.head_drop = nn.Dropout(self.drop_rate)
        self.head = classifier_head(self.num_classes, self.dtype, self.param_dtype)

    def _check_input(self, x: jax.Array) -> None:
        height, width = pair(self.img_size)
        expected = (height, width, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            hint = ""
            if x.ndim == 4 and x.shape[1] == self.in_channels and tuple(x.shape[2:]) == (height, width):
                hint = " (this looks NCHW; transpose to NHWC)"
            raise ValueError(f"Eva02 expects NHWC images of shape (batch, {height}, {width}, {self.in_channels}), "
                             f"got {tuple(x.shape)}{hint}; to run at another resolution build the model with that "
                             "img_size and import the weights with models.convert.eva02_timm (pos_embed is resampled)")

    def forward_features(self, x: jax.Array, train: bool = False) -> jax.Array:
        self._check_input(x)
        batch = x.shape[0]
        tokens = self.patch_embed(x.astype(self.dtype))
        tokens = tokens.reshape(batch, -1, self.embed_dim)  # row-major (h, w), as timm flattens
        self.sow("intermediates", "patch_tokens", tokens)
        cls = jnp.broadcast_to(self.cls_token.astype(self.dtype), (batch, 1, self.embed_dim))
        tokens = jnp.concatenate([cls, tokens], axis=1) + self.pos_embed.astype(self.dtype)
        tokens = self.pos_drop(tokens, deterministic=not train)
        tokens = nn.with_logical_constraint(tokens, ("act_batch", "act_len", "act_embed"))
        self.sow("intermediates", "tokens_in", tokens)
        sin, cos = rope_table(self.grid, self.embed_dim // self.num_heads, self.ref_feat_shape)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, sin, cos, train=train)
            self.sow("intermediates", f"block{i}", tokens)
        return tokens

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        tokens = self.forward_features(x, train=train)
        pooled = jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1)
        return self.fc_norm(pooled)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        pre_logits = self.head_drop(self.features(x, train=train), deterministic=not train)
        return self.head(pre_logits.astype(self.dtype)).astype(jnp.float32)


def make_eva02(name: str = "S", *, img_size: int | tuple[int, int] = 224, num_classes: int,
               in_channels: int = 1, **overrides: Any) -> Eva02:
    """Eva02 of a named size (`EVA02_SIZES`: Ti, S, B as timm's eva02_*_patch14_224, or "tiny")."""
    if name not in EVA02_SIZES:
        raise ValueError(f"unknown EVA-02 size {name!r}; choose one of {sorted(EVA02_SIZES)}")
    patch_size = overrides.get("patch_size", 14)
    height, width = pair(img_size)
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {(height, width)} is not divisible by the patch size {patch_size}; "
                         f"use a multiple of {patch_size} (224 = 16·14 is the pretraining size)")
    config = {**EVA02_SIZES[name], **overrides}
    return Eva02(img_size=img_size, num_classes=num_classes, in_channels=in_channels, **config)


_BLOCK_RE = re.compile(r"blocks_(\d+)$")


def layer_id(param_path: Sequence[str], depth: int) -> int:
    """Layer index for layer-wise lr decay: embeddings 0, block i → i + 1, fc_norm/head → depth + 1.

    `param_path` is a flattened params path, e.g. ("blocks_3", "attn", "qkv", "kernel"), optionally
    starting with the "params" collection.
    """
    path = tuple(str(p) for p in param_path)
    if path and path[0] == "params":
        path = path[1:]
    if not path:
        raise ValueError("layer_id needs a non-empty parameter path")
    top = path[0]
    if top in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    match = _BLOCK_RE.match(top)
    if match:
        index = int(match.group(1))
        if index >= depth:
            raise ValueError(f"parameter path {path} names block {index} but the model has depth {depth}")
        return index + 1
    if top in ("fc_norm", "head"):
        return depth + 1
    raise ValueError(f"layer_id: unknown EVA-02 parameter path {path}")
