"""The TensorBoard writer: readable event files, silence off process 0, the progress report and overview."""

import numpy as np
import pytest

from tests.helpers.events import read_events
from xray_dit import metric_writer


def test_metric_writer_produces_readable_event_files(tmp_path):
    writer = metric_writer.MetricWriter(tmp_path)
    writer.write_scalars(5, {"train/loss": 0.25})
    writer.write_images(5, {"samples": np.random.default_rng(0).random((2, 8, 8, 1))})
    writer.write_texts(5, {"note": "hello"})
    writer.write_hparams({"lr": 0.1})
    writer.close()
    values = [(e.step, v.tag, v.simple_value) for e in read_events(tmp_path) for v in e.summary.value]
    assert (5, "train/loss", 0.25) in values
    tags = {tag for _, tag, _ in values}
    assert any(t.startswith("samples") for t in tags) and any("note" in t for t in tags)


def test_metric_writer_is_silent_off_process_zero(tmp_path):
    writer = metric_writer.MetricWriter(tmp_path / "tb", enabled=False)
    writer.write_scalars(1, {"x": 1.0})
    writer.close()
    assert not (tmp_path / "tb").exists()


def test_progress_report_and_overview():
    report = metric_writer.ProgressReport(total_steps=100, batch_size=8, every_steps=10)
    assert report.due(10) and not report.due(11) and report.due(100)
    rates = report(10, {"loss": 1.0})
    assert rates["images_per_sec"] == pytest.approx(rates["steps_per_sec"] * 8)
    text = metric_writer.log_parameter_overview({"w": np.zeros((3, 4))})
    assert "w" in text and "(3, 4)" in text
