"""Foundation: configs and the entry point, mesh and sharding, checkpoints, TensorBoard writer."""

import json
import struct
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from tests.conftest import REPO_ROOT, require
from xray_dit import checkpoint, main, metric_writer, sharding


def run_main(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "xray_dit.main", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


# ---- configs and the entry point ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["quickstart", "dit_base", "vae", "classifier", "study"])
def test_every_config_loads_and_documents_its_command(name):
    path = require(REPO_ROOT / "configs" / f"{name}.py", f"config {name}.py")
    module = main.config_flags.config_flags._LoadConfigModule(name, str(path))
    config = module.get_config()
    assert config.task in main.TASKS
    assert "python -m xray_dit.main" in module.__doc__ and "Expected" in module.__doc__


def test_missing_reference_material_skips_locally_and_fails_under_ci(tmp_path, monkeypatch):
    def outcome(path):   # a skip must not escape: it would skip this test instead of failing it
        try:
            return require(path, "golden tensors")
        except (pytest.skip.Exception, pytest.fail.Exception) as stop:
            return type(stop), str(stop)

    missing = tmp_path / "golden"
    monkeypatch.delenv("CI", raising=False)
    kind, message = outcome(missing)
    assert kind is pytest.skip.Exception and f"golden tensors not found at {missing}" in message
    for value in ("true", "1"):
        monkeypatch.setenv("CI", value)
        kind, message = outcome(missing)
        assert kind is pytest.fail.Exception and f"golden tensors not found at {missing}" in message, value
    missing.mkdir()
    assert outcome(missing) == missing


def test_dit_base_is_the_study_run():
    from configs import dit_base
    config = dit_base.get_config()
    assert config.dit.model == "DiT-B/2" and config.data.image_size == 256
    assert config.dit.train.steps == 50_000 and config.dit.train.batch_size == 256
    assert config.data.target_class == "Cardiomegaly"


def test_main_runs_check_task_with_override(tmp_path):
    result = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path}", "--config.task=check",
                      "--config.mesh.shape=(1,1,-1)")
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["task"] == "check" and saved["mesh"]["shape"] == [1, 1, -1]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_unknown_override_key_is_named(tmp_path):
    result = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path}", "--config.dit.trian.steps=3")
    assert result.returncode == 2
    assert "unknown config key 'dit.trian.steps'" in result.stderr and "dit.train.steps" in result.stderr
    assert not (tmp_path / "config.json").exists()  # nothing written


@pytest.mark.parametrize("args, message", [
    ((), "missing --config"),
    (("--config=configs/no_such.py",), "does not exist"),
    (("--config=configs/quickstart.py",), "missing --workdir"),
    (("--config=configs/__init__.py", "--workdir=/tmp/x"), "defines no get_config"),
    (("--config=configs/quickstart.py", "--workdir=/proc/forbidden/x"), "cannot write to workdir"),
])
def test_bad_command_lines_give_one_clear_message(args, message):
    result = run_main(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("override, message", [
    ("dit.train.steps=abc", "--config.dit.train.steps=abc: dit.train.steps takes an int, like its current value"),
    ("dit.train.lr=fast", "dit.train.lr takes a float"),
    ("data.augment.hflip=maybe", "data.augment.hflip takes a bool"),
    ("mesh.shape=abc", r"mesh.shape takes a tuple of int values, like its current value \(-1, 1, 1\), not 'abc'"),
    ("data.labels=(1,2)", "data.labels takes a tuple of str values"),
])
def test_an_override_of_the_wrong_type_names_the_key_and_the_type(override, message):
    config = str(REPO_ROOT / "configs" / "quickstart.py")
    with pytest.raises(main.UsageError, match=message):
        main._check_argv(["main", f"--config={config}", f"--config.{override}"])
    main._check_argv(["main", f"--config={config}", "--config.dit.train.steps=12", "--config.dit.train.lr=1",
                      "--config.mesh.shape=(1,-1,1)", "--config.data.augment.hflip=true", "--config.data.labels=A,B"])


def test_compilation_cache_is_switched_on_where_configured(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        main._use_compilation_cache("")
        assert jax.config.jax_compilation_cache_dir == before
        main._use_compilation_cache(str(tmp_path / "cache"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
        with pytest.raises(main.UsageError, match="compilation_cache_dir"):
            main._use_compilation_cache("/proc/forbidden/cache")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_a_task_whose_module_cannot_be_imported_fails_loudly(tmp_path, monkeypatch):
    from configs import quickstart
    config = quickstart.get_config()
    config.task = "train_vae"
    monkeypatch.setitem(main.TASKS, "train_vae", ("xray_dit.train.no_such_module", "run"))
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        main.run(config, str(tmp_path))


# ---- mesh and sharding -------------------------------------------------------------------------------
@pytest.mark.parametrize("n, shape, expect", [
    (1, (-1, 1, 1), (1, 1, 1)), (2, (-1, 1, 1), (2, 1, 1)), (4, (1, -1, 2), (1, 2, 2)),
    (8, (2, 2, 2), (2, 2, 2)), (8, (1, 8, 1), (1, 8, 1)), (8, (-1, 1, 4), (2, 1, 4))])
def test_mesh_shapes(n, shape, expect):
    mesh = sharding.make_mesh(shape, devices=jax.devices()[:n])
    assert tuple(mesh.shape.values()) == expect and mesh.axis_names == sharding.MESH_AXES
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape", [(3, 1, 1), (-1, -1, 1), (2, 0, 1), (1, 1)])
def test_bad_mesh_shapes_are_refused(shape):
    with pytest.raises(ValueError, match="mesh.shape"):
        sharding.make_mesh(shape)


def _annotated_tree():
    import flax.linen as nn
    return {"dense": nn.LogicallyPartitioned(jnp.ones((16, 32)), ("embed", "mlp")),
            "conv": nn.LogicallyPartitioned(jnp.ones((3, 3, 1, 8)), (None, None, "conv_in", "conv_out")),
            "bias": jnp.zeros((32,))}


def _config_rules(**changes):
    from configs import base
    rules = dict(base.get_config().mesh.rules)
    rules.update(changes)
    return sharding.axis_rules(tuple(rules.items()))


def test_shard_params_follows_the_configs_logical_rules():
    mesh = sharding.make_mesh((2, 2, 2))
    params = sharding.shard_params(_annotated_tree(), mesh, _config_rules())
    assert params["dense"].sharding.spec == P("fsdp", "tensor")
    # 1 input channel cannot be split over fsdp=2: that dimension is replicated instead of failing.
    assert params["conv"].sharding.spec == P(None, None, None, "tensor")
    assert params["bias"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(params["dense"]), np.ones((16, 32)))
    # Another table is another placement, with no model change: here the MLP hidden goes over fsdp and tensor.
    params = sharding.shard_params(_annotated_tree(), mesh, _config_rules(embed=None, mlp=["fsdp", "tensor"]))
    assert params["dense"].sharding.spec == P(None, ("fsdp", "tensor"))


@pytest.mark.parametrize("rules, message", [
    ((("embed", "model"),), r"maps 'embed' to \['model'\], which are not mesh axes"),
    ((("embed",),), "pairs"),
])
def test_bad_axis_rules_are_refused(rules, message):
    with pytest.raises(ValueError, match=message):
        sharding.axis_rules(rules)


def test_host_batch_becomes_global_sharded_array():
    mesh = sharding.make_mesh((2, 4, 1))
    local = {"image": np.arange(16 * 4, dtype=np.float32).reshape(16, 2, 2, 1), "label": np.arange(16)}
    batch = sharding.host_to_global(local, mesh)
    assert batch["image"].shape == (16, 2, 2, 1)
    assert batch["image"].sharding.spec == P(("data", "fsdp"), None, None, None)
    assert len(batch["image"].addressable_shards) == 8
    np.testing.assert_array_equal(sharding.global_to_host(batch)["label"], np.arange(16))
    with pytest.raises(ValueError, match="not divisible"):
        sharding.local_batch_size(12, mesh)


# ---- checkpoints -------------------------------------------------------------------------------------
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


# ---- TensorBoard -------------------------------------------------------------------------------------
def read_events(logdir):
    """Parses TFRecord event files with tensorboardX's protos (TensorBoard reads the same bytes)."""
    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            events.append(event)
            pos += 12 + length + 4
    return events


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
