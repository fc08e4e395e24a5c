"""The GPU benchmark suite: its FLOP accounting, and a tiny end-to-end run on the CPU (the same code paths the
accelerator run takes, so a broken suite is found here, not in a session's few device minutes)."""

import json
import subprocess
import sys

import pytest

from bench import gpu_suite
from tests.conftest import REPO_ROOT
from xray_dit.models import dit, factory


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
    assert results["profile"]["summary"]["busy_ms"] > 0 and (tmp_path / "dit_trace.json.gz").exists()
    assert not (tmp_path / "jax_cache").exists()   # bulky working files stay out of the returned folder
    assert results["profile"]["summary"]["categories"]["gemm"]["ms_per_step"] > 0
    assert results["loop"]["bare_step_ms"] > 0
    assert all(results["loop"][f"prefetch_{p}"]["loop_step_ms"] > 0 for p in (0, 2))
    markdown = (tmp_path / "results.md").read_text()
    assert "| DiT-B/2" in markdown and "| dots |" in markdown and "Kernel time by category" in markdown
    assert "The real training loop" in markdown and "| batches prefetched to the device |" in markdown


def test_every_full_size_row_traces_with_its_real_shapes():
    # The tiny run cannot catch a shape that only the real sizes have (a 256 px EVA-02 with patch 14 did
    # once); tracing the real step with abstract arrays costs no device time and no memory.
    import jax
    import jax.numpy as jnp
    from xray_dit import sharding
    for name, _, remat, batch in gpu_suite.DIT_ROWS:
        model = gpu_suite._dit_model(name, 32, "xla", remat, jnp.bfloat16, tiny=False)
        _, tx, update = gpu_suite._dit_update(model)
        params = sharding.unbox(factory.abstract_params(model))
        state = {"params": params, "ema_params": params, "opt_state": jax.eval_shape(tx.init, params),
                 "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(lambda: jax.random.PRNGKey(1))}
        batch_data = {"mean": jax.ShapeDtypeStruct((batch, 32, 32, 4), jnp.float32),
                      "std": jax.ShapeDtypeStruct((batch, 32, 32, 4), jnp.float32),
                      "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
        new_state, metrics = jax.eval_shape(update, state, batch_data)
        assert jax.tree.structure(new_state) == jax.tree.structure(state) and metrics["loss"].shape == ()
    for size in (224, 256):
        model = gpu_suite._eva_model(size, tiny=False, attention="xla", dtype=jnp.bfloat16)
        logits = jax.eval_shape(lambda m=model: m.init_with_output(jax.random.PRNGKey(0),
                                                                   jnp.zeros((2, size, size, 1)))[0])
        assert logits.shape == (2, 14)


def test_a_failing_row_is_retried_with_remat_then_noted_and_the_suite_goes_on(tmp_path):
    # On the device an out-of-memory row must cost one retry, not the session's run.
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--tiny", f"--out={out}", "--only=dit,vae",
                           "--dit_rows=DiT-Q/2:auto:none:256"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["dit"] == [] and "vae_encode" in results
    first, second = results["notes"]
    assert "without remat failed" in first and "unknown DiT model" in first
    assert "DiT-Q/2 auto dots 256 failed" in second


def test_an_unknown_part_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--tiny", f"--out={out}", "--only=vae,gpu"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown part 'gpu' in --only; choose from dit,loop,eva" in proc.stderr
    assert not out.exists()
    assert list(gpu_suite.PARTS) == ["dit", "loop", "eva", "pipeline", "sample", "vae"]   # the default order
