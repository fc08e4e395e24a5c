"""The entry point and the configs: every config loads, documents its command and plans what it promises;
command-line overrides and their errors; the checks `main.run` makes before anything runs."""

import json
import subprocess
import sys

import jax
import pytest

from tests.conftest import REPO_ROOT, require
from xray_dit import main
from xray_dit.data import prepared
from xray_dit.models import factory
from xray_dit.study import arms, phases
from xray_dit.train import classifier


def run_main(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "xray_dit.main", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("name", ["quickstart", "dit_base", "vae", "classifier", "study"])
def test_every_config_loads_and_documents_its_command(name):
    path = require(REPO_ROOT / "configs" / f"{name}.py", f"config {name}.py")
    module = main.config_flags.config_flags._LoadConfigModule(name, str(path))
    config = module.get_config()
    assert config.task in main.TASKS
    assert "python -m xray_dit.main" in module.__doc__ and "Expected" in module.__doc__


def test_dit_base_is_the_study_run():
    from configs import dit_base
    config = dit_base.get_config()
    assert config.dit.model == "DiT-B/2" and config.data.image_size == 256
    assert config.dit.train.steps == 50_000 and config.dit.train.batch_size == 256
    assert config.data.target_class == "Cardiomegaly"


def _keys(config, prefix=""):
    return {prefix + k for k, v in config.items()} | {
        key for k, v in config.items() if hasattr(v, "items") for key in _keys(v, prefix + k + ".")}


@pytest.mark.parametrize("name, task", [("vae", "train_vae"), ("classifier", "train_classifier")])
def test_task_configs_set_their_task_keep_the_base_keys_and_name_bad_variants(name, task):
    import importlib
    from configs import base
    from xray_dit import main
    module = importlib.import_module(f"configs.{name}")
    for variant, dataset in ((None, "cxr_phantom"), ("phantom", "cxr_phantom"), ("nih", "nih_chestxray14")):
        config = module.get_config(variant)
        assert config.task == task and config.data.name == dataset
        assert _keys(config) == _keys(base.get_config())   # overrides only, no key of their own
    with pytest.raises(ValueError, match="phantom.*nih"):
        module.get_config("chexpert")
    main._check_argv(["main", f"--config={REPO_ROOT}/configs/{name}.py:nih", f"--config.{name}.train.steps=5"])
    phantom_config = module.get_config()
    assert phantom_config.data.image_size == 64 and phantom_config.compute_dtype == "float32"


@pytest.mark.parametrize("variant, model, size", [("resnet50", "resnet50", 256), ("pretrained_vit", "S", 224)])
def test_study_variants_start_from_imported_weights_and_a_missing_import_stops_at_once(
        tmp_path, monkeypatch, variant, model, size):
    from configs import base, study
    from xray_dit import main
    config = study.get_config(variant)
    assert _keys(config) == _keys(base.get_config())
    assert config.classifier.model == model and config.data.image_size == size and config.classifier.init_from
    factory.check_sizes(config)
    built = factory.classifier_from_config(config, num_classes=len(config.data.labels))
    assert factory.kind_of(built) == ("resnet" if model.startswith("resnet") else "eva02")
    command = classifier.import_command(config)
    assert command.split(" --src=")[0] in " ".join(study.__doc__.split())   # the docstring's command
    config.classifier.init_from = str(tmp_path / "weights" / variant)
    config.data.update(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "nih"))
    monkeypatch.setattr(prepared, "ensure_prepared", lambda *a: pytest.fail("data prepared before the weights check"))
    with pytest.raises(main.UsageError) as error:
        main.run(config, str(tmp_path / "work"))
    message = str(error.value)
    assert "\n" not in message and f"{tmp_path}/weights/{variant}/model.json" in message
    assert classifier.import_command(config) in message
    assert not (tmp_path / "work").exists() and not (tmp_path / "tfds").exists()
    config.task = "train_classifier"
    with pytest.raises(ValueError, match="no imported weights there"):
        classifier.train_classifier(config, tmp_path / "work")
    (tmp_path / "weights" / variant / "params").mkdir(parents=True)
    (tmp_path / "weights" / variant / "model.json").write_text(json.dumps({"kind": "dit"}))
    with pytest.raises(ValueError, match="holds 'dit' weights.*--kind="):
        classifier.check_init_from(config)
    with pytest.raises(ValueError, match="resnet50.*pretrained_vit"):
        study.get_config("vit")


@pytest.mark.parametrize("name, kinds, num_arms, fractions", [
    ("quickstart", {"synthetic", "oversampled", "phantom_positive"}, 3, [1.0]),
    ("phantom_full", set(arms.ARM_KINDS), 21, [1.0, 0.25]),
    ("study", set(arms.ARM_KINDS) - {"phantom_positive"}, 28, [1.0, 0.25]),   # NIH: no phantom control
])
def test_study_configs_plan_the_design_they_promise(name, kinds, num_arms, fractions):
    import importlib

    from xray_dit import main
    from xray_dit.study import training
    config = importlib.import_module(f"configs.{name}").get_config()
    main._check_config(config)
    generators = [{"name": training.generator_name(variant, seed), "seed": seed}
                  for variant in training.generator_variants(config) for seed in config.study.generator_seeds]
    plan = arms.plan_arms(config.study, accepted_count=int(config.study.num_synthetic),
                          have_phantom=config.data.name == "cxr_phantom", generators=generators)
    assert {a["kind"] for a in plan} == kinds and len(plan) == num_arms
    primary = {(a["kind"], a["generator"]) for a in plan if a["primary"]}
    assert {("oversampled", None)} | {("synthetic", g["name"]) for g in generators} <= primary
    assert phases.target_fractions(config) == fractions
    assert config.study.num_synthetic >= max(config.study.synthetic_counts)
    assert config.classifier.select_metric == f"auc/{config.data.target_class}"
    if name != "quickstart":
        assert set(config.study.generators) == set(training.GENERATOR_VARIANTS)


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


def test_a_missing_nih_download_is_one_line_naming_the_config_key_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "xray_dit.main", "--config=configs/quickstart.py", f"--workdir={tmp_path / 'run'}",
         "--config.task=train_classifier", "--config.data.name=nih_chestxray14", "--config.compilation_cache_dir=",
         f"--config.data.manual_dir={tmp_path / 'nowhere'}"], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"looked at: {tmp_path / 'nowhere'}" in errors[0] and "--config.data.manual_dir=<folder>" in errors[0]


@pytest.mark.parametrize("task", ["study", "train_dit"])
def test_a_target_class_outside_the_labels_is_refused_before_any_data_is_prepared(tmp_path, task):
    from configs import quickstart
    config = quickstart.get_config()
    config.task = task
    config.dit.class_conditional = True
    config.data.target_class = "Hernia"
    with pytest.raises(main.UsageError, match=r"data.target_class 'Hernia' is not one of data.labels \('Cardiomegaly', "
                                              r"'Effusion', 'Nodule'\); set --config.data.target_class"):
        main.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value, message", [
    ("shape", (3, 1, 1), r"config.mesh.shape \(3, 1, 1\) uses 3 devices but 8 are available"),
    ("rules", (("embed", "model"),), r"config.mesh.rules maps 'embed' to \['model'\], which are not mesh axes"),
])
def test_mesh_mistakes_are_refused_before_anything_runs(tmp_path, key, value, message):
    from configs import quickstart
    config = quickstart.get_config()
    config.task = "check"
    config.mesh[key] = value
    with pytest.raises(main.UsageError, match=message):
        main.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
