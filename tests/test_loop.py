"""The generic train loop, on a toy regression task: learning, exact resume, NaN stop, sharding, SIGTERM."""

import dataclasses
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from tests.conftest import REPO_ROOT
from tests.helpers import toy_task
from xray_dit import checkpoint, sharding
from xray_dit.train import loop

TOY_SCRIPT = REPO_ROOT / "tests" / "helpers" / "toy_task.py"


def _losses(workdir):
    from tests.helpers.events import read_events
    return {e.step: v.simple_value for e in read_events(workdir / "tensorboard") for v in e.summary.value
            if v.tag == "toy/train/loss"}


def _event_files(workdir) -> set:
    return set((workdir / "tensorboard").glob("events.out.tfevents.*"))


def _loss_steps_logged_in(files, scratch) -> list[int]:
    """The steps whose training loss these event files hold (one entry per event), in order."""
    from tests.helpers.events import read_events
    scratch.mkdir()
    for path in files:
        shutil.copy(path, scratch / path.name)
    return [e.step for e in read_events(scratch) for v in e.summary.value if v.tag == "toy/train/loss"]


def _recording_evaluations(task) -> list[int]:
    """Makes `task` note the step of every evaluation the loop runs (one after every trained step when
    eval_every is 1, and one at the end, also when the run had nothing left to train)."""
    steps = []
    task.evaluate = lambda state, step, writer: steps.append(step) or {}
    return steps


def test_loop_learns_and_writes_artefacts(tmp_path):
    from tests.helpers.events import read_events
    config = toy_task.toy_config(steps=60, eval_every=40)
    task = toy_task.toy_task(config)

    def evaluate(state, step, writer):
        writer.write_texts(step, {"toy/note": f"evaluated at step {step}"})
        return {"seen": float(step)}
    task.evaluate = evaluate
    state = loop.train(config, tmp_path, task)
    losses = _losses(tmp_path)
    assert losses[60] < 0.3 * losses[5]
    # The task evaluates through the loop's own writer: one event file holds its scalars and texts.
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    tags = {(e.step, v.tag) for e in read_events(tmp_path / "tensorboard") for v in e.summary.value}
    assert {(40, "toy/eval/seen"), (60, "toy/eval/seen")} <= tags
    assert {step for step, tag in tags if tag.startswith("toy/note")} == {40, 60}
    assert int(state["step"]) == 60 and "ema_params" in state
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == 60


def test_rerun_of_finished_run_resumes_and_does_nothing(tmp_path, caplog):
    config = toy_task.toy_config(steps=10, eval_every=1)
    task = toy_task.toy_task(config)
    first_evaluations = _recording_evaluations(task)
    first = loop.train(config, tmp_path, task)
    assert first_evaluations == list(range(1, 11))
    logged = _event_files(tmp_path)
    task = toy_task.toy_task(config)
    evaluations = _recording_evaluations(task)
    with caplog.at_level(logging.INFO):
        again = loop.train(config, tmp_path, task)
    assert "[toy] resumed from step 10 in " in caplog.text
    assert evaluations == [10]   # only the final evaluation: no step was trained again
    assert _loss_steps_logged_in(_event_files(tmp_path) - logged, tmp_path / "rerun_events") == []
    assert int(again["step"]) == 10
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
    last_checkpoint = kill_at // 5 * 5   # the toy run checkpoints every 5 steps; the kill waits for it
    logged_before = _event_files(tmp_path / "killed")
    resumed = run(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert f"[toy] resumed from step {last_checkpoint} in " in resumed.stderr
    # The rerun trained only the steps after the checkpoint: its losses are logged from there on.
    logged_now = _loss_steps_logged_in(_event_files(tmp_path / "killed") - logged_before, tmp_path / "rerun_events")
    assert logged_now == [s for s in (5, 10, 15, 20) if s > last_checkpoint]
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


def _leaves_named(state, *names):
    """(where, array) of every state leaf whose path ends with `names` (params, EMA, both Adam moments)."""
    found = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        keys = tuple(getattr(entry, "key", getattr(entry, "name", None)) for entry in path)
        if keys[-len(names):] == names:
            found.append((jax.tree_util.keystr(path), leaf))
    return found


def _assert_sharded(state, names, spec, shard_shape):
    leaves = _leaves_named(state, *names)
    assert len(leaves) == 4, [where for where, _ in leaves]   # params, ema_params, Adam's mu and nu
    for where, leaf in leaves:
        assert leaf.sharding.spec == spec, (where, leaf.sharding.spec)
        assert {s.data.shape for s in leaf.addressable_shards} == {shard_shape}, where
        assert len(leaf.addressable_shards) == 8, where


def test_sharded_fsdp_run_matches_single_device(tmp_path):
    def run(mesh_shape, devices, workdir):
        config = toy_task.toy_config(steps=10, log_every=1)
        state = loop.train(config, workdir, toy_task.toy_task(config),
                           mesh=sharding.make_mesh(mesh_shape, devices=jax.devices()[:devices]))
        return _losses(workdir), state
    single, _ = run((1, 1, 1), 1, tmp_path / "one")
    fsdp, fsdp_state = run((1, 8, 1), 8, tmp_path / "fsdp")
    tensor, tensor_state = run((2, 1, 4), 8, tmp_path / "tensor")
    for step in range(1, 11):
        assert fsdp[step] == pytest.approx(single[step], rel=1e-5)
        assert tensor[step] == pytest.approx(single[step], rel=1e-5)
    # The toy's kernels are (8, 16) ("embed", "mlp") and (16, 1) ("mlp", "embed"): embed → fsdp, mlp →
    # tensor, and an axis that does not divide its dimension (8 fsdp devices for 1 output) is dropped.
    _assert_sharded(fsdp_state, ("Dense_0", "kernel"), P("fsdp", "tensor"), (1, 16))
    _assert_sharded(fsdp_state, ("Dense_1", "kernel"), P("tensor", None), (16, 1))
    _assert_sharded(tensor_state, ("Dense_0", "kernel"), P("fsdp", "tensor"), (8, 4))
    _assert_sharded(tensor_state, ("Dense_1", "kernel"), P("tensor", "fsdp"), (4, 1))
    for state in (fsdp_state, tensor_state):
        assert state["step"].sharding.is_fully_replicated


def test_loop_shards_eva02_by_its_tensor_axis_rules(tmp_path):
    """EVA-02 in the loop on a (data 1, fsdp 2, tensor 4) mesh: attention heads and the MLP hidden units
    are split over `tensor`, the model width over `fsdp`, in the state the loop trains and returns."""
    from xray_dit.models import eva02
    model = eva02.Eva02(img_size=16, patch_size=4, in_channels=1, num_classes=3, embed_dim=32, depth=1,
                        num_heads=4, mlp_ratio=2.0, ref_feat_shape=(4, 4))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(32, 16, 16, 1)).astype(np.float32)
    labels = rng.integers(0, 3, 32).astype(np.int32)
    data = iter(grain.MapDataset.source(list(range(32))).repeat()
                .map(lambda i: {"image": images[i], "label": labels[i]}).batch(8, drop_remainder=True)
                .to_iter_dataset())

    def loss_fn(params, batch, rng, step):
        logits = model.apply({"params": params}, batch["image"])
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], axis=1))
        return loss, {"ce": loss}

    # No step: the state as the loop lays it out (compiling EVA-02's sharded update would cost most of this
    # test; the toy run above checks that updates keep the layout).
    config = toy_task.toy_config(steps=0, batch_size=8, checkpoint_every=0)
    task = loop.TrainTask(name="eva02", init_params=lambda r: model.init(r, jnp.zeros((1, 16, 16, 1)))["params"],
                          loss_fn=loss_fn, train=config.dit.train, data=data)
    state = loop.train(config, tmp_path, task, mesh=sharding.make_mesh((1, 2, 4)))
    assert int(state["step"]) == 0
    _assert_sharded(state, ("blocks_0", "attn", "qkv", "kernel"), P("fsdp", None, "tensor"), (16, 3, 8))
    _assert_sharded(state, ("blocks_0", "attn", "q_bias"), P("tensor"), (8,))
    _assert_sharded(state, ("blocks_0", "attn", "proj", "kernel"), P("tensor", "fsdp"), (8, 16))
    _assert_sharded(state, ("blocks_0", "mlp", "fc1", "kernel"), P("fsdp", None, "tensor"), (16, 2, 16))
    _assert_sharded(state, ("blocks_0", "mlp", "fc2", "kernel"), P("tensor", "fsdp"), (16, 16))
    _assert_sharded(state, ("head", "kernel"), P("fsdp", None), (16, 3))


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, caplog):
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
    saved = re.search(r"\[toy\] preempted: checkpoint of step (\d+) saved", stderr)
    assert saved, stderr[-3000:]
    step = int(saved.group(1))
    assert (workdir / "checkpoints" / str(step)).is_dir()
    reader = checkpoint.Checkpointer(workdir / "checkpoints", every_steps=0)
    try:
        assert reader.latest_step == step and reader.interrupted_steps == []
    finally:
        reader.close()

    # The same command resumes there; run to two steps further, it trains exactly those two.
    config = toy_task.toy_config(steps=step + 2, eval_every=1)
    task = toy_task.toy_task(config)
    evaluations = _recording_evaluations(task)
    with caplog.at_level(logging.INFO):
        state = loop.train(config, workdir, task)
    assert f"[toy] resumed from step {step} in " in caplog.text
    assert evaluations == [step + 1, step + 2] and int(state["step"]) == step + 2


def test_sigterm_after_the_last_steps_check_still_stops_the_process_and_loses_nothing(tmp_path, monkeypatch):
    """Steps are dispatched ahead of their results, so a SIGTERM can land after the last step's check. The
    run has then saved its final step; the process must still stop (a study would otherwise start its next
    run with the request forgotten), and the rerun finds the run complete without training again."""
    config = toy_task.toy_config(steps=6)
    fetched, fetch = [], loop._fetch_batch

    def fetch_and_signal_at_the_last(data):   # the request arrives while the last step runs, unseen by its check
        fetched.append(fetch(data))
        if len(fetched) == 6:
            monkeypatch.setattr(loop._Preemption, "reached", lambda self, step: False)
            os.kill(os.getpid(), signal.SIGTERM)
        return fetched[-1]

    monkeypatch.setattr(loop, "_fetch_batch", fetch_and_signal_at_the_last)
    with pytest.raises(SystemExit) as stopped:
        loop.train(config, tmp_path, toy_task.toy_task(config))
    assert stopped.value.code == 0 and len(fetched) == 6
    reader = checkpoint.Checkpointer(tmp_path / "checkpoints", every_steps=0)
    try:
        assert reader.latest_step == 6
    finally:
        reader.close()
    monkeypatch.undo()
    fetched.clear()
    monkeypatch.setattr(loop, "_fetch_batch", lambda data: fetched.append(fetch(data)) or fetched[-1])
    state = loop.train(config, tmp_path, toy_task.toy_task(config))
    assert int(state["step"]) == 6 and fetched == []   # resumed at the end: nothing trained again


def test_learning_rate_schedule_warmup_then_cosine():
    config = toy_task.toy_config(steps=100, warmup_steps=10, lr=1.0, schedule="cosine")
    schedule = loop.learning_rate_schedule(config.dit.train)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)
    assert float(schedule(5)) == pytest.approx(0.5)   # linear warm-up
    # Cosine over the 90 steps after warm-up: lr · (1 + cos(π · done)) / 2; a linear decay would give
    # 0.667 and 0.333 at a third and two thirds.
    for step in (25, 40, 55, 70, 85):
        done = (step - 10) / 90
        assert float(schedule(step)) == pytest.approx(0.5 * (1 + math.cos(math.pi * done)), rel=1e-5), step
    assert float(schedule(40)) == pytest.approx(0.75, rel=1e-5) and float(schedule(70)) == pytest.approx(0.25, rel=1e-5)
    constant = loop.learning_rate_schedule(toy_task.toy_config(steps=100, warmup_steps=10, lr=2.0,
                                                               schedule="constant").dit.train)
    assert [float(constant(s)) for s in (5, 10, 55, 100)] == pytest.approx([1.0, 2.0, 2.0, 2.0])
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
