"""The report's opening sections: the study's answer, in the order the analysis plan fixes.

    analysis plan → primary endpoint → every arm vs real only (Holm family) → forest plot →
    dose-response and scarcity → detectability

Each function adds one section to a `document.Report` from 07_compare's result (and 08_privacy's, and the
results of every scarcity fraction).
"""

from __future__ import annotations

from typing import Mapping

from etils import epath

from xray_dit.evaluation import plots
from xray_dit.study import analysis_plan
from xray_dit.study.document import Report, ci_text

SECTIONS = ("Analysis plan (pre-specified)", "Answer: the primary endpoint", "Every arm against real only",
            "Forest plot", "Dose-response and scarcity", "Detectability")


def _estimand_name(estimand: str) -> str:
    return analysis_plan.ESTIMANDS[estimand].split(" (")[0]


def plan_section(report: Report, compare: dict) -> None:
    plan = compare["plan"]
    report.h(2, SECTIONS[0])
    report.p("Fixed from the configuration before any prediction was read (07_compare/analysis_plan.json).")
    report.bullets(plan["text"])


def primary_section(report: Report, compare: dict) -> None:
    report.h(2, SECTIONS[1])
    if not compare["primary"]:
        report.p("The primary endpoint could not be computed: " + "; ".join(compare["primary_missing"]) + ".")
        return
    estimand = compare["plan"]["decision_estimand"]
    report.bullets([entry["statement"] for entry in compare["primary"]])
    rows = []
    for entry in compare["primary"]:
        for name in ("single_model", "ensemble"):
            d = entry[name]
            rows.append([f"{entry['name']} − {entry['control']}", _estimand_name(name) +
                         (" (decides)" if name == estimand else ""),
                         ci_text((d["estimate"], d["lower"], d["upper"]), signed=True), f"{d['p_value']:.3g}",
                         ci_text(d["arm_b"]), ci_text(d["arm_a"])])
    report.table(["contrast", "estimand", "AUC difference [95% CI]", "p", "synthetic AUC [95% CI]",
                  "oversampled AUC [95% CI]"], rows)
    if len(compare["primary"]) > 1:
        report.p("Holm-adjusted across the generator variants: " + ", ".join(
            f"{e['name']} p = {e['p_holm']:.3g}" for e in compare["primary"]) + ".")


def family_section(report: Report, compare: dict) -> None:
    report.h(2, SECTIONS[2])
    family, estimand = compare["family"], compare["plan"]["decision_estimand"]
    if not family:
        report.p("No retrained arm ran, so there is no comparison with real only.")
        return
    planned = len(compare["plan"]["secondary_family"])
    report.p(f"{len(family)} comparisons, Holm-adjusted together ({_estimand_name(estimand)} decides; "
             f"two-level bootstrap, {compare['bootstrap_samples']} resamples)."
             + (f" The plan named {planned}: arms whose dose was capped at the accepted synthetic count, or "
                "kinds this run did not train, make the difference." if planned != len(family) else ""))
    _family_table(report, compare)
    report.bullets(compare["statements"])


def _family_table(report: Report, compare: dict) -> None:
    estimand = compare["plan"]["decision_estimand"]
    rows = []
    for e in compare["family"]:
        d, other = e[estimand], e["ensemble" if estimand == "single_model" else "single_model"]
        rows.append([e["name"], ci_text((d["estimate"], d["lower"], d["upper"]), signed=True),
                     ci_text((other["estimate"], other["lower"], other["upper"]), signed=True),
                     f"{e['p_value']:.3g}", f"{e['p_holm']:.3g}", "yes" if e["significant"] else "no"])
    other_name = _estimand_name("ensemble" if estimand == "single_model" else "single_model")
    report.table(["arm", f"Δ AUC, {_estimand_name(estimand)} [95% CI]", f"Δ AUC, {other_name} [95% CI]", "p",
                  "Holm p", "significant"], rows)


def forest_section(report: Report, compare: dict) -> None:
    report.h(2, SECTIONS[3])
    path = compare["figures"].get("forest")
    if not path:
        report.p("No arm to plot.")
        return
    report.figure(path, "Every arm's target AUC difference against real only, with the two-level bootstrap 95% "
                        "CI (* significant after Holm)")


def dose_and_scarcity_section(report: Report, compare: dict, fractions: Mapping[str, dict] | None,
                              out_dir: epath.Path) -> None:
    report.h(2, SECTIONS[4])
    path = compare["figures"].get("dose_response")
    if path:
        report.figure(path, "Dose-response: target AUC difference against real only by the number of images added")
    else:
        report.p("One dose per arm kind: no dose-response curve (study.synthetic_counts holds one count).")
    series, ticks = scarcity_series(fractions or {})
    if not series:
        report.p("One target fraction: no scarcity curve (study.target_fractions holds one fraction).")
        return
    figure = plots.plot_difference_curves(
        series, out_dir / "scarcity.png", xlabel="real target-class training images (target fraction)",
        ylabel=f"{compare['target']} AUC difference", xtick_labels=ticks,
        title=f"Scarcity ({_estimand_name(compare['plan']['decision_estimand'])}; two-level bootstrap 95% CI)")
    report.figure(str(figure), "Scarcity: the primary contrast and the synthetic arm's gain over real only, "
                               "against the real target-class training images each fraction keeps")
    _other_fractions(report, compare, fractions)


def _other_fractions(report: Report, compare: dict, fractions: Mapping[str, dict]) -> None:
    """Each other fraction's primary endpoint and its own Holm family: a scarcer fraction is a study of its
    own (its baseline, arms and test comparisons), and where real positives are few a gain has room to show."""
    for fraction, results in fractions.items():
        other = results["07_compare"]
        if float(fraction) == float(compare.get("fraction", 1.0)):
            continue
        positives = other.get("train_target_positives")
        report.h(3, f"Target fraction {float(fraction):g}"
                    + (f" ({positives} real {compare['target']} training images)" if positives is not None else ""))
        report.bullets([entry["statement"] for entry in other["primary"]] or
                       ["The primary endpoint could not be computed: " + "; ".join(other["primary_missing"])])
        if other["family"]:
            report.p(f"Every arm against real only at this fraction: {len(other['family'])} comparisons, "
                     "Holm-adjusted together.")
            _family_table(report, other)


def scarcity_series(fractions: Mapping[str, dict]) -> tuple[dict[str, list[tuple]], dict[float, str]]:
    """Plot series from the results of each target fraction ({fraction: {phase: result}}): per generator
    variant, synthetic − oversampled and synthetic − real only at the primary dose, as (x, estimate, lower,
    upper) with x the real target-class training images; empty with fewer than two fractions."""
    if len(fractions) < 2:
        return {}, {}
    series: dict[str, list[tuple]] = {}
    ticks = {}
    for fraction, results in fractions.items():
        compare = results["07_compare"]
        estimand = compare["plan"]["decision_estimand"]
        x = compare.get("train_target_positives")
        x = float(fraction) if x is None else float(x)
        ticks[x] = f"{x:g} ({float(fraction):g})" if x != float(fraction) else f"{x:g}"
        gains = {e["name"]: e for e in compare["family"]}
        for entry in compare["primary"]:
            suffix = f" ({entry['variant']})" if entry.get("variant") else ""
            for label, source in ((f"synthetic − oversampled{suffix}", entry),
                                  (f"synthetic − real only{suffix}", gains.get(entry["name"]))):
                if source is not None:
                    d = source[estimand]
                    series.setdefault(label, []).append((x, d["estimate"], d["lower"], d["upper"]))
    return series, ticks


def detectability_section(report: Report, privacy: dict) -> None:
    report.h(2, SECTIONS[5])
    sets = privacy.get("detectability")
    if not sets:
        report.p("Detectability was not measured in this run.")
        return
    report.p("Can a classifier tell synthetic images from real ones? AUC 0.5 = indistinguishable.")
    report.table(["set", "real vs synthetic AUC [95% CI]", "real", "synthetic"],
                 [[name, ci_text((d["auc"], d["lower"], d["upper"])), d["n_real"], d["n_synthetic"]]
                  for name, d in sets.items()])


def opening_sections(report: Report, compare: dict, privacy: dict, fractions: Mapping[str, dict] | None,
                     out_dir: epath.Path) -> None:
    """Sections 1-6 in the plan's order."""
    plan_section(report, compare)
    primary_section(report, compare)
    family_section(report, compare)
    forest_section(report, compare)
    dose_and_scarcity_section(report, compare, fractions, out_dir)
    detectability_section(report, privacy)
