"""Shared by the trainers' tests: a PNG read back, a one-device mesh, a phantom batch and a few Adam steps."""

from __future__ import annotations

import jax
import numpy as np
import optax
from PIL import Image

from xray_dit import sharding
from xray_dit.data import phantom


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def one_device_mesh():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def phantom_batch(count: int, size: int) -> np.ndarray:
    images = [phantom.render(image, size) for image in phantom.make_cohort(count, seed=3)]
    return (np.stack(images).astype(np.float32)[..., None] / 127.5 - 1.0)


def fit(loss_of_params, params, *, steps: int, lr: float) -> tuple[float, float]:
    tx = optax.adam(lr)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_of_params)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert all(np.isfinite(losses)), losses
    return losses[0], float(loss_of_params(params))
