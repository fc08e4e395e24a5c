"""Evaluation room, classification: AUC/ROC, AUPRC, thresholds, confusion, patient bootstrap, DeLong."""

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from xray_dit.evaluation import classification as cls


# ---- per-class AUC, ROC, thresholds, confusion -------------------------------------------------------------
def test_per_class_auc_matches_sklearn_and_handles_single_valued_and_masked_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (60, 3))
    labels[:, 2] = 0  # a class nobody has in this set
    probs = rng.random((60, 3)) + 0.5 * labels
    aucs = cls.per_class_auc(labels, probs, ["a", "b", "c"])
    assert aucs["a"] == pytest.approx(roc_auc_score(labels[:, 0], probs[:, 0]))
    assert aucs["b"] == pytest.approx(roc_auc_score(labels[:, 1], probs[:, 1]))
    assert np.isnan(aucs["c"])
    assert cls.mean_auc(aucs) == pytest.approx((aucs["a"] + aucs["b"]) / 2)

    mask = np.ones_like(labels, bool)
    mask[:30, 0] = False  # uncertain labels of class a on the first half
    masked = cls.per_class_auc(labels, probs, ["a", "b", "c"], mask=mask)
    assert masked["a"] == pytest.approx(roc_auc_score(labels[30:, 0], probs[30:, 0]))
    assert masked["b"] == aucs["b"]
    assert np.isnan(cls.mean_auc([float("nan")]))


def test_roc_curves_leave_out_single_valued_classes_and_integrate_to_the_auc():
    rng = np.random.default_rng(1)
    labels = np.stack([rng.integers(0, 2, 50), np.ones(50, int)], axis=1)
    probs = rng.random((50, 2)) + 0.3 * labels
    curves = cls.roc_curves(labels, probs, ["x", "always"])
    assert list(curves) == ["x"]
    curve = curves["x"]
    assert curve.auc == pytest.approx(np.trapezoid(curve.tpr, curve.fpr))
    assert curve.fpr[0] == 0 and curve.tpr[-1] == 1


def test_youden_threshold_on_hand_examples():
    labels = np.array([0, 0, 0, 1, 1, 1])
    # Descending: 0.9(+) 0.8(-) 0.7(+) 0.5(+) 0.2(-) 0.1(-); J is largest (1 - 1/3) at 0.5.
    assert cls.youden_threshold(labels, [0.1, 0.2, 0.8, 0.5, 0.7, 0.9]) == 0.5
    # J = 2/3 at both 0.7 (sens 2/3, spec 1) and 0.4 (sens 1, spec 2/3): the higher threshold wins.
    assert cls.youden_threshold(labels, [0.1, 0.3, 0.6, 0.4, 0.7, 0.9]) == 0.7
    with pytest.raises(ValueError, match="both positive and negative"):
        cls.youden_threshold([1, 1], [0.2, 0.3])


def test_confusion_matrix_on_a_hand_example():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.8, 0.5, 0.7, 0.9])
    cm = cls.confusion(labels, probs, threshold=0.5)  # a score equal to the threshold counts as positive
    np.testing.assert_array_equal(cm, [[2, 1], [0, 3]])
    np.testing.assert_array_equal(cls.confusion(labels, probs, threshold=0.85), [[3, 0], [2, 1]])
    with pytest.raises(ValueError, match="only 0 and 1"):
        cls.confusion([0, 2], [0.1, 0.2], 0.5)


def test_threshold_at_specificity_is_the_lowest_observed_score_reaching_it():
    negatives = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    labels = np.array([0] * 10 + [1, 1, 1])
    scores = np.array(negatives + [0.85, 0.95, 0.5])
    # 90 % specificity: 9 of 10 negatives strictly below, so t > 0.9; the lowest observed score there is 0.95.
    assert cls.threshold_at_specificity(labels, scores, 0.9) == 0.95
    assert cls.sensitivity_at_threshold(labels, scores, 0.95) == pytest.approx(1 / 3)
    # 80 %: t > 0.8, lowest observed 0.85, which catches 0.85 and 0.95.
    assert cls.threshold_at_specificity(labels, scores, 0.8) == 0.85
    assert cls.sensitivity_at_threshold(labels, scores, 0.85) == pytest.approx(2 / 3)
    assert cls.threshold_at_specificity(labels, scores, 0.0) == 0.1  # everything positive


def test_threshold_at_specificity_with_ties_and_an_unreachable_target():
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.2, 0.5, 0.5, 0.5, 0.5, 0.9])
    # A threshold at 0.5 leaves only 0.2 below (25 %); the tie cannot be split, so 50 % needs 0.9 (100 %).
    assert cls.threshold_at_specificity(labels, scores, 0.25) == 0.5
    assert cls.threshold_at_specificity(labels, scores, 0.5) == 0.9
    assert cls.sensitivity_at_threshold(labels, scores, 0.5) == 1.0  # a score equal to the threshold is positive
    # The highest score is a negative: full specificity means calling nothing positive.
    top_negative = np.array([0.1, 0.9, 0.5])
    threshold = cls.threshold_at_specificity([0, 0, 1], top_negative, 1.0)
    assert 0.9 < threshold < 0.9 + 1e-12
    assert cls.sensitivity_at_threshold([0, 0, 1], top_negative, threshold) == 0.0
    assert np.isnan(cls.sensitivity_at_threshold([0, 0], [0.1, 0.2], 0.15))
    with pytest.raises(ValueError, match="negative images"):
        cls.threshold_at_specificity([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"specificity in \[0, 1\]"):
        cls.threshold_at_specificity(labels, scores, 90)


def test_auprc_on_hand_examples():
    # Thresholds 0.9: P 1, R 1/2; 0.8: P 1/2, R 1/2; 0.7: P 2/3, R 1; AP = 1/2·1 + 0 + 1/2·2/3 = 5/6.
    assert cls.auprc([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(5 / 6)
    # A tie is one operating point: 0.5 gives P 1/2, R 1/2; 0.2 gives P 2/3, R 1; AP = 1/4 + 1/3.
    assert cls.auprc([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(1 / 4 + 1 / 3)
    with pytest.raises(ValueError, match="both positive and negative"):
        cls.auprc([0, 0], [0.1, 0.2])


def test_auc_table_markdown_formats_floats_intervals_missing_values_and_the_mean():
    table = cls.auc_table_markdown({
        "real only": {"Effusion": 0.8, "Hernia": float("nan")},
        "real + synthetic": {"Effusion": (0.85, 0.81, 0.89), "Hernia": cls.BootstrapCI(0.7, 0.6, 0.8, None)},
    })
    lines = table.strip().splitlines()
    assert lines[0] == "| class | real only | real + synthetic |"
    assert lines[2] == "| Effusion | 0.800 | 0.850 [0.810, 0.890] |"
    assert lines[3] == "| Hernia | n/a | 0.700 [0.600, 0.800] |"
    assert lines[4] == "| **mean** | 0.800 | 0.775 |"
    flat = cls.auc_table_markdown({"Effusion": 0.8123}, digits=2, include_mean=False)
    assert flat.strip().splitlines() == ["| class | AUC |", "|---|---:|", "| Effusion | 0.81 |"]


def test_mean_sd_over_seeds():
    assert cls.mean_sd_over_seeds([0.80, 0.82, 0.84]) == pytest.approx((0.82, 0.02))
    mean, sd = cls.mean_sd_over_seeds([0.8])
    assert mean == 0.8 and np.isnan(sd)


# ---- patient-level bootstrap -----------------------------------------------------------------------------
def _clustered_dataset(rng, n_patients, d=1.0, rho=0.5, max_images=3):
    """Binormal scores with a shared patient effect; one label per patient; true AUC = Φ(d / √2)."""
    patient_label = np.arange(n_patients) % 2
    images_per_patient = rng.integers(1, max_images + 1, n_patients)
    patients = np.repeat(np.arange(n_patients), images_per_patient)
    labels = patient_label[patients]
    effect = rng.normal(size=n_patients)[patients]
    scores = d * labels + np.sqrt(rho) * effect + np.sqrt(1 - rho) * rng.normal(size=patients.size)
    return labels, scores, patients


def test_patient_bootstrap_draws_whole_patients_and_replicates_equal_sklearn_on_the_resample():
    rng = np.random.default_rng(2)
    labels, scores, patients = _clustered_dataset(rng, 30)
    scores = np.round(scores, 1)  # ties
    patient_ids = np.array([f"p{p:03d}" for p in patients])  # string ids work too
    result = cls.bootstrap_auc_ci(labels, scores, patient_ids, n_boot=40, seed=5)
    multiplicities = np.concatenate(list(cls.patient_bootstrap(patient_ids, 40, seed=5)))
    assert multiplicities.shape == (40, labels.size)
    for b, times in enumerate(multiplicities):
        per_patient = [np.unique(times[patients == p]) for p in range(30)]
        assert all(len(u) == 1 for u in per_patient), "images of one patient must be drawn together"
        assert sum(u[0] for u in per_patient) == 30, "each resample draws as many patients as there are"
        resample = np.repeat(np.arange(labels.size), times)
        expected = (roc_auc_score(labels[resample], scores[resample])
                    if np.unique(labels[resample]).size == 2 else np.nan)
        np.testing.assert_allclose(result.replicates[b], expected, rtol=1e-12)
    assert result.estimate == pytest.approx(roc_auc_score(labels, scores))
    assert result.lower <= result.estimate <= result.upper


def test_patient_bootstrap_is_wider_than_an_image_bootstrap_when_patients_repeat_images():
    rng = np.random.default_rng(3)
    n_patients, k = 80, 5
    patient_scores = rng.normal(size=n_patients) + 0.8 * (np.arange(n_patients) % 2)
    patients = np.repeat(np.arange(n_patients), k)  # k identical images per patient
    labels, scores = patients % 2, patient_scores[patients]
    by_patient = cls.bootstrap_auc_ci(labels, scores, patients, n_boot=400, seed=0)
    by_image = cls.bootstrap_auc_ci(labels, scores, np.arange(labels.size), n_boot=400, seed=0)
    assert by_patient.estimate == by_image.estimate
    # Resampling images treats k copies as k independent cases: the interval shrinks by about √k.
    assert (by_patient.upper - by_patient.lower) > 1.6 * (by_image.upper - by_image.lower)


def test_patient_bootstrap_ci_covers_the_true_auc_about_95_percent_of_the_time():
    rng = np.random.default_rng(4)
    d = 1.0
    true_auc = norm.cdf(d / np.sqrt(2))
    covered = []
    for trial in range(200):
        labels, scores, patients = _clustered_dataset(rng, 40, d=d)
        ci = cls.bootstrap_auc_ci(labels, scores, patients, n_boot=200, seed=trial)
        covered.append(ci.lower <= true_auc <= ci.upper)
    assert 0.88 <= np.mean(covered) <= 0.99, np.mean(covered)


def test_paired_difference_ci_is_zero_for_identical_arms_and_excludes_zero_for_a_better_arm():
    rng = np.random.default_rng(5)
    labels, scores, patients = _clustered_dataset(rng, 200, d=0.5)
    same = cls.bootstrap_auc_difference_ci(labels, scores, scores, patients, n_boot=200)
    assert (same.estimate, same.lower, same.upper) == (0.0, 0.0, 0.0)
    better = scores + 2.0 * labels
    diff = cls.bootstrap_auc_difference_ci(labels, better, scores, patients, n_boot=200, seed=1)
    assert diff.lower > 0
    # Paired: the difference replicates are the arms' replicates on the same resamples.
    a = cls.bootstrap_auc_ci(labels, better, patients, n_boot=200, seed=1).replicates
    b = cls.bootstrap_auc_ci(labels, scores, patients, n_boot=200, seed=1).replicates
    np.testing.assert_allclose(diff.replicates, a - b, atol=1e-12)


def test_bootstrap_refuses_bad_inputs():
    with pytest.raises(ValueError, match="one id per image"):
        cls.bootstrap_auc_ci([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [1, 2, 3])
    with pytest.raises(ValueError, match="alpha"):
        cls.bootstrap_auc_ci([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4], alpha=5)
    with pytest.raises(ValueError, match="both positive and negative"):
        cls.bootstrap_auc_ci([1, 1, 1], [0.1, 0.2, 0.3], [1, 2, 3])


# ---- DeLong ------------------------------------------------------------------------------------------------
def _direct_delong(labels, score_sets):
    """DeLong et al. (1988) by explicit pairwise comparisons, O(m·n): the independent reference."""
    aucs, v10s, v01s = [], [], []
    for s in score_sets:
        x, y = s[labels == 1], s[labels == 0]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        aucs.append(psi.mean())
        v10s.append(psi.mean(axis=1))
        v01s.append(psi.mean(axis=0))
    aucs, v10s, v01s = np.array(aucs), np.array(v10s), np.array(v01s)
    m, n = v10s.shape[1], v01s.shape[1]
    s10 = (v10s - aucs[:, None]) @ (v10s - aucs[:, None]).T / (m - 1)
    s01 = (v01s - aucs[:, None]) @ (v01s - aucs[:, None]).T / (n - 1)
    return aucs, s10 / m + s01 / n


def test_delong_matches_the_direct_structural_components_formula_with_ties():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 150)
    shared = rng.normal(size=150)
    scores_a = np.round(0.9 * labels + shared + 0.5 * rng.normal(size=150), 1)  # rounding makes ties
    scores_b = np.round(0.5 * labels + shared + 0.8 * rng.normal(size=150), 1)
    assert len(np.unique(scores_a)) < 100
    ref_aucs, ref_cov = _direct_delong(labels, [scores_a, scores_b])

    aucs, cov = cls.delong_covariance(labels, np.stack([scores_a, scores_b]))
    np.testing.assert_allclose(aucs, ref_aucs, rtol=1e-12)
    np.testing.assert_allclose(aucs[0], roc_auc_score(labels, scores_a), rtol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10)
    auc, var = cls.delong_covariance(labels, scores_b[None])
    assert (auc[0], var[0, 0]) == pytest.approx((ref_aucs[1], ref_cov[1, 1]), rel=1e-10)

    result = cls.delong_test(labels, scores_a, scores_b)
    ref_z = (ref_aucs[0] - ref_aucs[1]) / np.sqrt(ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1])
    assert result.z == pytest.approx(ref_z, rel=1e-9)
    assert result.p_value == pytest.approx(2 * norm.sf(abs(ref_z)), rel=1e-9)
    assert (result.auc_a, result.auc_b) == pytest.approx(tuple(ref_aucs))


def test_delong_identical_scores_give_p_one_and_a_clearly_better_score_a_tiny_p():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 300)
    scores = labels + rng.normal(size=300)
    same = cls.delong_test(labels, scores, scores)
    assert same.z == 0.0 and same.p_value == 1.0
    # A monotone transform ranks identically: the same AUC, so also p = 1.
    assert cls.delong_test(labels, scores, np.exp(scores)).p_value == 1.0
    better = cls.delong_test(labels, 3 * labels + rng.normal(size=300), rng.normal(size=300))
    assert better.z > 0 and better.p_value < 1e-6
    assert cls.delong_test(labels, rng.normal(size=300), 3 * labels + rng.normal(size=300)).z < 0


def test_delong_variance_agrees_with_bootstrap_variance_on_a_large_sample():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 2, 2000)
    scores = 1.2 * labels + rng.normal(size=2000)
    variance = cls.delong_covariance(labels, scores[None])[1][0, 0]
    replicates = cls.bootstrap_auc_ci(labels, scores, np.arange(2000), n_boot=1000, seed=0).replicates
    assert 0.8 < replicates.var(ddof=1) / variance < 1.25


def test_delong_refuses_too_few_cases():
    with pytest.raises(ValueError, match="at least 2 positive and 2 negative"):
        cls.delong_covariance([0, 0, 1], [[0.1, 0.2, 0.3]])


def test_predictions_file_round_trip_keeps_unknown_labels_unknown(tmp_path):
    rng = np.random.default_rng(9)
    probs = rng.random((5, 2)).astype(np.float32)
    labels = np.array([[0, 1], [1, 0], [0, 0], [1, 1], [0, 1]])
    mask = np.ones((5, 2), bool)
    mask[1, 1] = mask[3, 0] = False
    path = tmp_path / "arm" / "predictions.csv"
    cls.write_predictions(path, [f"img{i}.png" for i in range(5)], ["p1", "p1", "p2", "p3", "p3"], labels, probs,
                          ["Effusion", "Pleural, Thickening"], mask=mask)
    read = cls.read_predictions(path)
    assert read["class_names"] == ["Effusion", "Pleural, Thickening"]
    assert list(read["image_id"]) == [f"img{i}.png" for i in range(5)] and read["patient_id"][1] == "p1"
    np.testing.assert_array_equal(read["mask"], mask)
    np.testing.assert_array_equal(read["labels"], np.where(mask, labels, 0))
    np.testing.assert_array_equal(read["probs"], probs)
    assert cls.per_class_auc(read["labels"], read["probs"], read["class_names"], read["mask"]) == \
        cls.per_class_auc(labels, probs, ["Effusion", "Pleural, Thickening"], mask)
    with pytest.raises(ValueError, match="labels"):
        cls.write_predictions(tmp_path / "bad.csv", ["a"], ["p"], labels, probs, ["x", "y"])
    (tmp_path / "other.csv").write_text("image,patient\n")
    with pytest.raises(ValueError, match="not a predictions file"):
        cls.read_predictions(tmp_path / "other.csv")
