"""The generic train loop, on a toy regression task: learning, exact resume, NaN stop, sharding, SIGTERM."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import toy_task
from xray_dit import sharding
from xray_dit.train import loop

TOY_SCRIPT = REPO_ROOT / "tests" / "helpers" / "toy_task.py"


def _losses(workdir):
    from tests.test_foundation import read_events
    return {e.step: v.simple_value for e in read_events(workdir / "tensorboard") for v in e.summary.value
            if v.tag == "toy/train/loss"}


def test_loop_learns_and_writes_artefacts(tmp_path):
    config = toy_task.toy_config(steps=60)
    state = loop.train(config, tmp_path, toy_task.toy_task(config))
    losses = _losses(tmp_path)
    assert losses[60] < 0.3 * losses[5]
    assert int(state["step"]) == 60 and "ema_params" in state
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == 60


def test_rerun_of_finished_run_resumes_and_does_nothing(tmp_path):
    config = toy_task.toy_config(steps=10)
    first = loop.train(config, tmp_path, toy_task.toy_task(config))
    again = loop.train(config, tmp_path, toy_task.toy_task(config))
    for a, b in zip(jax.tree.leaves(first["params"]), jax.tree.leaves(again["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_model_state_is_trained_averaged_checkpointed_and_restored(tmp_path, caplog):
    config = toy_task.toy_config(steps=10, schedule="constant")
    straight = loop.train(config, tmp_path / "straight", toy_task.toy_batchnorm_task(config))
    stats, ema_stats = straight["model_state"]["batch_stats"], straight["ema_model_state"]["batch_stats"]
    assert float(jnp.abs(stats["BatchNorm_0"]["mean"]).max()) > 0.01     # moved from its zero start
    assert not np.allclose(stats["BatchNorm_0"]["var"], ema_stats["BatchNorm_0"]["var"])
    shutil.rmtree(tmp_path / "straight" / "checkpoints" / "10")   # the rerun resumes from step 5
    with caplog.at_level(logging.INFO):
        resumed = loop.train(config, tmp_path / "straight", toy_task.toy_batchnorm_task(config))
    assert "resumed from step 5" in caplog.text
    for key in ("params", "model_state", "ema_params", "ema_model_state"):
        for a, b in zip(jax.tree.leaves(straight[key]), jax.tree.leaves(resumed[key])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=key)


@pytest.mark.parametrize("kill_at", [7, 13])
def test_sigkill_and_restart_is_bit_identical_to_uninterrupted(tmp_path, kill_at):
    def run(workdir, *extra):
        return subprocess.run([sys.executable, str(TOY_SCRIPT), str(workdir), "20", *extra], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)
    ref = run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    killed = run(tmp_path / "killed", str(kill_at))
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final_params.npz").exists()
    resumed = run(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    a, b = np.load(tmp_path / "ref" / "final_params.npz"), np.load(tmp_path / "killed" / "final_params.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])


def test_nan_loss_stops_at_once_naming_step_and_checkpoint(tmp_path):
    config = toy_task.toy_config(steps=30)
    task = toy_task.toy_task(config, data=toy_task.toy_data(nan_at_batch=12))
    with pytest.raises(loop.NonFiniteLossError) as error:
        loop.train(config, tmp_path, task)
    message = str(error.value)
    assert "step 13" in message and "mse" in message and "checkpoint is step 10" in message


def test_sharded_fsdp_run_matches_single_device(tmp_path):
    def losses(mesh_shape, devices, workdir):
        config = toy_task.toy_config(steps=10, log_every=1)
        loop.train(config, workdir, toy_task.toy_task(config),
                   mesh=sharding.make_mesh(mesh_shape, devices=jax.devices()[:devices]))
        return _losses(workdir)
    single = losses((1, 1, 1), 1, tmp_path / "one")
    fsdp = losses((1, 8, 1), 8, tmp_path / "fsdp")
    tensor = losses((2, 1, 4), 8, tmp_path / "tensor")
    for step in range(1, 11):
        assert fsdp[step] == pytest.approx(single[step], rel=1e-5)
        assert tensor[step] == pytest.approx(single[step], rel=1e-5)


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(TOY_SCRIPT), str(workdir), "100000"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (workdir / "checkpoints").exists() or not any(
            p.name.isdigit() for p in (workdir / "checkpoints").iterdir()):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "preempted" in stderr
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(steps) % 5 != 0 or len(steps) >= 2  # the SIGTERM save is an extra, off-schedule step


def test_learning_rate_schedule_warmup_then_cosine():
    config = toy_task.toy_config(steps=100, warmup_steps=10, lr=1.0, schedule="cosine")
    schedule = loop.learning_rate_schedule(config.dit.train)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        loop.learning_rate_schedule(toy_task.toy_config(schedule="linear").dit.train)


def test_optimizer_applies_lr_multipliers_and_skips_decay_on_vectors():
    config = toy_task.toy_config(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.1, grad_clip=0.0)
    params = {"w": np.ones((2, 2), np.float32), "b": np.ones((2,), np.float32)}
    tx = loop.make_optimizer(config.dit.train, lr_multipliers={"w": 0.5, "b": 1.0})
    zero_grads = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 * 0.1 * np.ones((2, 2)))   # decay, scaled by 0.5
    np.testing.assert_allclose(updates["b"], np.zeros(2))                     # no decay on a bias
    assert optax.global_norm(updates) > 0


@pytest.mark.parametrize("prefetch", [0, 3])
def test_prefetched_device_batches_checkpoint_the_consumed_position(prefetch, tmp_path):
    # The prefetch thread runs ahead; the saved state must still be "after the last batch the loop took".
    from xray_dit import checkpoint
    mesh = sharding.make_mesh((-1, 1, 1))
    batches = loop._device_batches(toy_task.toy_data(batch_size=8), mesh, prefetch)
    taken = [next(batches) for _ in range(2)]
    assert isinstance(taken[0]["x"], jax.Array) and taken[0]["x"].sharding.spec[0] is not None
    time.sleep(0.2)  # let the prefetch thread fill its buffer
    saver = checkpoint.Checkpointer(tmp_path, every_steps=1, async_save=False)
    saver.save(2, {"w": np.zeros(1)}, data_iterator=batches)
    saver.close()
    expected = np.asarray(next(batches)["x"])
    batches.close()
    resumed = loop._device_batches(toy_task.toy_data(batch_size=8), mesh, prefetch)
    checkpoint.Checkpointer(tmp_path, every_steps=1).restore({"w": np.zeros(1)}, data_iterator=resumed)
    np.testing.assert_array_equal(np.asarray(next(resumed)["x"]), expected)
    resumed.close()
