"""TensorBoard event files, the one-line progress report and the parameter overview.

clu's `metric_writers` import TensorFlow, which this project does not depend on; `MetricWriter` keeps
clu's method names (`write_scalars`, `write_images`, `write_texts`, `write_hparams`, `flush`, `close`)
and writes through tensorboardX, whose files TensorBoard reads. Only process 0 writes.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from clu import parameter_overview
from etils import epath


class MetricWriter:
    def __init__(self, logdir: str | epath.PathLike, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.logdir = str(logdir)
        self._writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            epath.Path(logdir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(logdir=self.logdir, flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self._writer:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(np.asarray(value)), global_step=int(step))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """images: name → uint8/float array (H, W), (H, W, C) or (N, H, W, C) with C in {1, 3}."""
        if not self._writer:
            return
        for name, image in images.items():
            image = np.asarray(image)
            if image.dtype != np.uint8:
                image = np.clip(image, 0.0, 1.0)
            if image.ndim == 2:
                image = image[..., None]
            fmt = "NHWC" if image.ndim == 4 else "HWC"
            self._writer.add_images(name, image, global_step=int(step), dataformats=fmt) if fmt == "NHWC" \
                else self._writer.add_image(name, image, global_step=int(step), dataformats=fmt)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        if not self._writer:
            return
        for name, text in texts.items():
            self._writer.add_text(name, text, global_step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Flat hyper-parameters as a TensorBoard text table (the HParams plugin needs a metric set)."""
        if not self._writer:
            return
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(hparams.items()))
        self._writer.add_text("hparams", "| key | value |\n|---|---|\n" + rows, global_step=0)

    def flush(self) -> None:
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()
            self._writer = None


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """ConfigDict/dict → {'a.b.c': value} for hparams tables."""
    items = config.items() if hasattr(config, "items") else []
    out: dict[str, Any] = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = value
    return out


class ProgressReport:
    """Logs `step, loss, steps/s, images/s, ETA` every `every_steps` steps (process 0 only)."""

    def __init__(self, *, total_steps: int, batch_size: int, every_steps: int, first_step: int = 0,
                 name: str = "train"):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.every_steps = max(1, every_steps)
        self.name = name
        self._last_step = first_step
        self._last_time = time.perf_counter()

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0 or step == self.total_steps

    def __call__(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
        """Reports and returns the throughput numbers (also worth writing to TensorBoard)."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        seconds = max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        steps_per_s = steps / seconds
        eta = (self.total_steps - step) / steps_per_s
        if jax.process_index() == 0:
            terms = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
            logging.info("[%s] step %d/%d  %s  %.2f steps/s  %.1f img/s  ETA %s", self.name, step,
                         self.total_steps, terms, steps_per_s, steps_per_s * self.batch_size,
                         _format_seconds(eta))
        return {"steps_per_sec": steps_per_s, "images_per_sec": steps_per_s * self.batch_size}


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def log_parameter_overview(params: Any, name: str = "params") -> str:
    """clu's table of every parameter (shape, size, mean, std), logged once at start."""
    text = parameter_overview.get_parameter_overview(params, include_stats=False)
    if jax.process_index() == 0:
        logging.info("%s overview:\n%s", name, text)
    return text
