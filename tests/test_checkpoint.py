"""Checkpoints: bit-identical round trips (iterator included), relative paths, the save interval and the last k
kept, restoring onto another mesh, clear errors, falling back past a corrupt or an uncommitted checkpoint.

The uncommitted one is real: a child process SIGKILLed while Orbax commits (tests/helpers/crash_child.py)."""

import logging
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from tests.helpers import toy_task
from tests.helpers.crash_child import KILLED_SAVE, TOY_EVERY, TOY_STEPS, run_child
from xray_dit import checkpoint, sharding
from xray_dit.train import loop


def _state(mesh, spec=P("fsdp", None)):
    params = jax.device_put(jnp.arange(64.0).reshape(8, 8), jax.sharding.NamedSharding(mesh, spec))
    return {"params": {"w": params}, "opt_state": {"mu": params * 0.5, "count": jnp.asarray(7)},
            "step": jnp.asarray(3, jnp.int32), "rng": jax.random.PRNGKey(42)}


def _iterator():
    return iter(grain.MapDataset.range(100).seed(1).shuffle().batch(4).to_iter_dataset())


def test_checkpoint_roundtrip_is_bit_identical_including_iterator(tmp_path):
    mesh = sharding.make_mesh((1, 8, 1))
    state, it = _state(mesh), _iterator()
    for _ in range(3):
        next(it)
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every_steps=1, keep=2)
    ckpt.save(3, state, data_iterator=it, config=ml_collections.ConfigDict({"a": 1}))
    expected_next = next(it)
    ckpt.close()

    fresh_it = _iterator()
    template = jax.tree.map(jnp.zeros_like, state)
    restored, step = checkpoint.Checkpointer(tmp_path / "ckpt", every_steps=1).restore(template, data_iterator=fresh_it)
    assert step == 3
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(next(fresh_it), expected_next)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.restore(3, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"] == {"a": 1}


def test_relative_checkpoint_and_export_paths_work(tmp_path, monkeypatch):
    # The README's quickstart passes --workdir=workdir/quickstart; Orbax itself only takes absolute paths.
    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(3.0)}
    ckpt = checkpoint.Checkpointer("work/ckpt", every_steps=1, async_save=False)
    assert ckpt.save(1, state)
    ckpt.close()
    restored, step = checkpoint.Checkpointer("work/ckpt", every_steps=1).restore(state)
    assert step == 1 and np.array_equal(restored["w"], state["w"])
    checkpoint.save_export("work/export", state, {"kind": "toy"})
    params, info = checkpoint.load_export("work/export", state, kind="toy")
    assert np.array_equal(params["w"], state["w"]) and (tmp_path / "work" / "export" / "model.json").exists()


def test_checkpoint_saves_at_the_interval_or_when_forced_keeps_last_k_and_restores_onto_another_mesh(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every_steps=2, keep=2, async_save=False)
    state = _state(sharding.make_mesh((1, 8, 1)))
    assert [step for step in range(1, 6) if ckpt.save(step, state)] == [2, 4]
    assert ckpt.save(5, state, force=True) and not ckpt.save(5, state, force=True)
    ckpt.close()
    reader = checkpoint.Checkpointer(tmp_path / "ckpt", every_steps=1)
    assert reader.all_steps() == [4, 5]
    other = _state(sharding.make_mesh((2, 1, 4)), spec=P(None, "tensor"))
    restored, _ = reader.restore(jax.tree.map(jnp.zeros_like, other))
    assert restored["params"]["w"].sharding.spec == P(None, "tensor")
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(64.0).reshape(8, 8))


def test_incompatible_checkpoint_is_a_clear_error(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every_steps=1, async_save=False)
    ckpt.save(1, {"params": {"w": jnp.ones((4, 4))}})
    ckpt.close()
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="new --workdir"):
        checkpoint.Checkpointer(tmp_path / "ckpt", every_steps=1).restore({"params": {"w": jnp.ones((5, 4))}})


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every_steps=1, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"params": {"w": jnp.full((4, 4), float(step))}})
    ckpt.close()
    for f in (tmp_path / "ckpt" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    restored, step = checkpoint.Checkpointer(tmp_path / "ckpt", every_steps=1).restore(
        {"params": {"w": jnp.zeros((4, 4))}})
    assert step == 1 and float(restored["params"]["w"][0, 0]) == 1.0


def test_sigkill_while_a_checkpoint_commits_resumes_from_the_last_complete_one(tmp_path, caplog):
    workdir = tmp_path / "killed"
    killed = run_child("checkpoint", workdir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert "5" in left and str(KILLED_SAVE) not in left
    assert any(name.startswith(f"{KILLED_SAVE}.") for name in left), left   # the uncommitted write

    config = toy_task.toy_config(steps=TOY_STEPS, checkpoint_every=TOY_EVERY)
    with caplog.at_level(logging.INFO):
        resumed = loop.train(config, workdir, toy_task.toy_task(config))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    interrupted = [w for w in warnings if f"[{KILLED_SAVE}]" in w]
    assert len(interrupted) == 1, warnings
    assert "incomplete" in interrupted[0] and "last complete checkpoint, step 5" in interrupted[0]
    assert "resumed from step 5" in caplog.text

    # Only steps 6..10 were lost and redone: the result is the uninterrupted run's, bit for bit.
    reference = loop.train(config, tmp_path / "reference", toy_task.toy_task(config))
    for a, b in zip(jax.tree.leaves(reference["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "15", "20"]
    # Once cleaned up, the next start has nothing to warn about.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        reader = checkpoint.Checkpointer(workdir / "checkpoints", every_steps=TOY_EVERY)
    assert reader.interrupted_steps == [] and reader.latest_step == TOY_STEPS
    assert "still being written" not in caplog.text
    reader.close()
