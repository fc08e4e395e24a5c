"""Several seeds trained in one program (train/seeds.py), against separate runs of each seed."""

from __future__ import annotations

import contextlib
import logging
import shutil

import jax
import numpy as np
import pytest

from tests.helpers import tiny_configs, toy_task
from xray_dit.train import loop, seeds

SEEDS = (0, 1)


def _seed_config(config, seed):
    config = config.copy_and_resolve_references()
    config.seed = seed
    return config


def _toy_runs(config, folder, make_task=toy_task.toy_task, nan_seed=None):
    runs = []
    for seed in SEEDS:
        seed_config = _seed_config(config, seed)
        data = toy_task.toy_data(seed=seed, nan_at_batch=3 if seed == nan_seed else None)
        runs.append(seeds.SeedRun(config=seed_config, workdir=folder / f"seed_{seed}",
                                  task=make_task(seed_config, data=data)))
    return runs


def _events(workdir):
    from tests.helpers.events import read_events
    return sorted((e.step, v.tag, v.simple_value) for e in read_events(workdir / "tensorboard")
                  for v in e.summary.value if v.tag.startswith("toy/") and "per_sec" not in v.tag)


def _layout(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if not {"tensorboard", "state", "data", "config"} & set(p.relative_to(folder).parts[1:]))


def _assert_same_state(a, b, exact=True):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        if exact:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6,
                                       err_msg=jax.tree_util.keystr(path))


def _separate(config, folder, make_task=toy_task.toy_task):
    return [loop.train(_seed_config(config, s), folder / f"seed_{s}",
                       make_task(_seed_config(config, s), data=toy_task.toy_data(seed=s))) for s in SEEDS]


def test_toy_seeds_unrolled_are_their_separate_runs_bit_for_bit(tmp_path):
    """Clipping is active and the seeds' gradient norms differ, so anything shared between seeds would show."""
    config = toy_task.toy_config(steps=12, log_every=1, grad_clip=0.5, eval_every=6)
    evaluate = lambda state, step, writer: {"sum": float(jax.tree.leaves(state["params"])[0].sum())}  # noqa: E731
    runs = _toy_runs(config, tmp_path / "together")
    for run in runs:
        run.task.evaluate = evaluate
    together = seeds.train(runs, vectorize=False)
    alone = []
    for seed in SEEDS:
        task = toy_task.toy_task(_seed_config(config, seed), data=toy_task.toy_data(seed=seed))
        task.evaluate = evaluate
        alone.append(loop.train(_seed_config(config, seed), tmp_path / "alone" / f"seed_{seed}", task))
    for seed, ours, theirs in zip(SEEDS, together, alone):
        _assert_same_state(ours, theirs)
        assert _events(tmp_path / "together" / f"seed_{seed}") == _events(tmp_path / "alone" / f"seed_{seed}")
    assert _layout(tmp_path / "together") == _layout(tmp_path / "alone")
    norms = [[v for _, tag, v in _events(tmp_path / "together" / f"seed_{s}") if tag == "toy/train/grad_norm"]
             for s in SEEDS]
    assert min(norms[0]) > 0.5 and norms[0] != norms[1]


def test_toy_seeds_vectorized_are_their_separate_runs_to_the_last_bits(tmp_path):
    """Not bit for bit on XLA:CPU: XLA multiplies by `1 / norm` in optax's clip in the vmapped program only."""
    config = toy_task.toy_config(steps=12, grad_clip=0.5)
    together = seeds.train(_toy_runs(config, tmp_path / "together"), vectorize=True)
    for ours, theirs in zip(together, _separate(config, tmp_path / "alone")):
        _assert_same_state(ours, theirs, exact=False)


def test_toy_seeds_with_model_state_resume_each_seed_from_its_own_checkpoints(tmp_path, caplog):
    config = toy_task.toy_config(steps=10, schedule="constant")
    straight = seeds.train(_toy_runs(config, tmp_path / "straight", toy_task.toy_batchnorm_task))
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "seed_1" / "checkpoints" / "10")   # both resume from step 5
    with caplog.at_level(logging.INFO):
        resumed = seeds.train(_toy_runs(config, tmp_path / "resumed", toy_task.toy_batchnorm_task))
    assert "seeds resumed from step 5" in caplog.text
    alone = _separate(config, tmp_path / "alone", toy_task.toy_batchnorm_task)
    for a, b, c in zip(straight, resumed, alone):
        _assert_same_state(a, b)
        _assert_same_state(a, c)
    assert not np.array_equal(straight[0]["model_state"]["batch_stats"]["BatchNorm_0"]["mean"],
                              straight[1]["model_state"]["batch_stats"]["BatchNorm_0"]["mean"])


def test_a_non_finite_loss_of_one_seed_stops_naming_that_seed(tmp_path):
    config = toy_task.toy_config(steps=10, log_every=1)
    with pytest.raises(loop.NonFiniteLossError, match=r"toy seed 1\] non-finite loss at step 4"):
        seeds.train(_toy_runs(config, tmp_path, nan_seed=1))


def test_seeds_trained_together_may_differ_only_in_their_seed(tmp_path):
    runs = _toy_runs(toy_task.toy_config(steps=2), tmp_path)
    runs[1].config.dit.train.lr = 0.5
    with pytest.raises(ValueError, match="differ only in config.seed"):
        seeds.train(runs)
    runs = _toy_runs(toy_task.toy_config(steps=2), tmp_path)
    runs[1].config.seed = 0
    with pytest.raises(ValueError, match="must differ"):
        seeds.train(runs)


# --------------------------------------------------------------------------------------------------
# The classifier: every seed of one program against its own run, bit for bit
# --------------------------------------------------------------------------------------------------
def _run_files(folder):
    """What a run leaves for the study, by name (Orbax's own files inside checkpoints and exports aside)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if not {"tensorboard", "params", "state", "data", "config"} & set(p.relative_to(folder).parts))


@contextlib.contextmanager
def _compilation_cache(directory):
    """JAX's persistent compilation cache, as `main` runs with it, here for programs that compile in under a
    second too: the second separate run reuses the first's programs, and every run the evaluation passes."""
    from jax.experimental.compilation_cache import compilation_cache
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        compilation_cache.reset_cache()


@pytest.mark.parametrize("model", ["tiny", "resnet_tiny"])
def test_classifier_seeds_in_one_program_are_their_separate_runs_bit_for_bit(model, phantom_data_dir, tmp_path,
                                                                             monkeypatch):
    from xray_dit import checkpoint, sharding
    from xray_dit.evaluation import classification
    from xray_dit.train import classifier
    config = tiny_configs.tiny_config(phantom_data_dir)
    config.task = "train_classifier"
    config.classifier.model = model
    config.classifier.baselines = ()
    config.classifier.train.update(steps=4, log_every=2, eval_every=2, checkpoint_every=4)
    mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:1])
    finals = {}
    seeds_train, loop_train = seeds.train, loop.train
    monkeypatch.setattr(seeds, "train", lambda runs, **kw: finals.setdefault("together", seeds_train(runs, **kw)))
    monkeypatch.setattr(loop, "train", lambda c, w, t, **kw: finals.setdefault(w, loop_train(c, w, t, **kw)))

    with _compilation_cache(tmp_path / "jax_cache"):
        together = classifier.train_classifier_seeds(config, tmp_path / "together", SEEDS, mesh=mesh)
        alone = [classifier.train_classifier(_seed_config(config, seed), tmp_path / "alone" / f"seed_{seed}",
                                             mesh=mesh) for seed in SEEDS]
    for k, seed in enumerate(SEEDS):
        ours, theirs = tmp_path / "together" / f"seed_{seed}", tmp_path / "alone" / f"seed_{seed}"
        _assert_same_state(finals["together"][k], finals[theirs])
        assert together[seed] == alone[k]
        assert (ours / "results.json").read_text() == (theirs / "results.json").read_text()
        assert _run_files(ours) == _run_files(theirs)
        for split in ("validation", "test"):
            name = f"predictions_{split}.csv"
            assert (ours / name).read_bytes() == (theirs / name).read_bytes()
            assert np.isfinite(classification.read_predictions(ours / name)["probs"]).all()
        kept = [checkpoint.load_export(folder / "best")[0] for folder in (ours, theirs)]
        _assert_same_state(*kept)
    assert together[0] != together[1]


@pytest.mark.parametrize("in_one_program", [True, False])
def test_the_study_trains_an_arms_seeds_in_one_program_when_configured(in_one_program, tmp_path, monkeypatch):
    from configs import base
    from xray_dit.study import context as context_lib
    from xray_dit.study import training
    from xray_dit.train import classifier
    calls = []

    def together(config, folder, seeds_, *, mesh, **mix):
        calls.append(("together", list(seeds_), config.data.roundtrip_prob, mix))
        return {seed: {"best_step": 10 + seed} for seed in seeds_}

    def alone(config, workdir, *, mesh, **mix):
        calls.append(("alone", config.seed, config.data.roundtrip_prob, mix))
        return {"best_step": 10 + config.seed}
    monkeypatch.setattr(classifier, "train_classifier_seeds", together)
    monkeypatch.setattr(classifier, "train_classifier", alone)
    config = base.get_config()
    config.study.update(seeds=(3, 5), seeds_in_one_program=in_one_program)
    context = context_lib.StudyContext(config=config, workdir=tmp_path, mesh=None, results={})
    runs = training._classifier_runs(context, tmp_path / "arm", data={"roundtrip_prob": 0.25}, synthetic="folder",
                                     synthetic_count=8)
    assert runs == {str(s): {"workdir": str(tmp_path / "arm" / f"seed_{s}"), "best_step": 10 + s} for s in (3, 5)}
    mix = {"synthetic": "folder", "synthetic_count": 8}
    assert calls == ([("together", [3, 5], 0.25, mix)] if in_one_program
                     else [("alone", 3, 0.25, mix), ("alone", 5, 0.25, mix)])
