"""The study end to end on a micro configuration: every artefact, statistics on the right rows, resume.

One run (module-scoped) of all nine phases on a 400-image phantom with tiny models, watched by spies that
record which split every image pass reads and which rows the statistics receive.
"""

import collections
import inspect
import json

import numpy as np
import pytest

from tests.helpers import tiny_configs
from xray_dit.data import phantom
from xray_dit.data.builders import cxr_phantom
from xray_dit.evaluation import classification, privacy
from xray_dit.study import context as context_lib
from xray_dit.study import filters, phases, probe
from xray_dit.study import report as report_lib
from xray_dit.train import eval_pass

MICRO_NAME = "64_micro"
# Enough Cardiomegaly that every split holds some (validation thresholds and held-out distances need them).
MICRO_SPEC = phantom.PhantomSpec(cardiomegaly_prevalence=0.25, label_noise=0.0)
TEST_READERS = {"evaluate_on_test", "privacy_and_quality"}   # the only code allowed to read the test split


def micro_config(data_dir):
    config = tiny_configs.tiny_config(data_dir)
    config.data.builder_config = MICRO_NAME
    config.study.update(seeds=(0, 1), num_synthetic=16, synthetic_counts=(8,), bootstrap_samples=200)
    config.sample.update(batch_size=16, num_steps=4)
    config.dit.train.eval_every = 20
    return config


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from xray_dit.data import builders
    root = tmp_path_factory.mktemp("study")
    data_dir = root / "tfds"
    builders.prepare("cxr_phantom", cxr_phantom.PhantomConfig(name=MICRO_NAME, size=64, num_images=400,
                                                              spec=MICRO_SPEC), data_dir=data_dir,
                     prepare_workers=0)
    reads, bootstrap_calls, threshold_calls = [], [], []
    original_passes = eval_pass.eval_passes
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

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(eval_pass, "eval_passes", spy_passes)
        patch.setattr(classification, "bootstrap_auc_ci", spy_bootstrap)
        patch.setattr(privacy, "privacy_threshold", spy_threshold)
        config = micro_config(data_dir)
        workdir = root / "run"
        results = phases.run(config, workdir)
    return {"config": config, "workdir": workdir, "results": results, "reads": reads,
            "bootstrap_patients": bootstrap_calls, "threshold_inputs": threshold_calls, "data_dir": data_dir}


def test_every_phase_finished_and_left_its_artefacts(study):
    workdir = study["workdir"]
    for phase in context_lib.PHASES:
        assert (workdir / phase / context_lib.MARKER).exists(), phase
    for path in ["report.md", "report.html", "01_baseline/seed_0/predictions_test.csv", "01_baseline/seed_1/roc_test.png",
                 "02_vae/export/model.json", "03_dit/export/model.json", "04_generate/samples/manifest.csv",
                 "05_filter/generator_0/per_sample.json", "05_filter/oversampled_real/manifest.csv",
                 "07_compare/compare.json", "07_compare/roc_by_arm.png", "07_compare/auc_ci_by_arm.png",
                 "08_privacy/privacy.json", "08_privacy/nn_distance_histogram.png", "08_privacy/closest_pairs.png",
                 "08_privacy/real_vs_synthetic.png"]:
        assert (workdir / path).exists(), path
    assert len(list((workdir / "04_generate" / "samples").glob("*.png"))) == 16
    report = (workdir / "report.md").read_text()
    for section in ["## Answer", "Classifier performance per arm", "Synthetic images and the filters", "## Privacy",
                    "Quality of the synthetic set", "## Limitations", "wall time"]:
        assert section in report
    assert "p(Cardiomegaly) ≥" in report and "at the 1st percentile" in report
    # The privacy section leads with the one sentence of 09_report's answer.
    assert "whether that patient was among" in report.split("## Privacy")[1].split("\n\n")[1]
    html = (workdir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6 and "<table>" in html


def test_arms_and_seeds(study):
    compare = study["results"]["07_compare"]
    assert set(compare["arms"]) == {"real only", "real + 8 synthetic", "real + 8 oversampled real"}
    for arm, row in compare["arms"].items():
        assert set(row["seed_auc"]) == {"0", "1"}
        lo_hi = row["target_ensemble_auc_ci"]
        assert lo_hi[1] <= lo_hi[0] <= lo_hi[2]
        if arm != "real only":
            assert 0.0 <= row["vs_baseline"]["delong_p"] <= 1.0
    assert len(compare["statements"]) == 2 and all("significant" in s for s in compare["statements"])


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
    holds enough of them, else training patients split off; never the test split."""
    from xray_dit.data import pipeline
    config, filt = study["config"], study["results"]["05_filter"]
    table = pipeline.metadata_table(config.data, "validation", data_dir=study["data_dir"])
    t = list(config.data.labels).index(config.data.target_class)
    validation_target = int(table.labels[:, t].sum())
    expected = "validation" if validation_target >= config.study.calibration_min_count else "train split-off"
    assert len(study["threshold_inputs"]) == 2  # pixel and feature space
    for space, distances in zip(("pixel", "feature"), study["threshold_inputs"]):
        entry = filt["calibration"][space]
        assert entry["source"] == expected and len(distances) == entry["heldout_count"] > 0
        assert entry["reference_count"] + (entry["heldout_count"] if expected != "validation" else 0) == \
            filt["real_minority_train"]
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
    assert list(filt["generators"]) == ["generator_0"]
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
    scores = json.loads(open(filt["generators"]["generator_0"]["per_sample"]).read())
    flagged = np.asarray(scores["nn_pixel_distance"]) <= filt["thresholds"]["privacy_pixel"]
    assert priv["memorisation"]["flagged"] == flagged.sum() <= filt["generators"]["generator_0"]["flagged_as_memorised"]
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
    assert set(mia[privacy_phase.DISTANCE_ATTACK]) == {"all generated", "accepted"} or \
        set(mia[privacy_phase.DISTANCE_ATTACK]) == {"all generated"} == {k for k, v in priv["sets"].items() if v}
    assert set(mia[privacy_phase.DENOISING_ATTACK]) == {"DiT"}
    for sets in mia.values():
        for entry in sets.values():
            assert 0.0 <= entry["lower"] <= entry["auc"] <= entry["upper"] <= 1.0 and 0.0 < entry["p_value"] <= 1.0
            assert entry["members"] == priv["members"] and entry["non_members"] == priv["non_members"]
    white_box = mia[privacy_phase.DENOISING_ATTACK]["DiT"]
    assert white_box["timesteps"] == list(study["config"].study.mia_timesteps) and white_box["noise_draws"] == 4
    quality = priv["quality"]
    assert quality["encoder"] == "baseline classifier of seed 1" and not quality["circular"]
    assert quality["rows"]["all generated"]["available"] == 16
    assert len({row["n"] for row in quality["rows"].values()}) == 1
    for name, d in priv["detectability"].items():
        assert 0.0 <= d["lower"] <= d["auc"] <= d["upper"] <= 1.0 and d["n_real"] == priv["non_members"]
    assert "all generated" in priv["detectability"]
    assert "ctr_oracle" in priv and priv["ctr_oracle"]["generated"] == 16
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


def test_realism_distance_on_constructed_sets():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(20, 4))
    query = np.concatenate([reference[:2], rng.normal(size=(2, 4)) * 10])
    d = filters.kth_neighbour_distance(query, reference, 1)
    assert d[0] == pytest.approx(0.0, abs=1e-9) and d[1] == pytest.approx(0.0, abs=1e-9)
    loo = filters.kth_neighbour_distance(reference, reference, 1, exclude_self=True)
    assert np.all(loo > 0)


def test_context_computes_each_shared_thing_once(tmp_path, monkeypatch):
    calls = collections.Counter()

    def counted(name, value):
        def make(*args, **kwargs):
            calls[(name, args[2] if name == "real" else None, kwargs.get("only_class"))] += 1
            return value
        return make
    monkeypatch.setattr(probe, "real_images", counted("real", "images"))
    monkeypatch.setattr(probe, "synthetic_images", counted("synthetic", "generated"))
    monkeypatch.setattr(probe, "ClassifierProbe", counted("probe", "classifier"))
    config = tiny_configs.tiny_config(tmp_path)
    context = context_lib.StudyContext(config=config, workdir=tmp_path, mesh=None,
                                       results={"04_generate": {"out_dir": str(tmp_path / "samples")}})
    for _ in range(2):
        assert context.real_images("train") == "images"
        assert context.real_images("test", only_class="Cardiomegaly") == "images"
        assert context.synthetic_images() == "generated" and context.probe() == "classifier"
    assert calls == {("real", "train", None): 1, ("real", "test", "Cardiomegaly"): 1, ("synthetic", None, None): 1,
                     ("probe", None, None): 1}


def test_report_states_each_filter_threshold():
    thresholds = {"fidelity_probability": 0.5, "realism_knn": 0.1, "privacy_pixel": 0.2, "privacy_feature": 0.3,
                  "duplicate_correlation": 0.98}
    assert report_lib._threshold_text("label fidelity", thresholds, "Effusion") == "p(Effusion) ≥ 0.50"
    assert report_lib._threshold_text("privacy", thresholds, "Effusion") == "pixel > 0.2000 and feature > 0.3000"


def test_quality_encoder_is_a_baseline_seed_the_filters_did_not_use():
    assert probe.quality_encoder_seed(["10", "2", "7"]) == "7"   # the filters' probe takes seed "2"
    assert probe.quality_encoder_seed([3, 1]) == 3
    assert probe.quality_encoder_seed(["0"]) is None
