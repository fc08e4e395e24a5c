"""Phase 9: `report.md` and a self-contained `report.html` (figures embedded), written as a results section.

The order is the analysis plan's: the plan, the primary endpoint, the Holm family, the forest plot,
dose-response and scarcity, detectability (`report_comparison`); then the baseline beside its pixel
logistic regression, every arm's numbers, the filters, privacy, quality, limitations and timings.
"""

from __future__ import annotations

import json

import jax

from xray_dit.study import analysis, privacy_report, report_comparison
from xray_dit.study.context import StudyContext, phase_seconds
from xray_dit.study.document import Report, ci_text

__all__ = ["Report", "write_report"]


def write_report(context: StudyContext) -> dict:
    config, r = context.config, context.results
    target = config.data.target_class
    report = Report(context.workdir)
    compare, filt, priv = r["07_compare"], r["05_filter"], r["08_privacy"]
    report.h(1, f"Does DiT-generated {target} data help the classifier, and is it safe to share?")
    report.p(f"Dataset **{config.data.name}/{config.data.builder_config}** ({config.data.image_size} px), "
             f"target (minority) class **{target}**, classifier seeds {list(config.study.seeds)}. "
             f"Test set: {compare['test_images']} images of {compare['test_patients']} patients, "
             f"{compare['test_positives']} positive for {target}."
             + _fraction_text(compare, r.get("fractions")))
    report_comparison.opening_sections(report, compare, priv, r.get("fractions"), context.phase_dir("09_report"))
    _baseline_section(report, config, compare, r["01_baseline"])
    _arms_section(report, config, compare)
    _filters_section(report, filt, priv, target)
    report.blocks += privacy_report.report_section(priv, filt, config)
    report.h(2, "Limitations")
    report.bullets(_limitations(config, compare))
    report.h(2, "Phases, timings and configuration")
    seconds = phase_seconds(context.workdir)
    report.table(["phase", "wall time (s)"], [[p, f"{s:.1f}"] for p, s in seconds.items()] +
                 [["total", f"{sum(seconds.values()):.1f}"]])
    report.p(f"Devices: {jax.device_count()} × {jax.devices()[0].platform}.")
    report.h(3, "Configuration")
    report.code(json.dumps(config.to_dict(), indent=1, default=str))

    md_path, html_path = context.workdir / "report.md", context.workdir / "report.html"
    if jax.process_index() == 0:
        md_path.write_text(report.markdown())
        html_path.write_text(report.html(f"xray-dit study: {target}"))
    return {"markdown": str(md_path), "html": str(html_path)}


def _fraction_text(compare: dict, fractions: dict | None) -> str:
    if not fractions or len(fractions) < 2:
        return ""
    listed = ", ".join(f"{float(f):g}" for f in fractions)
    return (f" Every section but the scarcity curve reports target fraction {compare.get('fraction', 1.0):g}, the "
            f"largest of the study's fractions ({listed}); the scarcity section gives each other fraction's primary "
            "endpoint and Holm table.")


def _baseline_section(report: Report, config, compare: dict, baseline: dict) -> None:
    target = config.data.target_class
    row = compare["arms"][analysis.BASELINE]
    report.h(2, "Baseline: the network and a pixel logistic regression beside it")
    mean, sd = row["per_class_mean_sd"][target]
    names = list(config.data.labels)
    rows = [["network", f"{mean:.3f} ± {sd:.3f}", ci_text(row["target_ensemble_auc_ci"]),
             _mean_over_classes([row["per_class_mean_sd"][c][0] for c in names])]]
    fitted = _pixel_baselines(baseline["runs"])
    for name, aucs in fitted.items():
        rows.append([name, f"{aucs[target]:.3f}", "—", _mean_over_classes([aucs[c] for c in names if c in aucs])])
    report.table(["model", f"{target} test AUC, mean ± sd over seeds", "seed ensemble [95% CI]",
                  "mean AUC over classes (mean over seeds)"], rows)
    if not fitted:
        report.p("No pixel baseline was fitted beside the network (classifier.baselines is empty).")
    if config.data.name == "cxr_phantom":
        auc = row["target_ensemble_auc_ci"][0]
        report.p(f"Baseline {target} test AUC {auc:.3f} (intended range for the phantom study 0.70–0.92: "
                 f"{'met' if 0.70 <= auc <= 0.92 else 'NOT met'}).")


def _pixel_baselines(runs: dict) -> dict[str, dict[str, float]]:
    """Each pixel baseline's per-class test AUCs, averaged over the runs that report it."""
    collected: dict[str, list[dict]] = {}
    for run in runs.values():
        for name, result in (run.get("baselines") or {}).items():
            collected.setdefault(name, []).append(result["test_auc"])
    return {name: {c: float(sum(a[c] for a in aucs) / len(aucs)) for c in aucs[0]} for name, aucs in collected.items()}


def _mean_over_classes(values: list[float]) -> str:
    finite = [v for v in values if v == v]
    return f"{sum(finite) / len(finite):.3f}" if finite else "n/a"


def _arms_section(report: Report, config, compare: dict) -> None:
    target = config.data.target_class
    report.h(2, "Classifier performance per arm (test split)")
    report.p("Seed ensemble with patient-bootstrap 95% CIs; sensitivity at the threshold that gives "
             f"{100 * compare['plan']['specificity']:.0f} % specificity on validation (the test specificity it "
             "reaches beside it). Δ and DeLong p: the ensemble against real only, a secondary check.")
    rows = []
    for arm, row in compare["arms"].items():
        mean, sd = row["per_class_mean_sd"][target]
        sens = row["sensitivity_at_specificity"]
        sens_text = (f"{ci_text(sens['sensitivity'])} (spec. {sens['test_specificity']:.2f})"
                     if sens.get("threshold") is not None else "n/a (no validation positives)")
        vs = row.get("vs_baseline")
        rows.append([arm, ci_text(row["target_ensemble_auc_ci"]), f"{mean:.3f} ± {sd:.3f}", ci_text(row["auprc"]),
                     sens_text, ci_text(vs["auc_difference_ci"], signed=True) if vs else "—",
                     f"{vs['delong_p']:.3g}" if vs else "—"])
    report.table(["arm", f"{target} AUC [95% CI]", "mean ± sd over seeds", "AUPRC [95% CI]",
                  "sensitivity at 90% spec. [95% CI]", "Δ AUC vs real only", "DeLong p"], rows)
    names = list(config.data.labels)
    report.table(["arm"] + [f"{c} (mean ± sd)" for c in names],
                 [[arm] + [f"{row['per_class_mean_sd'][c][0]:.3f} ± {row['per_class_mean_sd'][c][1]:.3f}" for c in names]
                  for arm, row in compare["arms"].items()])
    report.figure(compare["figures"]["auc_ci"], f"{target} AUC per arm with patient-level bootstrap 95% CI")
    report.figure(compare["figures"]["roc"], f"{target} ROC curves per arm (seed-ensemble scores)")
    for arm, path in compare["figures"]["confusion"].items():
        source = compare["arms"][arm]["threshold_source"]
        report.figure(path, f"Confusion matrix, {arm} (threshold {compare['arms'][arm]['threshold']:.3f} from {source})")


def _filters_section(report: Report, filt: dict, priv: dict, target: str) -> None:
    report.h(2, "Synthetic images and the filters")
    report.figure(priv["figures"]["grid"], "Real training images of the target class (top row) and synthetic ones")
    report.p(f"{filt['generated']} images generated, **{filt['accepted']} accepted** by all four filters. "
             "Each criterion on its own:")
    report.table(["filter", "passed", "rejected", "threshold"],
                 [[name, c["passed"], c["rejected"], _threshold_text(name, filt["thresholds"], target)]
                  for name, c in filt["criteria"].items()])
    for name, path in filt["reject_examples"].items():
        report.figure(path, f"Examples rejected by the {name} filter")


def _threshold_text(name: str, thresholds: dict, target: str) -> str:
    return {"label fidelity": f"p({target}) ≥ {thresholds['fidelity_probability']:.2f}",
            "realism": f"k-NN cosine distance ≤ {thresholds['realism_knn']:.4f}",
            "privacy": f"pixel > {thresholds['privacy_pixel']:.4f} and feature > {thresholds['privacy_feature']:.4f}",
            "duplicates": f"pixel correlation ≤ {thresholds['duplicate_correlation']:.2f}"}[name]


def _limitations(config, compare) -> list[str]:
    items = [
        f"One dataset ({config.data.name}) and one split; {len(config.study.seeds)} classifier seeds per arm — "
        "seed-to-seed spread is reported but a few seeds estimate it poorly.",
        f"The test set holds {compare['test_positives']} {config.data.target_class} positives; the confidence "
        "intervals reflect that and a small difference cannot be detected.",
        "The verdicts come from the pre-specified two-level bootstrap (patients × seeds); DeLong's test treats "
        "test images as independent and is shown only as a secondary check.",
        "Per-arm intervals (AUC, AUPRC, sensitivity) resample test patients around the seed ensemble; only the "
        "differences also resample seeds.",
        "Synthetic images carry only the generated label; other findings in them count as negative.",
        "Synthetic images pass through the VAE decoder and are smoother than real images; a classifier can tell "
        "the two apart, so part of any effect may come from this domain gap rather than from the anatomy.",
        "Privacy is judged by nearest-neighbour distances in pixel and classifier-feature space; a memorised "
        "patient could be disguised in ways these distances miss.",
    ]
    if config.data.name == "cxr_phantom":
        items.insert(0, "The data are procedural phantoms, not radiographs: the result shows the pipeline works "
                        "and how the statistics read, not that DiT augmentation helps on real X-rays.")
    return items
