"""Evaluation room, statistics: Holm's correction, weighted ranking metrics, the patients × seeds bootstrap."""

import itertools

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from xray_dit.evaluation import classification, statistics as st


# ---- Holm ------------------------------------------------------------------------------------------------
def test_holm_on_a_hand_worked_example():
    # Sorted: d 0.005, a 0.01, c 0.03, b 0.04; times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04; running max:
    # 0.02, 0.03, 0.06, 0.06 (b is raised to c's value: adjusted p-values keep the order of the raw ones).
    # Step-down at 0.05: 0.005 <= 0.05/4, 0.01 <= 0.05/3, 0.03 > 0.05/2 stops: d and a are rejected.
    result = st.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}, alpha=0.05)
    assert list(result.adjusted_p) == ["a", "b", "c", "d"]
    assert result.adjusted_p == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    assert result.reject == {"a": True, "b": False, "c": False, "d": True}
    capped = st.holm([0.5, 0.6])  # 2 × 0.5 = 1.0; 0.6 is raised to 1.0 by monotonicity
    np.testing.assert_allclose(capped.adjusted_p, [1.0, 1.0])
    np.testing.assert_array_equal(capped.reject, [False, False])
    assert st.holm([]).adjusted_p.size == 0


def _closed_testing_bonferroni(p):
    """Holm is closed testing with Bonferroni tests: adjusted p_i = max over sets S ∋ i of min(1, |S| min_S p)."""
    m = len(p)
    adjusted = np.zeros(m)
    for size in range(1, m + 1):
        for subset in itertools.combinations(range(m), size):
            local = min(1.0, size * min(p[j] for j in subset))
            for i in subset:
                adjusted[i] = max(adjusted[i], local)
    return adjusted


def _step_down(p, alpha):
    reject = np.zeros(len(p), bool)
    for k, i in enumerate(np.argsort(p, kind="stable")):
        if p[i] > alpha / (len(p) - k):
            break
        reject[i] = True
    return reject


def test_holm_equals_closed_testing_and_the_step_down_procedure_by_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(60):
        m = rng.integers(1, 7)
        p = rng.choice([0.001, 0.004, 0.01, 0.02, 0.03, 0.2, 0.7], m) if trial % 3 == 0 else rng.random(m) ** 3
        result = st.holm(p, alpha=0.05)
        np.testing.assert_allclose(result.adjusted_p, _closed_testing_bonferroni(p), rtol=1e-12)
        for alpha in (0.01, 0.05, 0.1):
            np.testing.assert_array_equal(st.holm(p, alpha=alpha).reject, _step_down(p, alpha))


def test_holm_refuses_invalid_p_values():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        st.holm([0.1, float("nan")])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        st.holm({"a": 1.2})
    with pytest.raises(ValueError, match="alpha"):
        st.holm([0.1], alpha=0)


# ---- weighted ranking metrics ------------------------------------------------------------------------------
@pytest.mark.parametrize("metric, reference", [("auc", roc_auc_score), ("auprc", average_precision_score)])
def test_weighted_ranking_metric_equals_sklearn_with_sample_weight_including_ties(metric, reference):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 40)
    shared = np.round(rng.random(40) + 0.3 * labels, 1)  # many ties
    per_resample = np.round(rng.random((6, 40)) + 0.3 * labels, 1)
    weights = rng.integers(0, 3, (6, 40)).astype(float)
    weights[5] = rng.random(40)  # non-integer weights too
    shared_values = st.weighted_ranking_metric(labels, shared, weights, metric)
    row_values = st.weighted_ranking_metric(labels, per_resample, weights, metric)
    for b in range(6):
        assert shared_values[b] == pytest.approx(reference(labels, shared, sample_weight=weights[b]), rel=1e-12)
        assert row_values[b] == pytest.approx(reference(labels, per_resample[b], sample_weight=weights[b]), rel=1e-12)
    no_positive = np.where(labels == 1, 0.0, 1.0)[None]
    assert np.isnan(st.weighted_ranking_metric(labels, shared, no_positive, metric)[0])


# ---- the two-level bootstrap -----------------------------------------------------------------------------
def test_two_level_resamples_draw_whole_patients_and_cross_paired_seed_factors():
    patients = np.array(["p1", "p1", "p2", "p3", "p3", "p3", "p4"])
    factors_a = {"seed": [0, 1, 2]}
    factors_b = {"seed": [0, 1, 2, 0, 1, 2], "generator": [7, 7, 7, 9, 9, 9]}
    chunks = list(st.two_level_resamples(patients, factors_a, factors_b, n_boot=300, seed=3))
    images, rows_a, rows_b = (np.concatenate(parts) for parts in zip(*chunks))
    np.testing.assert_array_equal(images, np.concatenate(list(classification.patient_bootstrap(patients, 300, 3))))
    assert (rows_a.sum(axis=1) == 3).all(), "each replicate draws as many classifier seeds as there are"
    generator_counts = rows_b.reshape(300, 2, 3).sum(axis=2) // 3
    assert (generator_counts.sum(axis=1) == 2).all()
    # Crossed and paired: B's row (generator g, seed c) weighs count(g) × count(c), A's row c weighs count(c).
    np.testing.assert_array_equal(rows_b.reshape(300, 2, 3), generator_counts[:, :, None] * rows_a[:, None, :])
    assert rows_a.mean() == pytest.approx(1.0, abs=0.1)  # every seed equally likely
    with pytest.raises(ValueError, match="levels differ"):
        next(st.two_level_resamples(patients, {"seed": [0, 1]}, {"seed": [0, 2]}, n_boot=2, seed=0))


def _small_case(seed=0):
    """4 patients, 7 images, 2 seeds per arm, continuous probabilities (no ties in any ensemble)."""
    rng = np.random.default_rng(seed)
    labels = np.array([1, 1, 0, 0, 1, 0, 0])
    patients = np.array([0, 0, 1, 2, 2, 3, 3])
    probs_a = rng.random((2, 7)) * 0.8 + 0.2 * labels
    probs_b = rng.random((2, 7)) * 0.8 + 0.4 * labels
    return labels, patients, probs_a, probs_b


def _pairwise_auc(labels, scores):
    """AUC by comparing every positive with every negative (ties count half)."""
    x, y = scores[labels == 1], scores[labels == 0]
    return np.mean((x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :]))


def _loop_replicate(labels, probs, images, seeds, metric):
    """One replicate from explicit index lists: (metric of the mean over drawn seeds, mean of seed metrics)."""
    y = labels[images]
    if np.unique(y).size < 2:
        return np.nan, np.nan
    ensemble = probs[seeds].mean(axis=0)
    return metric(y, ensemble[images]), np.mean([metric(y, probs[s][images]) for s in seeds])


@pytest.mark.parametrize("metric, reference", [("auc", _pairwise_auc), ("auprc", average_precision_score),
                                               (roc_auc_score, _pairwise_auc)])
@pytest.mark.parametrize("paired", [True, False])
def test_two_level_bootstrap_equals_a_plain_loop_on_the_same_draws(metric, reference, paired):
    labels, patients, probs_a, probs_b = _small_case()
    seeds = dict(seeds_a=[0, 1], seeds_b=[0, 1]) if paired else {}
    result = st.two_level_bootstrap_difference(labels, probs_a, probs_b, patients, metric=metric, n_boot=30,
                                               seed=4, **seeds)
    factors = ({"seed": [0, 1]}, {"seed": [0, 1]}) if paired else ({"A": [0, 1]}, {"B": [0, 1]})
    images, rows_a, rows_b = (np.concatenate(p) for p in zip(*st.two_level_resamples(patients, *factors, 30, 4)))
    expected = {"ensemble": [], "single_model": []}
    for b in range(30):
        index = np.repeat(np.arange(7), images[b])
        ens_a, single_a = _loop_replicate(labels, probs_a, index, np.repeat([0, 1], rows_a[b]), reference)
        ens_b, single_b = _loop_replicate(labels, probs_b, index, np.repeat([0, 1], rows_b[b]), reference)
        expected["ensemble"].append((ens_a, ens_b))
        expected["single_model"].append((single_a, single_b))
    for estimand, pairs in expected.items():
        got = getattr(result, estimand)
        arm_a, arm_b = np.array(pairs).T
        np.testing.assert_allclose(got.arm_a.replicates, arm_a, rtol=1e-12)
        np.testing.assert_allclose(got.arm_b.replicates, arm_b, rtol=1e-12)
        np.testing.assert_allclose(got.replicates, arm_b - arm_a, rtol=1e-12, atol=1e-15)
    ensemble = reference(labels, probs_b.mean(axis=0)) - reference(labels, probs_a.mean(axis=0))
    assert result.ensemble.estimate == pytest.approx(ensemble)
    single = np.mean([reference(labels, p) for p in probs_b]) - np.mean([reference(labels, p) for p in probs_a])
    assert result.single_model.estimate == pytest.approx(single)
    if paired:  # the seed draws are shared: both arms use the same seeds in every replicate
        np.testing.assert_array_equal(rows_a, rows_b)


def test_two_level_bootstrap_distribution_matches_exhaustive_enumeration():
    """All 4^4 patient draws × 2^2 paired seed draws are equally likely; simulation must agree with them."""
    labels, patients, probs_a, probs_b = _small_case(seed=1)
    members = [np.flatnonzero(patients == p) for p in range(4)]
    exact = []
    for drawn_patients in itertools.product(range(4), repeat=4):
        images = np.concatenate([members[p] for p in drawn_patients])
        for drawn_seeds in itertools.product(range(2), repeat=2):
            ens_a, _ = _loop_replicate(labels, probs_a, images, list(drawn_seeds), _pairwise_auc)
            ens_b, _ = _loop_replicate(labels, probs_b, images, list(drawn_seeds), _pairwise_auc)
            exact.append(ens_b - ens_a)
    exact = np.array(exact)
    simulated = st.two_level_bootstrap_difference(labels, probs_a, probs_b, patients, seeds_a=[0, 1],
                                                  seeds_b=[0, 1], n_boot=3000, seed=0).ensemble.replicates
    assert np.isnan(simulated).mean() == pytest.approx(np.isnan(exact).mean(), abs=0.025)
    exact, simulated = exact[~np.isnan(exact)], simulated[~np.isnan(simulated)]
    assert simulated.mean() == pytest.approx(exact.mean(), abs=4 * exact.std() / np.sqrt(simulated.size))
    assert np.mean(simulated > 0) == pytest.approx(np.mean(exact > 0), abs=0.03)


def _clustered_arms(rng, n_patients=150, n_seeds=4, gain=0.0, seed_noise=0.3):
    """Two images per patient; arm B's signal is `gain` larger; both arms share each seed's noise."""
    patients = np.repeat(np.arange(n_patients), 2)
    labels = (np.arange(n_patients) % 3 == 0).astype(int)[patients]
    base = rng.normal(size=patients.size) + rng.normal(size=n_patients)[patients]
    seed_effect = seed_noise * rng.normal(size=(n_seeds, patients.size))
    probs_a = labels + base + seed_effect
    probs_b = (1 + gain) * labels + base + seed_effect
    return labels, patients, probs_a, probs_b


def test_identical_arms_differ_by_exactly_zero_and_a_clearly_better_arm_excludes_zero():
    rng = np.random.default_rng(2)
    labels, patients, probs_a, probs_b = _clustered_arms(rng, gain=1.5)
    same = st.two_level_bootstrap_difference(labels, probs_a, probs_a, patients, seeds_a=range(4), seeds_b=range(4),
                                             n_boot=200)
    for d in same:
        assert (d.estimate, d.lower, d.upper, d.p_value) == (0.0, 0.0, 0.0, 1.0)
        assert d.arm_a.lower < d.arm_a.estimate < d.arm_a.upper
    better = st.two_level_bootstrap_difference(labels, probs_a, probs_b, patients, seeds_a=range(4),
                                               seeds_b=range(4), n_boot=200, seed=1)
    worse = st.two_level_bootstrap_difference(labels, probs_b, probs_a, patients, n_boot=200, seed=1)
    for d in better:
        assert 0 < d.lower < d.estimate < d.upper and d.p_value == pytest.approx(2 / 201)
    for d in worse:
        assert d.upper < 0 and d.p_value < 0.05


def test_pairing_seeds_narrows_the_interval_when_seeds_affect_both_arms_alike():
    rng = np.random.default_rng(3)
    labels, patients, probs_a, probs_b = _clustered_arms(rng, gain=0.1, seed_noise=1.0)
    # Paired: the shared seed effect cancels in every replicate; unpaired draws leave it in.
    paired = st.two_level_bootstrap_difference(labels, probs_a, probs_b, patients, seeds_a=range(4),
                                               seeds_b=range(4), n_boot=300).single_model
    unpaired = st.two_level_bootstrap_difference(labels, probs_a, probs_b, patients, n_boot=300).single_model
    assert paired.estimate == unpaired.estimate
    assert (paired.upper - paired.lower) < 0.8 * (unpaired.upper - unpaired.lower)


def test_generator_seeds_widen_the_interval_when_generators_differ():
    rng = np.random.default_rng(4)
    labels, patients, probs_a, _ = _clustered_arms(rng, n_seeds=3, seed_noise=0.1)
    generator_gain = np.array([0.0, 0.6])  # two generators: one helps, one does not
    probs_b = np.concatenate([probs_a + g * labels for g in generator_gain])  # rows: generator-major
    crossed = dict(seeds_a=[0, 1, 2], seeds_b={"seed": [0, 1, 2] * 2, "generator": [0, 0, 0, 1, 1, 1]})
    ignored = dict(seeds_a=[0, 1, 2], seeds_b={"seed": [0, 1, 2] * 2})  # generators treated as fixed
    with_generators = st.two_level_bootstrap_difference(labels, probs_a, probs_b, patients, n_boot=300, **crossed)
    fixed = st.two_level_bootstrap_difference(labels, probs_a, probs_b, patients, n_boot=300, **ignored)
    assert with_generators.single_model.estimate == pytest.approx(fixed.single_model.estimate)
    width = lambda d: d.upper - d.lower  # noqa: E731
    assert width(with_generators.single_model) > 1.5 * width(fixed.single_model)


def test_a_replicate_that_draws_none_of_an_arms_seed_combinations_is_left_out():
    labels, patients, probs_a, probs_b = _small_case()
    # B holds only generator 0 with seed 0 and generator 1 with seed 1: drawing seed 0 twice with
    # generator 1 twice selects none of its rows.
    incomplete = dict(seeds_a=[0, 1], seeds_b={"seed": [0, 1], "generator": [0, 1]})
    result = st.two_level_bootstrap_difference(labels, probs_a, probs_b, patients, metric=roc_auc_score,
                                               n_boot=40, **incomplete)
    factors = ({"seed": [0, 1]}, {"seed": [0, 1], "generator": [0, 1]})
    images, _, rows_b = (np.concatenate(p) for p in zip(*st.two_level_resamples(patients, *factors, 40, 0)))
    one_class = np.array([np.unique(np.repeat(labels, w)).size < 2 for w in images])
    nothing_drawn = rows_b.sum(axis=1) == 0
    assert nothing_drawn.any() and (~nothing_drawn & ~one_class).any()
    for d in result:
        np.testing.assert_array_equal(np.isnan(d.replicates), nothing_drawn | one_class)


def test_two_level_bootstrap_refuses_bad_inputs():
    labels, patients, probs_a, probs_b = _small_case()
    with pytest.raises(ValueError, match="no seed factor"):
        st.two_level_bootstrap_difference(labels, probs_a, probs_b, patients, seeds_a={}, n_boot=5)
    with pytest.raises(ValueError, match="one level per prediction row"):
        st.two_level_bootstrap_difference(labels, probs_a, probs_b, patients, seeds_a=[0, 1, 2], n_boot=5)
    with pytest.raises(ValueError, match=r"\(seeds, images\)"):
        st.two_level_bootstrap_difference(labels, probs_a[:, :5], probs_b, patients, n_boot=5)
    with pytest.raises(ValueError, match="one id per image"):
        st.two_level_bootstrap_difference(labels, probs_a, probs_b, patients[:5], n_boot=5)
    with pytest.raises(ValueError, match="'auc' or 'auprc'"):
        st.two_level_bootstrap_difference(labels, probs_a, probs_b, patients, metric="accuracy", n_boot=5)


def test_dose_response_rows_are_tidy_and_ordered_by_family_and_count():
    def difference(value):
        arm = classification.BootstrapCI(0.8 + value, 0.7 + value, 0.9 + value, None)
        baseline = classification.BootstrapCI(0.8, 0.7, 0.9, None)
        return st.BootstrapDifference(value, value - 0.05, value + 0.05, 0.5, None, baseline, arm)

    comparisons = {"synthetic": {500: st.ArmComparison(difference(0.03), difference(0.02)),
                                 100: st.ArmComparison(difference(0.01), difference(0.0))}}
    rows = st.dose_response_rows(comparisons)
    assert [(r["n_added"], r["estimand"]) for r in rows] == [(100, "ensemble"), (100, "single_model"),
                                                             (500, "ensemble"), (500, "single_model")]
    assert rows[2] == {"family": "synthetic", "n_added": 500, "estimand": "ensemble", "difference": 0.03,
                       "lower": pytest.approx(-0.02), "upper": 0.08, "p_value": 0.5, "arm": pytest.approx(0.83),
                       "arm_lower": pytest.approx(0.73), "arm_upper": pytest.approx(0.93), "baseline": 0.8}
