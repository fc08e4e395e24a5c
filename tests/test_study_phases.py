"""The study end to end on a micro configuration: every artefact, statistics on the right rows, resume.

One run (module-scoped) of all nine phases on a 400-image phantom with tiny models, every arm kind and two
generator seeds, watched by spies that record which split every image pass reads, which rows the statistics
receive and what each classifier run mixes in. The scarcity runner's fraction loop, and a study killed in its
report phase, are tested on stand-in phases.
"""

import collections
import contextlib
import inspect
import json
import logging
import pathlib

import jax
import numpy as np
import pytest
from etils import epath
from sklearn.metrics import confusion_matrix

from tests.helpers import tiny_configs
from xray_dit import sharding
from xray_dit.data import phantom
from xray_dit.data.builders import cxr_phantom
from xray_dit.evaluation import classification, privacy
from xray_dit.study import arms
from xray_dit.study import context as context_lib
from xray_dit.study import filters, phases
from xray_dit.train import classifier as classifier_trainer
from xray_dit.train import eval_pass

MICRO_NAME = "64_micro"
# Enough Cardiomegaly that every split holds some (validation thresholds and held-out distances need them).
MICRO_SPEC = phantom.PhantomSpec(cardiomegaly_prevalence=0.25, label_noise=0.0)
TEST_READERS = {"evaluate_on_test", "privacy_and_quality"}   # the only code allowed to read the test split
BASELINE = "real only"
ALPHA = 0.05   # the study's significance level, as its statements print it


def micro_config(data_dir):
    """Every arm kind, two generator seeds, two classifier seeds; the classifiers take 10 steps."""
    config = tiny_configs.tiny_config(data_dir)
    config.data.builder_config = MICRO_NAME
    config.study.update(seeds=(0, 1), num_synthetic=16, synthetic_counts=(8,), primary_count=8, bootstrap_samples=200,
                        arms=arms.ARM_KINDS, generator_seeds=(0, 1))
    config.classifier.train.update(steps=10, log_every=10, eval_every=10, checkpoint_every=10)
    config.sample.update(batch_size=16, num_steps=4)
    config.dit.train.eval_every = 20
    return config


@contextlib.contextmanager
def _compilation_cache(directory):
    """JAX's persistent compilation cache in `directory`, as `main` switches it on for every run: the 16
    classifier runs of the micro study then compile their programs once (a run after the first takes about a
    third of the time), not once each."""
    from jax.experimental.compilation_cache import compilation_cache
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(directory))
    compilation_cache.reset_cache()   # the cache is set up on first use; earlier tests may have used it unset
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


_ALL_DEVICES_MESH = sharding.make_mesh


def _one_device_mesh(shape=(-1, 1, 1), devices=None):
    """The study's mesh on the first of the 8 fake devices: partitioned 8 ways on 2 cores every program runs
    about a third slower (the study's phases ran 353 s against 240 s); the loop, sharding and multi-process
    tests cover the partitioned paths."""
    return _ALL_DEVICES_MESH(shape, devices=jax.devices()[:1] if devices is None else devices)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from xray_dit.data import builders
    root = tmp_path_factory.mktemp("study")
    data_dir = root / "tfds"
    builders.prepare("cxr_phantom", cxr_phantom.PhantomConfig(name=MICRO_NAME, size=64, num_images=400,
                                                              spec=MICRO_SPEC), data_dir=data_dir,
                     prepare_workers=0)
    reads, bootstrap_calls, threshold_calls, classifier_calls = [], [], [], []
    original_passes = eval_pass.eval_passes
    original_task = classifier_trainer.classifier_task
    original_boot = classification.bootstrap_auc_ci
    original_threshold = privacy.privacy_threshold

    def spy_passes(config, directory, split, batch_size, **kwargs):
        callers = {frame.function for frame in inspect.stack()}
        reads.append((split, callers))
        return original_passes(config, directory, split, batch_size, **kwargs)

    def spy_bootstrap(labels, scores, patient_ids, **kwargs):
        if "compare" in {frame.function for frame in inspect.stack()}:
            bootstrap_calls.append(np.asarray(patient_ids))
        return original_boot(labels, scores, patient_ids, **kwargs)

    def spy_threshold(*, heldout_to_train_distances, percentile):
        threshold_calls.append(np.asarray(heldout_to_train_distances))
        return original_threshold(heldout_to_train_distances=heldout_to_train_distances, percentile=percentile)

    def spy_classifier(config, workdir, **kwargs):   # every classifier run, alone or with its arm's other seeds
        classifier_calls.append({"workdir": str(workdir), "roundtrip_dir": config.data.roundtrip_dir,
                                 "roundtrip_prob": config.data.roundtrip_prob, "seed": config.seed,
                                 **{k: v for k, v in kwargs.items() if k != "mesh"}})
        return original_task(config, workdir, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(eval_pass, "eval_passes", spy_passes)
        patch.setattr(classifier_trainer, "classifier_task", spy_classifier)
        patch.setattr(classification, "bootstrap_auc_ci", spy_bootstrap)
        patch.setattr(privacy, "privacy_threshold", spy_threshold)
        patch.setattr(sharding, "make_mesh", _one_device_mesh)
        config = micro_config(data_dir)
        workdir = root / "run"
        with _compilation_cache(root / "jax_cache"):
            results = phases.run(config, workdir)
    return {"config": config, "workdir": workdir, "results": results, "reads": reads,
            "bootstrap_patients": bootstrap_calls, "threshold_inputs": threshold_calls, "data_dir": data_dir,
            "classifier_calls": classifier_calls}


def test_every_phase_finished_and_left_its_artefacts(study):
    workdir = study["workdir"]
    for phase in context_lib.PHASES:
        assert (workdir / phase / context_lib.MARKER).exists(), phase
    for path in ["report.md", "report.html", "01_baseline/seed_0/predictions_test.csv", "01_baseline/seed_1/roc_test.png",
                 "02_vae/export/model.json", "03_dit/target_only/export/model.json",
                 "04_generate/target_only_seed0/manifest.csv", "04_generate/target_only_seed1/manifest.csv",
                 "05_filter/target_only_seed1/per_sample.json", "05_filter/oversampled_real/manifest.csv",
                 "06_retrain/controls/phantom_positive/manifest.csv", "06_retrain/controls/vae_roundtrip/manifest.csv",
                 "06_retrain/controls/roundtrip_store/manifest.csv",
                 "07_compare/compare.json", "07_compare/roc_by_arm.png", "07_compare/auc_ci_by_arm.png",
                 "08_privacy/privacy.json", "08_privacy/nn_distance_histogram.png", "08_privacy/closest_pairs.png",
                 "08_privacy/real_vs_synthetic.png"]:
        assert (workdir / path).exists(), path
    for seed in (0, 1):
        assert len(list((workdir / "04_generate" / f"target_only_seed{seed}").glob("*.png"))) == 16
    draws = [sorted((workdir / "04_generate" / f"target_only_seed{seed}").glob("*.png"))[0].read_bytes()
             for seed in (0, 1)]
    assert draws[0] != draws[1], "two generator seeds drew the same images"
    report = (workdir / "report.md").read_text()
    for section in ["## Answer", "Classifier performance per arm", "Synthetic images and the filters", "## Privacy",
                    "Quality of the synthetic set", "## Limitations", "wall time"]:
        assert section in report
    assert "p(Cardiomegaly) ≥" in report and "at the 1st percentile" in report
    # The privacy section leads with the one sentence of 09_report's answer.
    assert "whether that patient was among" in report.split("## Privacy")[1].split("\n\n")[1]
    html = (workdir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6 and "<table>" in html


def test_generators_are_one_entry_per_variant_and_seed(study):
    workdir = study["workdir"]
    assert study["results"]["03_dit"]["variants"].keys() == {"target_only"}
    assert study["results"]["04_generate"] == {"generators": [
        {"name": f"target_only_seed{seed}", "variant": "target_only", "seed": seed,
         "out_dir": str(workdir / "04_generate" / f"target_only_seed{seed}"), "count": 16} for seed in (0, 1)]}
    filtered = study["results"]["05_filter"]["generators"]
    assert filtered.keys() == {"target_only_seed0", "target_only_seed1"}
    assert all(0 < entry["accepted"] <= 16 for entry in filtered.values())


def test_every_arm_kind_runs_per_generator_with_its_own_inputs(study):
    workdir, config = study["workdir"], study["config"]
    arms_result = study["results"]["06_retrain"]["arms"]
    generators = ["target_only_seed0", "target_only_seed1"]
    assert sorted((a["kind"], a["generator"]) for a in arms_result.values()) == sorted(
        [(kind, g) for kind in ("synthetic", "synthetic_mitigated") for g in generators]
        + [("oversampled", None), ("phantom_positive", None), ("vae_roundtrip", None)])
    filtered = study["results"]["05_filter"]
    count = min(8, *(entry["accepted"] for entry in filtered["generators"].values()))   # the fewest accepted
    controls = workdir / "06_retrain" / "controls"
    expected_folder = {"oversampled": filtered["oversampled_dir"], "phantom_positive": str(controls / "phantom_positive"),
                       "vae_roundtrip": str(controls / "vae_roundtrip")}
    calls = {c["workdir"]: c for c in study["classifier_calls"]}
    for name, arm in arms_result.items():
        assert set(arm) == {"key", "kind", "count", "generator", "generator_seed", "primary", "roundtrip_prob",
                            "folder", "runs"}
        assert arm["count"] == count and arm["primary"] and set(arm["runs"]) == {"0", "1"}
        folder = (filtered["generators"][arm["generator"]]["accepted_dir"] if arm["generator"]
                  else expected_folder[arm["kind"]])
        assert arm["folder"] == folder
        for seed, run in arm["runs"].items():
            assert run["workdir"] == str(workdir / "06_retrain" / arm["key"] / f"seed_{seed}")
            call = calls[run["workdir"]]
            assert (call["synthetic"], call["synthetic_count"], call["seed"]) == (folder, count, int(seed))
            mitigated = arm["kind"] == "synthetic_mitigated"
            assert call["roundtrip_dir"] == (str(controls / "roundtrip_store") if mitigated else "")
            assert call["roundtrip_prob"] == (config.study.roundtrip_prob if mitigated else 0.0)
    # The controls: fresh phantom patients with the finding, the target class's round trips, every train image's.
    from xray_dit.data import pipeline, synthetic
    labels = list(config.data.labels)
    positives = synthetic.SyntheticSource(controls / "phantom_positive", labels)
    assert len(positives) == count and positives.labels[:, 0].all()
    assert all(row["patient_id"].startswith(arms.CONTROL_ID_PREFIX) for row in positives.rows)
    train = pipeline.metadata_table(config.data, "train", data_dir=study["data_dir"])
    roundtrips = synthetic.SyntheticSource(controls / "vae_roundtrip", labels)
    ids = np.asarray(train.image_id)
    assert sorted(r["source_id"] for r in roundtrips.rows) == sorted(ids[train.positives("Cardiomegaly")])
    store = synthetic.SyntheticSource(controls / "roundtrip_store", labels)
    assert sorted(r["image_id"] for r in store.rows) == sorted(ids)


def test_compare_covers_every_arm_and_seed(study):
    compare = study["results"]["07_compare"]
    assert set(compare["arms"]) == {"real only", *study["results"]["06_retrain"]["arms"]}
    for arm, row in compare["arms"].items():
        assert set(row["seed_auc"]) == {"0", "1"}
        lo_hi = row["target_ensemble_auc_ci"]
        assert lo_hi[1] <= lo_hi[0] <= lo_hi[2]
        if arm != "real only":
            assert 0.0 <= row["vs_baseline"]["delong_p"] <= 1.0
    # The Holm family pools each generated kind's two generator seeds: 5 comparisons for the 7 arms.
    pooled = "real + 8 synthetic (target_only, 2 generator seeds)"
    family = {entry["name"]: entry for entry in compare["family"]}
    assert len(family) == 5 and family[pooled]["arms"] == [f"real + 8 synthetic (target_only_seed{g})" for g in (0, 1)]
    assert compare["statements"] == [entry["statement"] for entry in compare["family"]]
    assert all("significant" in s for s in compare["statements"])
    assert [(p["name"], p["control"]) for p in compare["primary"]] == [(pooled, "real + 8 oversampled real")]


def test_class_conditional_generator_learns_every_class_and_samples_the_target_with_guidance(study, tmp_path):
    """03/04 for the class-conditional variant, on the micro study's VAE: all training images, CFG sampling."""
    import json

    from xray_dit import checkpoint
    from xray_dit.data import pipeline, synthetic
    from xray_dit.study import training
    from xray_dit.train import dit as dit_trainer
    config = micro_config(study["data_dir"])
    config.study.update(generators=("class_conditional",), generator_seeds=(3,), guidance_scale=2.5, num_synthetic=4)
    config.dit.train.update(steps=4, eval_every=0, checkpoint_every=4)
    context = context_lib.StudyContext(config=config, workdir=tmp_path, mesh=_one_device_mesh(),
                                       results={"02_vae": study["results"]["02_vae"]})
    context.results["03_dit"] = training.dit(context)
    generated = training.generate(context)
    out_dir = tmp_path / "04_generate" / "class_conditional_seed3"
    assert generated == {"generators": [{"name": "class_conditional_seed3", "variant": "class_conditional",
                                         "seed": 3, "out_dir": str(out_dir), "count": 4}]}
    info = checkpoint.load_export_info(context.results["03_dit"]["variants"]["class_conditional"]["export"])
    assert info["class_names"] == [*config.data.labels, "No Finding"]
    cache = json.loads((tmp_path / "03_dit" / "class_conditional" / "latents" / dit_trainer.CACHE_INFO).read_text())
    assert cache["count"] == len(pipeline.metadata_table(config.data, "train", data_dir=study["data_dir"]))
    rows = synthetic.SyntheticSource(out_dir, list(config.data.labels)).rows
    assert {(r["label"], r["guidance_scale"], r["seed"]) for r in rows} == {("Cardiomegaly", "2.5", "3")}


def test_bootstrap_resamples_the_test_patients(study):
    """Every CI is computed over test-split patient ids: as many groups as test patients, never images."""
    test = classification.read_predictions(study["workdir"] / "01_baseline" / "seed_0" / "predictions_test.csv")
    compare = study["results"]["07_compare"]
    assert study["bootstrap_patients"], "no bootstrap was run"
    for patient_ids in study["bootstrap_patients"]:
        assert set(patient_ids) == set(test["patient_id"])
        assert len(np.unique(patient_ids)) == compare["test_patients"] < len(patient_ids)


def test_privacy_thresholds_are_class_matched_and_reported_with_counts(study):
    """Both thresholds come from held-out target-class images → target-class training images: validation when it
    holds enough of them, else every training image against the other patient folds; never the test split."""
    from xray_dit.data import pipeline
    config, filt = study["config"], study["results"]["05_filter"]
    table = pipeline.metadata_table(config.data, "validation", data_dir=study["data_dir"])
    t = list(config.data.labels).index(config.data.target_class)
    validation_target = int(table.labels[:, t].sum())
    expected = "validation" if validation_target >= config.study.calibration_min_count else "train, patient folds"
    assert len(study["threshold_inputs"]) == 2  # pixel and feature space
    for space, distances in zip(("pixel", "feature"), study["threshold_inputs"]):
        entry = filt["calibration"][space]
        assert entry["source"] == expected and len(distances) == entry["heldout_count"] > 0
        assert entry["reference_count"] == filt["real_minority_train"]
        if expected != "validation":
            assert entry["heldout_count"] == filt["real_minority_train"]
        assert filt["thresholds"][f"privacy_{space}"] == pytest.approx(np.percentile(distances, 1.0))
    assert filt["threshold_sources"]["privacy"].startswith("class-matched: " + expected)
    with np.load(study["workdir"] / "05_filter" / filters.CALIBRATION) as saved:
        np.testing.assert_array_equal(saved["heldout_to_train_pixel"], study["threshold_inputs"][0])
    dup = filt["duplicate_reference"]
    assert dup["threshold"] == filt["thresholds"]["duplicate_correlation"] == config.study.duplicate_threshold
    assert 0.0 <= dup["real_pair_fraction_above"] <= 1.0 and dup["real_pairs"] > 0


def test_accepted_flags_are_the_recomputed_comparisons_of_per_sample_scores(study):
    filt = study["results"]["05_filter"]
    th = filt["thresholds"]
    assert list(filt["generators"]) == ["target_only_seed0", "target_only_seed1"]
    for name, gen in filt["generators"].items():
        scores = json.loads(open(gen["per_sample"]).read())
        arr = {k: np.asarray(v) for k, v in scores.items()}
        recomputed = {"label_fidelity": arr["p_target"] >= th["fidelity_probability"],
                      "realism": arr["knn_distance"] <= th["realism_knn"],
                      "privacy": (arr["nn_pixel_distance"] > th["privacy_pixel"])
                      & (arr["nn_feature_distance"] > th["privacy_feature"]),
                      "duplicates": arr["duplicate_correlation"] <= th["duplicate_correlation"]}
        for criterion, flags in recomputed.items():
            assert arr[f"pass_{criterion}"].tolist() == flags.tolist(), criterion
            assert gen["criteria"][criterion.replace("_", " ")]["passed"] == int(flags.sum())
        accepted = np.logical_and.reduce(list(recomputed.values()))
        assert arr["accepted"].tolist() == accepted.tolist() and gen["accepted"] == int(accepted.sum())
        assert gen["generated"] == len(accepted) == 16
        if accepted.any():
            manifest = open(f"{gen['accepted_dir']}/manifest.csv").read().splitlines()
            assert len(manifest) - 1 == gen["accepted"]


def test_filter_and_privacy_phases_read_each_split_once(study):
    """05_filter and 08_privacy share the image sets their context read first, instead of reading them again."""
    shared_readers = {"run_filters", "privacy_and_quality"}
    reads = collections.Counter(split for split, callers in study["reads"] if callers & shared_readers)
    assert reads == {"train": 1, "validation": 1, "test": 1}


def test_no_test_image_is_used_for_filtering_thresholds_or_selection(study):
    test_reads = [callers for split, callers in study["reads"] if split == "test"]
    assert test_reads, "the test split was never evaluated"
    for callers in test_reads:
        assert callers & TEST_READERS, f"test split read from {sorted(callers)[:8]}"
        assert not callers & {"run_filters", "evaluate"}, "test split read while filtering or selecting a model"


def test_privacy_and_quality_numbers_are_in_range_with_their_intervals(study):
    priv, filt = study["results"]["08_privacy"], study["results"]["05_filter"]
    assert 0.0 <= priv["memorisation_rate"] <= 1.0
    generators = filt["generators"].values()
    distances = np.concatenate([json.loads(open(g["per_sample"]).read())["nn_pixel_distance"] for g in generators])
    flagged = distances <= filt["thresholds"]["privacy_pixel"]
    assert priv["memorisation"]["flagged"] == flagged.sum() <= sum(g["flagged_as_memorised"] for g in generators)
    controls = priv["privacy_controls"]
    assert controls["copies"] == study["config"].study.near_copies and controls["fresh"] == priv["real_minority_test"]
    for name in ("memorisation_detector", "privacy_filter"):
        rates = controls[name]
        for key in ("detected", "false_positive"):
            lower, upper = rates[f"{key}_ci"]
            assert 0.0 <= lower <= rates[key] <= upper <= 1.0
    assert controls["memorisation_detector"]["threshold"] == filt["thresholds"]["privacy_pixel"]
    mia = priv["membership_inference"]
    from xray_dit.study import privacy as privacy_phase
    # The black-box attack runs on every non-empty set: pooled, and each generator's own.
    non_empty = {name for name, n in priv["sets"].items() if n}
    assert set(mia[privacy_phase.DISTANCE_ATTACK]) == non_empty
    assert {"all generated"} | {f"all generated ({name})" for name in filt["generators"]} <= non_empty
    assert set(mia[privacy_phase.DENOISING_ATTACK]) == {"DiT"}
    for sets in mia.values():
        for entry in sets.values():
            assert 0.0 <= entry["lower"] <= entry["auc"] <= entry["upper"] <= 1.0 and 0.0 < entry["p_value"] <= 1.0
            assert entry["members"] == priv["members"] and entry["non_members"] == priv["non_members"]
    white_box = mia[privacy_phase.DENOISING_ATTACK]["DiT"]
    assert white_box["timesteps"] == list(study["config"].study.mia_timesteps) and white_box["noise_draws"] == 4
    quality = priv["quality"]
    assert quality["encoder"] == "baseline classifier of seed 1" and not quality["circular"]
    assert quality["rows"]["all generated"]["available"] == 32   # two generators of 16
    assert len({row["n"] for row in quality["rows"].values()}) == 1
    for name, d in priv["detectability"].items():
        assert 0.0 <= d["lower"] <= d["auc"] <= d["upper"] <= 1.0 and d["n_real"] == priv["non_members"]
    assert "all generated" in priv["detectability"]
    assert "ctr_oracle" in priv and priv["ctr_oracle"]["generated"] == 32
    with np.load(study["workdir"] / "05_filter" / filters.CALIBRATION) as saved:
        assert priv["heldout_to_train_median"] == pytest.approx(float(np.median(saved["heldout_to_train_pixel"])))


def test_rerun_skips_done_phases_and_rerun_from_repeats_the_tail(study, monkeypatch):
    calls = []
    original = phases._phase_functions

    def counting():
        return {name: (lambda ctx, f=f, name=name: calls.append(name) or f(ctx)) for name, f in original().items()}
    monkeypatch.setattr(phases, "_phase_functions", counting)
    config = micro_config(study["data_dir"])
    phases.run(config, study["workdir"])
    assert calls == []
    report_before = (study["workdir"] / "09_report" / context_lib.MARKER).read_text()
    config.study.rerun_from = "report"
    phases.run(config, study["workdir"])
    assert calls == ["09_report"]
    assert (study["workdir"] / "09_report" / context_lib.MARKER).read_text() != report_before
    config.study.rerun_from = "no_such_phase"
    with pytest.raises(ValueError, match="not a phase"):
        phases.run(config, study["workdir"])


def _fake_phases(calls, fail_at=None):
    """Stand-ins for the nine phases: each records (phase, its folder, the data fraction it saw)."""
    def make(phase):
        def run(context):
            where = (phase, context.workdir.name, float(context.config.data.target_fraction))
            if where == fail_at:
                raise RuntimeError(f"killed in {where}")
            calls.append(where)
            if phase == "09_report":
                return {"fractions": sorted(context.results.get("fractions", {})),
                        "compare_fraction": context.results["07_compare"]["fraction"]}
            return {"fraction": context.config.data.target_fraction}
        return run
    return lambda: {phase: make(phase) for phase in context_lib.PHASES}


def test_scarcity_runner_runs_a_sub_study_per_fraction_then_one_report_and_resumes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(phases.prepared, "ensure_prepared", lambda config, workdir: None)
    config = tiny_configs.tiny_config(tmp_path / "tfds")
    config.study.target_fractions = (0.25, 1.0)
    workdir = tmp_path / "run"
    killed = ("05_filter", "fraction_0.25", 0.25)
    monkeypatch.setattr(phases, "_phase_functions", _fake_phases(calls, fail_at=killed))
    with pytest.raises(RuntimeError, match="killed"):
        phases.run(config, workdir)
    sub_phases = context_lib.PHASES[:-1]
    assert calls == [(p, "fraction_1.0", 1.0) for p in sub_phases] + [(p, "fraction_0.25", 0.25) for p in sub_phases[:4]]

    calls.clear()
    monkeypatch.setattr(phases, "_phase_functions", _fake_phases(calls))
    results = phases.run(config, workdir)
    assert calls == [(p, "fraction_0.25", 0.25) for p in sub_phases[4:]] + [("09_report", "run", 1.0)]
    for fraction in ("1.0", "0.25"):
        assert all((workdir / f"fraction_{fraction}" / p / context_lib.MARKER).exists() for p in sub_phases)
        assert not (workdir / f"fraction_{fraction}" / "09_report").exists()
        assert results["fractions"][fraction]["07_compare"] == {"fraction": float(fraction)}
    assert (workdir / "09_report" / context_lib.MARKER).exists() and not (workdir / "01_baseline").exists()
    assert results["09_report"] == {"fractions": ["0.25", "1.0"], "compare_fraction": 1.0}
    assert results["07_compare"] == results["fractions"]["1.0"]["07_compare"]   # the largest at the top

    calls.clear()
    phases.run(config, workdir)
    assert calls == []
    config.study.rerun_from = "compare"
    phases.run(config, workdir)
    assert calls == [(p, f"fraction_{f}", f) for f in (1.0, 0.25) for p in ("07_compare", "08_privacy")] + [
        ("09_report", "run", 1.0)]


def test_one_fraction_keeps_the_flat_layout_and_conflicting_fractions_are_refused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(phases.prepared, "ensure_prepared", lambda config, workdir: None)
    monkeypatch.setattr(phases, "_phase_functions", _fake_phases(calls))
    config = tiny_configs.tiny_config(tmp_path / "tfds")
    config.data.target_fraction = 0.5   # with the study's default fractions (1.0,): the one fraction
    results = phases.run(config, tmp_path / "run")
    assert calls == [(p, "run", 0.5) for p in context_lib.PHASES]
    assert "fractions" not in results
    assert not list((tmp_path / "run").glob("fraction_*"))
    config.study.target_fractions = (1.0, 0.25)
    with pytest.raises(ValueError, match="disagree"):
        phases.run(config, tmp_path / "other")
    config.data.target_fraction = 1.0
    config.study.target_fractions = (0.5, 0.5)
    with pytest.raises(ValueError, match="distinct fractions"):
        phases.run(config, tmp_path / "other")


def _runs_by_arm(results: dict) -> dict:
    return {"real only": results["01_baseline"]["runs"],
            **{arm: entry["runs"] for arm, entry in results["06_retrain"]["arms"].items()}}


def test_each_classifier_run_took_its_thresholds_from_its_validation_predictions(study):
    names = list(study["config"].data.labels)
    checked = 0
    for arm, runs in _runs_by_arm(study["results"]).items():
        for seed, run in runs.items():
            workdir = pathlib.Path(run["workdir"])
            results = json.loads((workdir / "results.json").read_text())
            val = classification.read_predictions(workdir / "predictions_validation.csv")
            test = classification.read_predictions(workdir / "predictions_test.csv")
            for name, threshold in results["thresholds_from_validation"].items():
                c = names.index(name)
                known = val["mask"][:, c]
                # The run chose it from unrounded probabilities; the file holds them rounded.
                want = classification.youden_threshold(val["labels"][known, c], val["probs"][known, c])
                assert threshold == pytest.approx(want, abs=1e-6), (arm, seed, name)
                known = test["mask"][:, c]
                assert results["test_confusion"][name] == confusion_matrix(
                    test["labels"][known, c], (test["probs"][known, c] >= want).astype(int), labels=[0, 1]).tolist()
                checked += 1
    assert checked, "no run had a class with both outcomes in validation: the micro data changed"


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` on the way can swallow it."""


def test_study_killed_in_the_report_phase_redoes_only_that_phase(tmp_path, monkeypatch, caplog):
    calls, kill = [], {"in_report": True, "at_marker": False}

    def fake(phase):
        def run(context):
            calls.append(phase)
            if phase == "09_report":
                assert set(context.results) == set(phases.PHASES[:-1])   # read back from the markers on a rerun
                (context.workdir / "report.md").write_text("# Repo")
                if kill["in_report"]:
                    raise _Killed
                (context.workdir / "report.md").write_text("# Report\n")
            return {"phase": phase}
        return run
    monkeypatch.setattr(phases, "_phase_functions", lambda: {p: fake(p) for p in phases.PHASES})
    monkeypatch.setattr(phases.prepared, "ensure_prepared", lambda config, workdir: workdir / "tfds")
    path_class = type(epath.Path("/"))
    rename = path_class.rename

    def rename_or_die(self, target):
        if kill["at_marker"] and self.name == phases.MARKER + ".partial" and self.parent.name == "09_report":
            raise _Killed
        return rename(self, target)
    monkeypatch.setattr(path_class, "rename", rename_or_die)
    from configs import base
    config = base.get_config()

    with pytest.raises(_Killed):
        phases.run(config, tmp_path)
    assert calls == list(phases.PHASES)
    assert [p for p in phases.PHASES if (tmp_path / p / phases.MARKER).exists()] == list(phases.PHASES[:-1])

    calls.clear()
    kill.update(in_report=False, at_marker=True)      # this time killed while committing the report's marker
    with pytest.raises(_Killed):
        phases.run(config, tmp_path)
    assert calls == ["09_report"] and not (tmp_path / "09_report" / phases.MARKER).exists()

    calls.clear()
    caplog.clear()
    kill["at_marker"] = False
    with caplog.at_level(logging.INFO):
        results = phases.run(config, tmp_path)
    assert calls == ["09_report"] and results["09_report"] == {"phase": "09_report"}
    assert (tmp_path / "report.md").read_text() == "# Report\n"
    assert (tmp_path / "09_report" / phases.MARKER).exists()
    assert not list((tmp_path / "09_report").glob("*.partial"))
    assert sum("already done, skipping" in r.getMessage() for r in caplog.records) == len(phases.PHASES) - 1
