"""Training objectives of the ε-predicting DiT: the forward process and the hybrid (MSE + vb) loss.

With learned-range variance the loss is Nichol & Dhariwal's L_hybrid as DiT trains it: the ε MSE plus
the variational bound in bits per dimension, where the vb term sees ε with its gradient stopped (it
only trains the variance). Terms are per example (B,); reduce them in the train step.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from xray_dit.diffusion.samplers import p_mean_variance, q_posterior_mean_variance, split_model_output
from xray_dit.diffusion.schedules import Schedule, extract


class LossTerms(NamedTuple):
    loss: jax.Array   # mse + vb, (B,)
    mse: jax.Array    # ε mean squared error, (B,)
    vb: jax.Array     # variational bound in bits/dim, (B,); zeros without learned variance


def mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def q_sample(schedule: Schedule, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·noise."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)


def epsilon_mse_loss(eps_pred: jax.Array, noise: jax.Array) -> jax.Array:
    """Per-example mean of (noise − ε̂)²; `eps_pred` must have the noise's shape (split off variance first)."""
    if eps_pred.shape != noise.shape:
        raise ValueError(f"eps prediction {eps_pred.shape} and noise {noise.shape} differ in shape; pass only "
                         "the ε channels (split_model_output) of a learned-variance model")
    return mean_flat(jnp.square(noise - eps_pred))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of Φ used by the reference (not the exact erf form)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """log-likelihood of data in [-1, 1] quantised to 256 levels (bins ±1/255; the edge bins are open)."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(schedule: Schedule, model_out: jax.Array, x_start: jax.Array, x_t: jax.Array,
                 t: jax.Array) -> jax.Array:
    """The vb term L_t in bits/dim per example: KL(q(x_{t-1}|x_t,x_0) ‖ p) for t > 0, and the decoder
    NLL −log p(x_0|x_1) at t = 0. x_0 is never clipped here."""
    true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x_start, x_t, t)
    est = p_mean_variance(schedule, model_out, x_t, t, clip_denoised=False)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, est.mean, est.log_variance)) / math.log(2.0)
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
        x_start, means=est.mean, log_scales=0.5 * est.log_variance)) / math.log(2.0)
    return jnp.where(jnp.asarray(t) == 0, decoder_nll, kl)


def hybrid_loss(schedule: Schedule, model_out: jax.Array, x_start: jax.Array, x_t: jax.Array, t: jax.Array,
                noise: jax.Array) -> LossTerms:
    """MSE on ε plus, for a learned-variance (2C-channel) output, the vb term with ε frozen.

    A C-channel output (fixed variance) gets loss = mse and vb = 0, as the reference's MSE loss type.
    """
    eps, var_values = split_model_output(model_out, x_start.shape[-1])
    mse = epsilon_mse_loss(eps, noise)
    if var_values is None:
        return LossTerms(mse, mse, jnp.zeros_like(mse))
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), var_values], axis=-1)
    vb = vb_terms_bpd(schedule, frozen, x_start, x_t, t)
    return LossTerms(mse + vb, mse, vb)


def training_losses(model_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: Schedule,
                    x_start: jax.Array, t: jax.Array, noise: jax.Array) -> LossTerms:
    """Noises x_0 to x_t, runs `model_fn(x_t, timestep_map[t])` and returns `hybrid_loss`'s terms.

    t are schedule indices (sample them uniformly in [0, num_steps)); the model sees original timesteps.
    """
    x_t = q_sample(schedule, x_start, t, noise)
    model_t = jnp.asarray(schedule.timestep_map, jnp.int32)[jnp.asarray(t)]
    return hybrid_loss(schedule, model_fn(x_t, model_t), x_start, x_t, t, noise)
