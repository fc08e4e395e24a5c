"""Noise schedules of Gaussian diffusion (DDPM / improved DDPM as used by DiT), as float64 numpy tables.

The tables stay float64 (as in the reference); the losses and samplers look values up per timestep and
cast them to float32 before any arithmetic, which reproduces the PyTorch reference bit for bit.
`respace` keeps a subset of timesteps (fewer sampling steps) and records in `timestep_map` the
original timestep the model must be given.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULE_KINDS = ("linear", "cosine")


class Schedule(NamedTuple):
    """Per-timestep constants (length T, float64) and the index → original-timestep map (int64)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    alphas_cumprod_next: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    timestep_map: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def schedule_from_betas(betas: np.ndarray, timestep_map: np.ndarray | None = None) -> Schedule:
    """All derived tables from a beta sequence (the reference `GaussianDiffusion.__init__` formulas)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0 or not np.all((betas > 0) & (betas <= 1)):
        raise ValueError(f"betas must be a non-empty 1-D sequence in (0, 1], got shape {betas.shape}")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # The posterior variance is 0 at t=0; its log is clipped by repeating the t=1 value. A one-step
    # schedule has no t=1 (the reference leaves the table empty); it gets log β instead of log 0.
    if len(posterior_variance) > 1:
        posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    else:
        posterior_log_variance_clipped = np.log(betas)
    if timestep_map is None:
        timestep_map = np.arange(len(betas), dtype=np.int64)
    return Schedule(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        alphas_cumprod_next=alphas_cumprod_next,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        timestep_map=np.asarray(timestep_map, dtype=np.int64),
    )


def make_betas(kind: str = "linear", num_steps: int = 1000) -> np.ndarray:
    """DiT's named beta schedules: "linear" (1e-4 … 0.02, rescaled for T ≠ 1000) or "cosine"
    (Nichol & Dhariwal's squared-cosine ᾱ, betas capped at 0.999)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if kind == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if kind == "cosine":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999)
                         for i in range(num_steps)], dtype=np.float64)
    raise ValueError(f"unknown noise schedule {kind!r}; use one of {SCHEDULE_KINDS}")


def make_schedule(kind: str = "linear", num_steps: int = 1000) -> Schedule:
    return schedule_from_betas(make_betas(kind, num_steps))


def spaced_timesteps(num_steps: int, spacing: int | str) -> list[int]:
    """The kept timesteps, sorted. `spacing` is the reference's `timestep_respacing`:

    * an int N or "N": N steps spread over one section with the fractional stride (T-1)/(N-1), each
      rounded with Python `round` (half to even), as DiT's `create_diffusion("250")`;
    * "a,b,c": T split into equal sections taking a, b, c steps each;
    * "ddimN": the smallest integer stride s with exactly N steps in range(0, T, s) (the DDIM paper's
      even striding; N=1 gives [0]).
    """
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        desired = _positive_int(spacing[len("ddim"):], spacing)
        if desired > num_steps:
            raise ValueError(f"cannot take {desired} steps out of a {num_steps}-step schedule")
        for stride in range(1, num_steps + 1):
            if len(range(0, num_steps, stride)) == desired:
                return list(range(0, num_steps, stride))
        raise ValueError(f"cannot take exactly {desired} of {num_steps} steps with an integer stride; "
                         f"use the section form (e.g. '{desired}') instead of '{spacing}'")
    if isinstance(spacing, str):
        counts = [_positive_int(part, spacing) for part in spacing.split(",")]
    else:
        counts = [_positive_int(spacing, spacing)]
    size_per, extra = divmod(num_steps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps out of a section of {size} of the {num_steps}-step "
                             f"schedule (respacing {spacing!r}); ask for at most {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        # Accumulated (not multiplied) float strides, as the reference: the rounding of .5 cases
        # depends on the accumulated error.
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


def _positive_int(value, spacing) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ValueError(f"invalid timestep respacing {spacing!r}: use a positive step count such as 50, "
                         "'50', '10,20,30' or 'ddim50'")
    return number


def respace(schedule: Schedule, spacing: int | str) -> Schedule:
    """A shorter schedule over the kept timesteps with betas 1 - ᾱ[k_i]/ᾱ[k_{i-1}], so that the kept
    steps have exactly the original ᾱ; `timestep_map` composes with any earlier respacing."""
    kept = spaced_timesteps(schedule.num_steps, spacing)
    new_betas, last = [], 1.0
    for k in kept:
        new_betas.append(1 - schedule.alphas_cumprod[k] / last)
        last = schedule.alphas_cumprod[k]
    return schedule_from_betas(np.array(new_betas), schedule.timestep_map[np.array(kept)])


def extract(table: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """table[t] as float32, shaped (B, 1, …, 1) to broadcast against rank-`ndim` arrays.

    The float64 table is rounded to float32 before indexing, which equals the reference's
    index-then-cast; all arithmetic after the lookup is float32, as in the reference.
    """
    values = jnp.asarray(np.asarray(table, dtype=np.float32))[jnp.asarray(t)]
    return values.reshape(values.shape + (1,) * (ndim - 1))
