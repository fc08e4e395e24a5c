"""The GPU benchmark suite: its FLOP accounting, and a tiny end-to-end run on the CPU (the same code paths the
accelerator run takes, so a broken suite is found here, not in a session's few device minutes)."""

import json
import subprocess
import sys

import pytest

from bench import gpu_suite
from tests.conftest import REPO_ROOT
from xray_dit.models import dit


# Forward GFLOPs (multiply-adds, the paper's convention) of Peebles & Xie, Table 4, at 256 px (32x32 latents).
@pytest.mark.parametrize("name, paper_forward", [("DiT-S/2", 6.06), ("DiT-B/2", 23.01), ("DiT-L/2", 80.71),
                                                 ("DiT-XL/2", 118.64), ("DiT-XL/8", 7.39)])
def test_training_flops_are_three_forwards_of_the_papers_count(name, paper_forward):
    model = dit.make_dit(name)
    assert gpu_suite.dit_train_gflop_per_image(model) == pytest.approx(2 * 3 * paper_forward, rel=0.01)


def test_tiny_suite_runs_every_measured_path_and_renders_tables(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--tiny", f"--out={out}",
                           "--only=dit,loop", "--dit_rows=DiT-B/2:auto:dots:256"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["notes"] == []
    (row,) = results["dit"]
    assert row["remat"] == "dots" and row["images_per_s"] > 0 and row["plan_gib"] > 0 and row["xla_gbytes"] > 0
    assert results["profile"]["summary"]["busy_ms"] > 0
    assert results["profile"]["summary"]["categories"]["gemm"]["ms_per_step"] > 0
    assert results["loop"]["loop_step_ms"] > 0 and results["loop"]["bare_step_ms"] > 0
    markdown = (tmp_path / "results.md").read_text()
    assert "| DiT-B/2" in markdown and "| dots |" in markdown and "Kernel time by category" in markdown
    assert "The real training loop" in markdown
