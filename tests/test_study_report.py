"""Phase 09 on hand-made phase results: the sections come in the analysis plan's order, and the optional
parts (pixel baselines, detectability, scarcity) appear when their results exist and say so when not."""

import copy

import pytest

from tests.helpers.compare_arms import study_context, write_arm
from xray_dit.study import analysis, privacy_report, report, report_comparison

ORDER = [*report_comparison.SECTIONS, "Baseline: the network and a pixel logistic regression beside it",
         "Classifier performance per arm", "Synthetic images and the filters", "## Privacy",
         "Quality of the synthetic set", "## Limitations", "Phases, timings and configuration"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    retrained = {"real + 8 synthetic": write_arm(root, "syn", 3.0, 10, kind="synthetic", count=8, primary=True),
                 "real + 8 oversampled real": write_arm(root, "over", 1.0, 20, kind="oversampled", count=8,
                                                        primary=True)}
    context = study_context(root, retrained, synthetic_counts=(8,), primary_count=8, bootstrap_samples=100)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(analysis, "_train_target_positives", lambda config: 40)
        context.results["07_compare"] = analysis.compare(context)
    context.results["05_filter"] = {
        "generated": 16, "accepted": 12, "criteria": {"duplicates": {"passed": 15, "rejected": 1}},
        "thresholds": {"fidelity_probability": 0.5, "realism_knn": 0.1, "privacy_pixel": 0.1, "privacy_feature": 0.1,
                       "duplicate_correlation": 0.98}, "reject_examples": {}}
    context.results["08_privacy"] = {
        "memorisation_rate": 0.0, "privacy_threshold_pixel": 0.1, "synthetic_to_train_median": 0.3,
        "heldout_to_train_median": 0.3, "membership_inference": {"auc": 0.52}, "quality": {},
        "ms_ssim_diversity": {"synthetic": 0.4}, "figures": {"grid": None, "histogram": None, "closest_pairs": None}}
    (root / "09_report").mkdir()
    return context


@pytest.fixture(autouse=True)
def _privacy_section_stand_in(monkeypatch):
    """The privacy and quality blocks come from 08's own section builder, tested with 08's real results in
    test_study_privacy_report / test_study_phases; here only their place in the report matters."""
    monkeypatch.setattr(privacy_report, "report_section", lambda priv, filt, config: [
        ("h", 2, "Privacy"), ("p", "privacy stand-in"), ("h", 2, "Quality of the synthetic set"),
        ("p", "quality stand-in")])


def _written(context) -> str:
    report.write_report(context)
    return (context.workdir / "report.md").read_text()


def test_sections_follow_the_analysis_plan(compared):
    text = _written(compared)
    positions = [text.index(heading) for heading in ORDER]
    assert positions == sorted(positions), [h for h, _ in sorted(zip(ORDER, positions), key=lambda x: x[1])]
    assert text.index("**Primary endpoint**") < text.index("## Answer: the primary endpoint")
    primary = compared.results["07_compare"]["primary"][0]["statement"]
    assert primary in text.split("## Every arm against real only")[0]
    assert "Detectability was not measured" in text and "No pixel baseline was fitted" in text
    assert "One target fraction: no scarcity curve" in text
    html = (compared.workdir / "report.html").read_text()
    assert html.index("Analysis plan") < html.index("Answer: the primary endpoint") < html.index("Forest plot")


def test_pixel_baselines_detectability_and_scarcity_appear_when_measured(compared):
    context = copy.copy(compared)
    context.results = copy.deepcopy(compared.results)
    runs = context.results["01_baseline"]["runs"]
    for run in runs.values():
        run["baselines"] = {"pixel_logreg_16": {"size": 16, "test_auc": {"Cardiomegaly": 0.612, "Effusion": 0.55},
                                                "test_auc_mean": 0.581}}
    context.results["08_privacy"]["detectability"] = {
        "all generated": {"auc": 0.91, "lower": 0.85, "upper": 0.96, "n_real": 40, "n_synthetic": 16}}
    scarce = copy.deepcopy(context.results)
    scarce["07_compare"].update(fraction=0.25, train_target_positives=10)
    scarce["07_compare"]["family"][0].update(p_holm=0.0123, significant=True)
    scarce["07_compare"]["primary"][0]["statement"] = "the primary contrast at a quarter of the positives"
    context.results["fractions"] = {"1.0": context.results, "0.25": scarce}
    text = _written(context)
    baseline = text.split("## Baseline")[1].split("## Classifier performance")[0]
    assert "| pixel_logreg_16 | 0.612 | — | 0.581 |" in baseline and "| network |" in baseline
    detect = text.split("## Detectability")[1].split("## Baseline")[0]
    assert "| all generated | 0.910 [0.850, 0.960] | 40 | 16 |" in detect
    assert (context.workdir / "09_report" / "scarcity.png").exists() and "Scarcity:" in text
    assert "reports target fraction 1, the largest of the study's fractions (1, 0.25)" in text
    # The scarcer fraction gets its own primary endpoint and Holm table, inside the scarcity section.
    scarcity = text.split("## Dose-response and scarcity")[1].split("## Detectability")[0]
    quarter = scarcity.split("### Target fraction 0.25 (10 real Cardiomegaly training images)")[1]
    assert "the primary contrast at a quarter of the positives" in quarter
    first = scarce["07_compare"]["family"][0]["name"]
    assert any(line.startswith(f"| {first} |") and line.endswith("| 0.0123 | yes |") for line in quarter.splitlines())
    assert "### Target fraction 1" not in scarcity


def test_scarcity_series_put_each_fraction_at_its_real_positives(compared):
    compare = compared.results["07_compare"]
    scarce = copy.deepcopy(compare)
    scarce.update(train_target_positives=10)
    series, ticks = report_comparison.scarcity_series({"1.0": {"07_compare": compare},
                                                       "0.25": {"07_compare": scarce}})
    estimand = compare["plan"]["decision_estimand"]
    primary = compare["primary"][0][estimand]
    gain = compare["family"][0][estimand]
    assert series["synthetic − oversampled"] == [
        (40.0, primary["estimate"], primary["lower"], primary["upper"]),
        (10.0, primary["estimate"], primary["lower"], primary["upper"])]
    assert series["synthetic − real only"][0] == (40.0, gain["estimate"], gain["lower"], gain["upper"])
    assert ticks == {40.0: "40 (1)", 10.0: "10 (0.25)"}
    assert report_comparison.scarcity_series({"1.0": {"07_compare": compare}}) == ({}, {})


def test_report_states_each_filter_threshold():
    thresholds = {"fidelity_probability": 0.5, "realism_knn": 0.1, "privacy_pixel": 0.2, "privacy_feature": 0.3,
                  "duplicate_correlation": 0.98}
    assert report._threshold_text("label fidelity", thresholds, "Effusion") == "p(Effusion) ≥ 0.50"
    assert report._threshold_text("privacy", thresholds, "Effusion") == "pixel > 0.2000 and feature > 0.3000"
