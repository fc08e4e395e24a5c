"""bench/nih_cv.py: the binary task's images, patient-wise folds and their splits, the report, and one tiny run
of the real trainer on two folds of the real NIH sample."""

import numpy as np
import pytest

from bench import nih_cv
from tests.helpers import tiny_configs
from xray_dit.data import split_rows, splits
from xray_dit.evaluation import classification

LABELS = ("Pneumonia", "Effusion", "No Finding")


def _table(rows):
    """rows: (patient, labels as a set, known) → a MetadataTable."""
    labels = np.array([[name in found for name in LABELS] for _, found, _ in rows], np.float32)
    mask = np.array([[known] * len(LABELS) for _, _, known in rows], np.float32)
    text = np.array([f"img{i}" for i in range(len(rows))], dtype=object)
    return splits.MetadataTable(label_names=LABELS, image_id=text, patient_id=np.array([p for p, _, _ in rows],
                                dtype=object), labels=labels, label_mask=mask, age=np.zeros(len(rows), np.float32),
                                sex=np.array(["F"] * len(rows), dtype=object), view=np.array(["PA"] * len(rows),
                                                                                             dtype=object))


def test_binary_rows_keep_images_with_exactly_one_of_the_two_labels():
    table = _table([("a", {"Pneumonia"}, True), ("a", {"Pneumonia", "Effusion"}, True), ("b", {"No Finding"}, True),
                    ("c", {"Effusion"}, True), ("d", {"Pneumonia"}, False), ("e", set(), True)])
    np.testing.assert_array_equal(nih_cv.binary_rows(table), [0, 1, 2])


def test_folds_are_patient_wise_stratified_and_cover_every_image_once():
    rng = np.random.default_rng(0)
    patients = np.array([f"p{p}" for p in rng.integers(0, 120, 400)], dtype=object)
    labels = (np.array([int(p[1:]) for p in patients]) % 3 == 0).astype(int)   # one label per patient
    fold_of = nih_cv.patient_folds(patients, labels, 5, seed=0)
    assert set(fold_of) == set(range(5))
    for patient in set(patients):
        assert len(set(fold_of[patients == patient])) == 1
    for fold in range(5):
        assert abs(labels[fold_of == fold].mean() - labels.mean()) < 0.1
    np.testing.assert_array_equal(fold_of, nih_cv.patient_folds(patients, labels, 5, seed=0))

    image_ids = np.array([f"img{i}" for i in range(len(patients))], dtype=object)
    split_of = nih_cv.fold_splits(image_ids, patients, fold_of, 2, 0.2, seed=0)
    split = np.array([split_of[i] for i in image_ids])
    np.testing.assert_array_equal(split == "test", fold_of == 2)
    splits.check_patient_disjoint({s: patients[split == s] for s in ("train", "validation", "test")})
    rest_patients = set(patients[fold_of != 2])
    assert len(set(patients[split == "validation"])) == round(0.2 * len(rest_patients))


def test_table_reports_each_fold_the_mean_and_the_margin_over_the_better_baseline():
    results = [nih_cv.FoldResult(f, {"train": (10, 4), "validation": (3, 1), "test": (5, 2)}, [0.9, 0.8],
                                 {"pixel_logreg_16": 0.8, "pixel_logreg_32": 0.82}, [10.0], [16.0], 0.86 + f / 100)
               for f in range(2)]
    lines = nih_cv.table_markdown(results)
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == lines[-1].count("|")
    assert "| 0 | 10 (4) | 3 (1) | 5 (2) | 0.850 | 0.800 | 0.820 | +0.030 | 0.860 | +0.040 | 10 | 16 |" in lines
    assert lines[-1].startswith("| **mean ± sd** |") and "0.850 ± 0.000" in lines[-1] and "+0.030" in lines[-1]
    assert "0.865 ± 0.007" in lines[-1] and "+0.045 ± 0.007" in lines[-1]
    one_seed = [nih_cv.FoldResult(0, results[0].counts, [0.85], results[0].baseline_auc, [10.0], [16.0])]
    assert "ensemble" not in nih_cv.table_markdown(one_seed)[0]


def test_the_seed_ensemble_averages_probabilities_of_the_same_images(tmp_path):
    labels = np.array([[0], [1], [0], [1]])
    files = []
    for seed, probs in enumerate(([0.1, 0.4, 0.5, 0.6], [0.3, 0.9, 0.2, 0.5])):
        order = np.roll(np.arange(4), seed)   # each file lists the images in another order
        files.append(tmp_path / f"seed{seed}.csv")
        classification.write_predictions(files[-1], np.array([f"i{k}" for k in order]), np.array(["p"] * 4),
                                         labels[order], np.array(probs)[order, None], ["Pneumonia"])
    # mean probabilities 0.2, 0.65, 0.35, 0.55: every positive above every negative.
    assert nih_cv.ensemble_auc(files) == 1.0
    classification.write_predictions(files[1], np.array(["i0", "i1", "i2", "x"]), np.array(["p"] * 4), labels,
                                     np.full((4, 1), 0.5), ["Pneumonia"])
    with pytest.raises(ValueError, match="different images"):
        nih_cv.ensemble_auc(files)


@pytest.mark.slow
def test_two_tiny_folds_of_the_real_nih_sample_train_and_report_the_baselines(nih_sample_dir, tmp_path):
    config = tiny_configs.tiny_config()
    config.classifier.update(baselines=("pixel_logreg_16",))
    config.classifier.train.update(steps=4, batch_size=16, eval_every=2, checkpoint_every=4, log_every=2)
    results = nih_cv.cross_validate(config, manual_dir=str(nih_sample_dir), workdir=tmp_path, image_size=64,
                                    folds=2, only_folds=(1,), seeds=(0,))
    assert [r.fold for r in results] == [1]
    result = results[0]
    assert 0.0 <= result.network_auc[0] <= 1.0 and 0.6 < result.baseline_auc["pixel_logreg_16"] <= 1.0
    # The run read the fold's own splits: its test predictions are the held-out fold's images, all of them.
    split_of = split_rows.read_split_file(tmp_path / "folds2_seed0_fold1.csv")
    predictions = np.loadtxt(tmp_path / "runs" / "fold1_seed0" / "predictions_test.csv", dtype=str, delimiter=",",
                             skiprows=1, usecols=0)
    assert sorted(predictions) == sorted(i for i, s in split_of.items() if s == "test")
    assert sum(result.counts[s][0] for s in ("train", "validation", "test")) == len(split_of)
