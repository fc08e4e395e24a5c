"""The study end to end on a micro configuration: every artefact, statistics on the right rows, resume.

One run (module-scoped) of all nine phases on a 400-image phantom with tiny models, watched by spies that
record which split every image pass reads and which rows the statistics receive.
"""

import csv
import inspect
import json
import pathlib
import types

import ml_collections
import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from tests.helpers import tiny_configs
from xray_dit.data import phantom
from xray_dit.data import synthetic as synthetic_lib
from xray_dit.data.builders import cxr_phantom
from xray_dit.evaluation import classification, privacy
from xray_dit.study import phases
from xray_dit.train import common
from xray_dit.train.classifier import read_predictions, write_predictions

MICRO_NAME = "64_micro"
# Enough Cardiomegaly that every split holds some (validation thresholds and held-out distances need them).
MICRO_SPEC = phantom.PhantomSpec(cardiomegaly_prevalence=0.25, label_noise=0.0)
TEST_READERS = {"evaluate_on_test", "privacy_and_quality"}   # the only code allowed to read the test split
BASELINE = "real only"
ALPHA = 0.05   # the study's significance level, as its statements print it


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
    original_passes = common.eval_passes
    original_boot = classification.bootstrap_auc_ci
    original_threshold = privacy.privacy_threshold

    def spy_passes(config, directory, split, batch_size, **kwargs):
        callers = {frame.function for frame in inspect.stack()}
        reads.append((split, callers))
        return original_passes(config, directory, split, batch_size, **kwargs)

    def spy_bootstrap(labels, scores, patient_ids, **kwargs):
        bootstrap_calls.append(np.asarray(patient_ids))
        return original_boot(labels, scores, patient_ids, **kwargs)

    def spy_threshold(*, heldout_to_train_distances, percentile):
        threshold_calls.append(np.asarray(heldout_to_train_distances))
        return original_threshold(heldout_to_train_distances=heldout_to_train_distances, percentile=percentile)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "eval_passes", spy_passes)
        patch.setattr(classification, "bootstrap_auc_ci", spy_bootstrap)
        patch.setattr(privacy, "privacy_threshold", spy_threshold)
        config = micro_config(data_dir)
        workdir = root / "run"
        results = phases.run(config, workdir)
    return {"config": config, "workdir": workdir, "results": results, "reads": reads,
            "bootstrap_patients": bootstrap_calls, "threshold_inputs": threshold_calls, "data_dir": data_dir}


def test_every_phase_finished_and_left_its_artefacts(study):
    workdir = study["workdir"]
    for phase in phases.PHASES:
        assert (workdir / phase / phases.MARKER).exists(), phase
    for path in ["report.md", "report.html", "01_baseline/seed_0/predictions_test.csv", "01_baseline/seed_1/roc_test.png",
                 "02_vae/export/model.json", "03_dit/export/model.json", "04_generate/samples/manifest.csv",
                 "05_filter/per_sample.json", "05_filter/oversampled_real/manifest.csv",
                 "07_compare/compare.json", "07_compare/roc_by_arm.png", "07_compare/auc_ci_by_arm.png",
                 "08_privacy/privacy.json", "08_privacy/nn_distance_histogram.png", "08_privacy/closest_pairs.png",
                 "08_privacy/real_vs_synthetic.png"]:
        assert (workdir / path).exists(), path
    assert len(list((workdir / "04_generate" / "samples").glob("*.png"))) == 16
    report = (workdir / "report.md").read_text()
    for section in ["## Answer", "Classifier performance per arm", "Synthetic images and the filters", "## Privacy",
                    "Quality of the synthetic set", "## Limitations", "wall time"]:
        assert section in report
    html = (workdir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6 and "<table>" in html


# ---- what 07_compare wrote, recomputed from the saved prediction files -----------------------------------
def _rounding_tolerance(labels, probs, decimals=6):
    """How far an AUC from unrounded probabilities can lie from one from `decimals`-rounded ones: only
    positive/negative pairs closer than the rounding step can change order (or tie)."""
    positives, negatives = probs[labels == 1], probs[labels == 0]
    close = np.abs(positives[:, None] - negatives[None, :]) <= 10.0 ** -decimals
    return close.sum() / close.size + 1e-12


def _target_column(workdir, split, target):
    """(image id → row) of one run's predictions_{split}.csv for the target class (known labels only)."""
    rows = read_predictions(pathlib.Path(workdir) / f"predictions_{split}.csv")
    c = rows["class_names"].index(target)
    known = rows["mask"][:, c]
    return {image: (int(label), prob, patient) for image, label, prob, patient, k in
            zip(rows["image_id"], rows["labels"][:, c], rows["probs"][:, c], rows["patient_id"], known) if k}


def _seed_ensemble(runs, split, target):
    """(image ids, labels, mean probability over seeds, patient ids), ordered by image id."""
    columns = [_target_column(run["workdir"], split, target) for run in runs.values()]
    images = sorted(columns[0])
    assert all(sorted(column) == images for column in columns), f"seeds disagree on the {split} images"
    labels = np.array([columns[0][i][0] for i in images])
    # float32 like the files' probabilities, averaged in the runs' order: the mean the study takes.
    probs = np.mean([np.array([column[i][1] for i in images], np.float32) for column in columns], axis=0)
    return np.array(images), labels, probs, np.array([columns[0][i][2] for i in images])


def _comparison_mismatches(compare: dict, runs_by_arm: dict, target: str) -> list[str]:
    """Every number of the arm comparison that the saved predictions do not reproduce."""
    wrong = []

    def check(where, got, want, rel=1e-9, abs_=1e-12):
        if not got == pytest.approx(want, rel=rel, abs=abs_):
            wrong.append(f"{where}: wrote {got}, recomputed {want}")

    _, base_y, base_p, _ = _seed_ensemble(runs_by_arm[BASELINE], "test", target)
    check("test_images", compare["test_images"], len(base_y))
    check("test_positives", compare["test_positives"], int(base_y.sum()))
    if set(compare["arms"]) != set(runs_by_arm):
        wrong.append(f"arms: wrote {sorted(compare['arms'])}, ran {sorted(runs_by_arm)}")
    for arm, runs in runs_by_arm.items():
        row = compare["arms"].get(arm)
        if row is None:
            continue
        for seed, run in runs.items():
            column = _target_column(run["workdir"], "test", target).values()
            y, p = np.array([v[0] for v in column]), np.array([v[1] for v in column])
            check(f"{arm}: seed {seed} AUC", row["seed_auc"][seed], roc_auc_score(y, p), abs_=_rounding_tolerance(y, p))
        _, y, p, _ = _seed_ensemble(runs, "test", target)
        np.testing.assert_array_equal(y, base_y)   # every arm is tested on the baseline's images
        auc = roc_auc_score(y, p)
        check(f"{arm}: ensemble AUC", row["target_ensemble_auc_ci"][0], auc)
        check(f"{arm}: ensemble AUC per class", row["ensemble_auc"][target], auc)
        if arm == BASELINE:
            if "vs_baseline" in row:
                wrong.append(f"{arm}: compared with itself")
            continue
        vs = row["vs_baseline"]
        delong = classification.delong_test(y, p, base_p)
        check(f"{arm}: DeLong p", vs["delong_p"], delong.p_value)
        check(f"{arm}: DeLong z", vs["delong_z"], delong.z)
        check(f"{arm}: AUC difference", vs["auc_difference_ci"][0], auc - roc_auc_score(base_y, base_p))
        _, lower, upper = vs["auc_difference_ci"]
        significant = delong.p_value < ALPHA and (lower > 0 or upper < 0)
        if vs["significant"] is not significant:
            wrong.append(f"{arm}: significant={vs['significant']} with p={delong.p_value:.3g}, "
                         f"difference CI [{lower:.3g}, {upper:.3g}]")
        said = [s for s in compare["statements"] if s.startswith(f"'{arm}' vs '{BASELINE}'")]
        verdict = "a statistically significant" if significant else "no statistically significant difference"
        if len(said) != 1 or f"— {verdict}" not in said[0] or f"at α = {ALPHA}" not in said[0]:
            wrong.append(f"{arm}: statement {said} should say '{verdict}'")
    if len(compare["statements"]) != len(runs_by_arm) - 1:
        wrong.append(f"{len(compare['statements'])} statements for {len(runs_by_arm) - 1} compared arms")
    return wrong


def _threshold_mismatches(compare: dict, runs_by_arm: dict, target: str) -> list[str]:
    """The confusion matrices' thresholds must be Youden's on the *validation* seed ensemble."""
    wrong = []
    for arm, runs in runs_by_arm.items():
        row = compare["arms"][arm]
        _, val_y, val_p, _ = _seed_ensemble(runs, "validation", target)
        _, test_y, test_p, _ = _seed_ensemble(runs, "test", target)
        if np.unique(val_y).size < 2:
            want, source = 0.5, "0.5"
        else:
            want, source = classification.youden_threshold(val_y, val_p), "validation"
        if not (row["threshold"] == pytest.approx(want, rel=1e-12) and row["threshold_source"].startswith(source)):
            wrong.append(f"{arm}: threshold {row['threshold']} ({row['threshold_source']}), validation's is {want}")
        counts = confusion_matrix(test_y, (test_p >= want).astype(int), labels=[0, 1]).tolist()
        if row["test_confusion"] != counts:
            wrong.append(f"{arm}: test confusion {row['test_confusion']}, at the validation threshold {counts}")
    return wrong


def _runs_by_arm(results: dict) -> dict:
    return {BASELINE: results["01_baseline"]["runs"],
            **{arm: entry["runs"] for arm, entry in results["06_retrain"]["arms"].items()}}


def test_arms_and_seeds(study):
    compare = json.loads((study["workdir"] / "07_compare" / "compare.json").read_text())
    assert set(compare["arms"]) == {BASELINE, "real + 8 synthetic", "real + 8 oversampled real"}
    for arm, row in compare["arms"].items():
        assert set(row["seed_auc"]) == {"0", "1"}
        lo_hi = row["target_ensemble_auc_ci"]
        assert lo_hi[1] <= lo_hi[0] <= lo_hi[2]
    runs = _runs_by_arm(study["results"])
    assert _comparison_mismatches(compare, runs, compare["target"]) == []


def test_compare_thresholds_are_youden_on_the_validation_predictions(study):
    compare = json.loads((study["workdir"] / "07_compare" / "compare.json").read_text())
    assert _threshold_mismatches(compare, _runs_by_arm(study["results"]), compare["target"]) == []


def test_each_classifier_run_took_its_thresholds_from_its_validation_predictions(study):
    names = list(study["config"].data.labels)
    checked = 0
    for arm, runs in _runs_by_arm(study["results"]).items():
        for seed, run in runs.items():
            workdir = pathlib.Path(run["workdir"])
            results = json.loads((workdir / "results.json").read_text())
            val = read_predictions(workdir / "predictions_validation.csv")
            test = read_predictions(workdir / "predictions_test.csv")
            for name, threshold in results["thresholds_from_validation"].items():
                c = names.index(name)
                known = val["mask"][:, c]
                # The run chose it from unrounded probabilities; the file holds them to 6 decimals.
                want = classification.youden_threshold(val["labels"][known, c], val["probs"][known, c])
                assert threshold == pytest.approx(want, abs=1e-6), (arm, seed, name)
                known = test["mask"][:, c]
                assert results["test_confusion"][name] == confusion_matrix(
                    test["labels"][known, c], (test["probs"][known, c] >= want).astype(int), labels=[0, 1]).tolist()
                checked += 1
    assert checked, "no run had a class with both outcomes in validation: the micro data changed"


def _filter_mismatches(results: dict, per_sample: dict, synthetic_images: np.ndarray) -> dict:
    """Every pass flag of 05_filter that is not its threshold comparison recomputed from per_sample.json,
    and every count or accepted file that is not the AND of the flags."""
    from xray_dit.study import probe
    thresholds = results["thresholds"]
    values = {k: np.asarray(v) for k, v in per_sample.items()}
    # Duplicates, from the definition: correlated above the threshold with an earlier sample that was kept.
    pixels = probe.downsample_for_pixels(synthetic_images).reshape(len(synthetic_images), -1)
    correlation = np.corrcoef(pixels)
    kept = []
    for i in range(len(pixels)):
        if not any(correlation[i, j] > thresholds["duplicate_correlation"] for j in kept):
            kept.append(i)
    recomputed = {
        "pass_label_fidelity": values["p_target"] >= thresholds["fidelity_probability"],
        "pass_realism": values["knn_distance"] <= thresholds["realism_knn"],
        "pass_privacy": (values["nn_pixel_distance"] >= thresholds["privacy_pixel"])
                        & (values["nn_feature_distance"] >= thresholds["privacy_feature"]),
        "pass_duplicates": np.isin(np.arange(len(pixels)), kept),
    }
    wrong = {}
    if sorted(k for k in per_sample if k.startswith("pass_")) != sorted(recomputed):
        wrong["flags"] = sorted(k for k in per_sample if k.startswith("pass_"))
    wrong.update({k: np.flatnonzero(values.get(k) != want).tolist() for k, want in recomputed.items()
                  if not np.array_equal(values.get(k), want)})
    accepted = np.logical_and.reduce(list(recomputed.values()))
    counts = {name: criterion["passed"] for name, criterion in results["criteria"].items()}
    if counts != {k[len("pass_"):].replace("_", " "): int(v.sum()) for k, v in recomputed.items()}:
        wrong["criteria counts"] = counts
    written_and = np.logical_and.reduce([values[k].astype(bool) for k in recomputed if k in values])
    if not results["accepted"] == int(accepted.sum()) == int(written_and.sum()):
        wrong["accepted"] = [results["accepted"], int(accepted.sum()), int(written_and.sum())]
    manifest = pathlib.Path(results["accepted_dir"]) / synthetic_lib.MANIFEST
    written = []
    if manifest.exists():
        with manifest.open() as f:
            written = [row["source_file"] for row in csv.DictReader(f)]
    if written != [f for f, ok in zip(per_sample["file"], accepted) if ok]:
        wrong["accepted files"] = written
    return wrong


def test_filter_flags_are_the_threshold_comparisons_and_accepted_is_their_and(study):
    from xray_dit.study import probe
    results = study["results"]["05_filter"]
    per_sample = json.loads((study["workdir"] / "05_filter" / "per_sample.json").read_text())
    synthetic = probe.synthetic_images(study["results"]["04_generate"]["out_dir"], list(study["config"].data.labels))
    assert list(synthetic.ids) == per_sample["file"]
    assert _filter_mismatches(results, per_sample, synthetic.images) == {}


def test_filters_on_hand_made_samples_reject_by_each_comparison_and_accept_their_and(tmp_path, monkeypatch):
    """The filter phase on hand-made images and classifier outputs, where every filter rejects some
    samples and each sample's verdicts differ: a flipped comparison or an OR for the AND shows."""
    from xray_dit.study import filters, probe
    rng = np.random.default_rng(0)
    size, n_syn = 16, 12

    def image_set(images, labels, prefix):
        ids = np.array([f"{prefix}{i:02d}" for i in range(len(images))])
        return probe.ImageSet(np.clip(images, -1, 1).astype(np.float32), np.asarray(labels, np.float32)[:, None],
                              ids, ids)

    train = image_set(rng.uniform(-1, 1, (16, size, size)), np.arange(16) % 2, "train")
    heldout = image_set(rng.uniform(-1, 1, (8, size, size)), np.arange(8) % 2, "val")
    samples = rng.uniform(-1, 1, (n_syn, size, size))
    samples[2] = train.images[1]                             # a copy of a training image: privacy
    samples[5] = samples[4] + 0.01 * rng.normal(size=(size, size))   # a near-copy of sample 4: duplicates
    samples[[7, 8]] -= 0.6                                   # dark: the fake classifier doubts them
    synthetic = image_set(samples, np.ones(n_syn), "syn")

    class FakeProbe:
        """Target probability from the mean brightness; features: the first pixels (realism, privacy)."""
        source = "hand-made"

        def __init__(self, context):
            del context

        def __call__(self, images):
            probs = 1 / (1 + np.exp(-8 * (images.mean(axis=(1, 2)) + 0.1)))
            return probs[:, None], images.reshape(len(images), -1)[:, :24].astype(np.float64)

    monkeypatch.setattr(probe, "ClassifierProbe", FakeProbe)
    monkeypatch.setattr(probe, "synthetic_images", lambda folder, labels: synthetic)
    monkeypatch.setattr(probe, "real_images",
                        lambda context, split, **kw: {"train": train, "validation": heldout}[split])
    config = ml_collections.ConfigDict({
        "data": {"labels": ("Cardiomegaly",), "target_class": "Cardiomegaly"},
        "study": {"fidelity_threshold": 0.5, "realism_percentile": 60.0, "privacy_percentile": 5.0,
                  "duplicate_threshold": 0.98}})
    (tmp_path / "05_filter").mkdir()
    context = types.SimpleNamespace(config=config, results={"04_generate": {"out_dir": str(tmp_path / "unused")}},
                                    phase_dir=lambda phase: tmp_path / phase)
    results = filters.run_filters(context)
    per_sample = json.loads((tmp_path / "05_filter" / "per_sample.json").read_text())
    assert _filter_mismatches(results, per_sample, synthetic.images) == {}
    flags = {k: np.asarray(v) for k, v in per_sample.items() if k.startswith("pass_")}
    assert all(0 < f.sum() < n_syn for f in flags.values()), {k: f.tolist() for k, f in flags.items()}
    assert not flags["pass_privacy"][2] and not flags["pass_duplicates"][5] and not flags["pass_label_fidelity"][7]
    # Some samples fail exactly one filter, so an OR of the flags (or a filter left out) would accept more.
    assert np.any(np.sum([~f for f in flags.values()], axis=0) == 1)
    assert results["accepted"] < min(int(f.sum()) for f in flags.values())


# ---- the comparison on hand-made predictions --------------------------------------------------------------
HAND_PATIENTS, HAND_IMAGES_PER_PATIENT = 16, 8


def _hand_made_runs(root: pathlib.Path) -> dict:
    """Prediction files for four arms and a baseline, two seeds each, on the same images.

    Every patient's images share a label and nearly one score, so DeLong (which counts images as
    independent) is far more confident than the patient bootstrap: the "clustered" arm is significant
    for DeLong only. Validation scores are shifted against the test ones, so Youden's threshold on them
    is not the test's.
    """
    rng = np.random.default_rng(0)
    n = HAND_PATIENTS * HAND_IMAGES_PER_PATIENT
    patient_labels = np.arange(HAND_PATIENTS) % 2
    labels = np.repeat(patient_labels, HAND_IMAGES_PER_PATIENT)
    jitter = lambda: 1e-3 * rng.normal(size=n)  # noqa: E731
    base_patient = patient_labels * 0.5 + rng.normal(size=HAND_PATIENTS)
    clustered_patient = base_patient + 0.1 * patient_labels + 0.6 * rng.normal(size=HAND_PATIENTS)
    logits = {BASELINE: np.repeat(base_patient, HAND_IMAGES_PER_PATIENT) + jitter(),
              "better": 3.0 * labels + 0.5 * rng.normal(size=n),
              "worse": -2.0 * labels + 0.5 * rng.normal(size=n),
              "clustered": np.repeat(clustered_patient, HAND_IMAGES_PER_PATIENT) + jitter()}
    logits["same"] = logits[BASELINE].copy()
    unknown = np.zeros(n, bool)
    unknown[::17] = True   # a few images without a known label: left out of every statistic
    table = types.SimpleNamespace(image_id=np.array([f"img{i:03d}" for i in range(n)]),
                                  patient_id=np.repeat([f"pat{p:02d}" for p in range(HAND_PATIENTS)],
                                                       HAND_IMAGES_PER_PATIENT))
    runs = {}
    for a, (arm, logit) in enumerate(logits.items()):
        runs[arm] = {}
        for seed in ("0", "1"):
            workdir = root / f"arm_{a}" / f"seed_{seed}"
            workdir.mkdir(parents=True)
            # Same seeds of one arm differ a little; the "same" arm repeats the baseline's files exactly.
            seed_logit = logit + (0.0 if arm in (BASELINE, "same") else 0.05 * rng.normal(size=n)) + 0.02 * int(seed)
            for split, shift in (("test", 0.0), ("validation", 0.7)):
                probs = 1 / (1 + np.exp(-(seed_logit + shift * labels - 0.4)))
                out = {"index": np.arange(n), "labels": labels[:, None], "label_mask": ~unknown[:, None],
                       "probs": probs[:, None]}
                write_predictions(workdir / f"predictions_{split}.csv", table, out, ["Cardiomegaly"])
            test = read_predictions(workdir / "predictions_test.csv")
            runs[arm][seed] = {"workdir": str(workdir), "test_auc": classification.per_class_auc(
                test["labels"], test["probs"], ["Cardiomegaly"], test["mask"])}
    return runs


@pytest.fixture(scope="module")
def hand_made_comparison(tmp_path_factory):
    from xray_dit.study import analysis
    root = tmp_path_factory.mktemp("hand_made_compare")
    runs = _hand_made_runs(root / "runs")
    config = ml_collections.ConfigDict({"data": {"labels": ("Cardiomegaly",), "target_class": "Cardiomegaly"},
                                        "study": {"bootstrap_samples": 300}})
    results = {"01_baseline": {"runs": runs[BASELINE]},
               "06_retrain": {"arms": {arm: {"runs": r} for arm, r in runs.items() if arm != BASELINE}}}
    (root / "07_compare").mkdir()
    context = types.SimpleNamespace(config=config, results=results, phase_dir=lambda phase: root / phase)
    analysis.compare(context)
    return json.loads((root / "07_compare" / "compare.json").read_text()), runs


def test_comparison_of_hand_made_predictions_is_what_the_files_say(hand_made_comparison):
    compare, runs = hand_made_comparison
    assert _comparison_mismatches(compare, runs, "Cardiomegaly") == []
    assert _threshold_mismatches(compare, runs, "Cardiomegaly") == []
    # The validation threshold is not the one the test predictions would give.
    _, test_y, test_p, _ = _seed_ensemble(runs[BASELINE], "test", "Cardiomegaly")
    assert compare["arms"][BASELINE]["threshold"] != pytest.approx(classification.youden_threshold(test_y, test_p))
    assert compare["test_images"] == HAND_PATIENTS * HAND_IMAGES_PER_PATIENT - 8   # 8 unknown labels


def test_significance_needs_both_delong_and_the_patient_interval(hand_made_comparison):
    compare, _ = hand_made_comparison
    arms = compare["arms"]
    verdicts = {arm: row["vs_baseline"]["significant"] for arm, row in arms.items() if arm != BASELINE}
    assert verdicts == {"better": True, "worse": True, "same": False, "clustered": False}
    same = arms["same"]["vs_baseline"]
    assert same["delong_p"] == 1.0 and same["auc_difference_ci"] == [0.0, 0.0, 0.0]
    clustered = arms["clustered"]["vs_baseline"]
    _, lower, upper = clustered["auc_difference_ci"]
    assert clustered["delong_p"] < ALPHA and lower <= 0 <= upper   # the two tests disagree
    statement = {arm: next(s for s in compare["statements"] if s.startswith(f"'{arm}'")) for arm in verdicts}
    assert "— a statistically significant improvement at α = 0.05." in statement["better"]
    assert "— a statistically significant decrease at α = 0.05." in statement["worse"]
    assert statement["same"].endswith("— no statistically significant difference at α = 0.05.")
    assert "— no statistically significant difference at α = 0.05 (the two tests disagree" in statement["clustered"]
    assert "disagree" not in statement["same"]
    d, lo, hi = arms["better"]["vs_baseline"]["auc_difference_ci"]
    assert statement["better"].startswith(f"'better' vs '{BASELINE}': Cardiomegaly AUC difference {d:+.3f} "
                                          f"(patient-bootstrap 95% CI [{lo:+.3f}, {hi:+.3f}]; DeLong p = ")


def test_bootstrap_resamples_the_test_patients(study):
    """Every CI is computed over test-split patient ids: as many groups as test patients, never images."""
    test = read_predictions(study["workdir"] / "01_baseline" / "seed_0" / "predictions_test.csv")
    compare = study["results"]["07_compare"]
    assert study["bootstrap_patients"], "no bootstrap was run"
    for patient_ids in study["bootstrap_patients"]:
        assert set(patient_ids) == set(test["patient_id"])
        assert len(np.unique(patient_ids)) == compare["test_patients"] < len(patient_ids)


def test_privacy_threshold_comes_from_held_out_validation_images(study):
    filt = study["results"]["05_filter"]
    from xray_dit.data import pipeline
    n_val = len(pipeline.metadata_table(study["config"].data, "validation", data_dir=study["data_dir"]))
    assert len(study["threshold_inputs"]) == 2  # pixel and feature space
    assert all(len(d) == n_val for d in study["threshold_inputs"])
    assert filt["threshold_sources"]["privacy"].startswith("validation")


def test_no_test_image_is_used_for_filtering_thresholds_or_selection(study):
    test_reads = [callers for split, callers in study["reads"] if split == "test"]
    assert test_reads, "the test split was never evaluated"
    for callers in test_reads:
        assert callers & TEST_READERS, f"test split read from {sorted(callers)[:8]}"
        assert not callers & {"run_filters", "evaluate"}, "test split read while filtering or selecting a model"


def test_privacy_and_quality_numbers_are_in_range(study):
    priv = study["results"]["08_privacy"]
    assert 0.0 <= priv["memorisation_rate"] <= 1.0
    assert 0.0 <= priv["membership_inference"]["auc"] <= 1.0
    assert priv["quality"]["all generated"]["n"] == 16
    assert "ctr_oracle" in priv and priv["ctr_oracle"]["generated"] == 16
    # The privacy phase reports the distances the filter phase computed (pixel space first), not new ones.
    from xray_dit.study import filters
    with np.load(study["workdir"] / "05_filter" / filters.PIXEL_DISTANCES) as saved:
        np.testing.assert_array_equal(saved["heldout_to_train"], study["threshold_inputs"][0])
        assert priv["synthetic_to_train_median"] == pytest.approx(float(np.median(saved["synthetic_to_train"])))
    assert priv["heldout_to_train_median"] == pytest.approx(float(np.median(study["threshold_inputs"][0])))


def test_rerun_skips_done_phases_and_rerun_from_repeats_the_tail(study, monkeypatch):
    calls = []
    original = phases._phase_functions

    def counting():
        return {name: (lambda ctx, f=f, name=name: calls.append(name) or f(ctx)) for name, f in original().items()}
    monkeypatch.setattr(phases, "_phase_functions", counting)
    config = micro_config(study["data_dir"])
    phases.run(config, study["workdir"])
    assert calls == []
    report_before = (study["workdir"] / "09_report" / phases.MARKER).read_text()
    config.study.rerun_from = "report"
    phases.run(config, study["workdir"])
    assert calls == ["09_report"]
    assert (study["workdir"] / "09_report" / phases.MARKER).read_text() != report_before
    config.study.rerun_from = "no_such_phase"
    with pytest.raises(ValueError, match="not a phase"):
        phases.run(config, study["workdir"])


def test_filters_on_constructed_sets():
    from xray_dit.study import filters
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 8, 8))
    images[3] = images[1] * 2 + 0.5          # perfectly correlated with image 1
    assert filters.greedy_duplicates(images, 0.98).tolist() == [False, False, False, True, False]
    reference = rng.normal(size=(20, 4))
    query = np.concatenate([reference[:2], rng.normal(size=(2, 4)) * 10])
    d = filters.kth_neighbour_distance(query, reference, 1)
    assert d[0] == pytest.approx(0.0, abs=1e-9) and d[1] == pytest.approx(0.0, abs=1e-9)
    loo = filters.kth_neighbour_distance(reference, reference, 1, exclude_self=True)
    assert np.all(loo > 0)
