"""The study's pre-specified analysis plan and its decision rule, made from the config alone.

07_compare writes the plan before it reads a single prediction, and the report prints it first, so what
counts as the answer is fixed before any number exists:

  primary      the target-class test AUC of "real + N synthetic" minus "real + N oversampled real" at
               N = study.primary_count (0: the largest of study.synthetic_counts), paired by classifier seed,
               with a two-level bootstrap (test patients x seeds; generator seeds as a factor of their own when
               several); one contrast per generator variant, Holm-adjusted across variants when more than one.
  secondary    every arm against the real-only baseline (synthetic arms pooled over their generator seeds),
               Holm-adjusted over that family.
  descriptive  per arm: AUC, AUPRC and sensitivity at 90 % specificity (threshold from validation).

Both estimands of the two-level bootstrap are reported (seed ensemble; mean single model); the verdict
uses `study.primary_estimand` alone. A difference is statistically significant when its Holm-adjusted
bootstrap p-value is at most ALPHA, and only then.
"""

from __future__ import annotations

from typing import Any

ALPHA = 0.05
SPECIFICITY = 0.90
ESTIMANDS = {"single_model": "mean single model (the mean over seeds of each seed model's AUC)",
             "ensemble": "seed ensemble (the AUC of the mean probability over seeds)"}
GENERATED_KINDS = ("synthetic", "synthetic_mitigated")
_KIND_TEXT = {"synthetic": "synthetic", "oversampled": "oversampled real", "phantom_positive": "phantom positives",
              "vae_roundtrip": "VAE round-trip real", "synthetic_mitigated": "synthetic, real round-tripped"}


def primary_dose(study_config: Any) -> int:
    """N of the primary contrast as configured: study.primary_count, or the largest study.synthetic_counts."""
    return int(study_config.primary_count) or max((int(c) for c in study_config.synthetic_counts), default=0)


def decision_estimand(study_config: Any) -> str:
    estimand = str(study_config.get("primary_estimand", "single_model"))
    if estimand not in ESTIMANDS:
        raise ValueError(f"study.primary_estimand={estimand!r} must be one of {list(ESTIMANDS)}")
    return estimand


def generator_variants(study_config: Any) -> list[str | None]:
    """The configured generator variants; [None] for a study with one unnamed generator."""
    return [str(v) for v in study_config.get("generators", ())] or [None]


def planned_family(config: Any) -> list[dict]:
    """The secondary family as the config plans it: kind, dose, generator variant of each arm against real only.

    Doses run here may end lower (capped at the accepted synthetic count); 07_compare tests the arms that ran.
    """
    study = config.study
    doses = sorted({int(c) for c in study.synthetic_counts} - {0})
    primary = primary_dose(study)
    members = []
    for kind in study.arms:
        if kind == "phantom_positive" and config.data.name != "cxr_phantom":
            continue
        for count in (doses if kind in study.swept_arms else [primary] if primary else []):
            for variant in generator_variants(study) if kind in GENERATED_KINDS else [None]:
                label = f"real + {count} {_KIND_TEXT.get(kind, kind)}" + (f" ({variant})" if variant else "")
                members.append({"kind": str(kind), "count": count, "variant": variant, "name": label})
    return members


def smallest_adjusted_p(bootstrap_samples: int, members: int) -> float:
    """The smallest Holm-adjusted p a family of `members` can reach with this many bootstrap samples."""
    return min(1.0, members * 2.0 / (int(bootstrap_samples) + 1))


def analysis_plan(config: Any) -> dict:
    """The plan of phase 07 as data and as text (`text`: one sentence per item), from `config` alone."""
    study, target = config.study, config.data.target_class
    estimand, count = decision_estimand(study), primary_dose(study)
    variants = generator_variants(study)
    generator_seeds = [int(s) for s in study.get("generator_seeds", ())]
    n_boot = int(study.bootstrap_samples)
    family = planned_family(config)
    primaries = [f"real + {count} synthetic" + (f" ({v})" if v else "") + f" − real + {count} oversampled real"
                 for v in variants]
    pooled = (f"generator seeds {generator_seeds} drawn as a third factor" if len(generator_seeds) > 1
              else "one generator seed")
    text = [
        f"**Primary endpoint**: {target} test AUC of " + "; ".join(f"'{p}'" for p in primaries)
        + f" (N = {count}; study.primary_count, capped at the accepted synthetic count). Paired: the same "
        f"classifier seeds {list(study.seeds)} in both arms. Two-level bootstrap ({n_boot} resamples): test patients "
        f"(every image of a drawn patient) × classifier seeds; {pooled}."
        + (f" Holm-adjusted across the {len(variants)} generator variants." if len(variants) > 1 else ""),
        f"**Estimands**: {ESTIMANDS['ensemble']}; {ESTIMANDS['single_model']}. Both are reported; the verdict "
        f"uses the {ESTIMANDS[estimand].split(' (')[0]} (study.primary_estimand).",
        f"**Decision rule**: a difference is statistically significant when its Holm-adjusted two-sided bootstrap "
        f"p-value is ≤ α = {ALPHA}; otherwise the report says 'no statistically significant difference'. "
        "Confidence intervals are 95 % percentile intervals, not adjusted.",
        f"**Secondary family** ({len(family)} planned): every arm against 'real only' on the same rule and "
        "bootstrap, synthetic arms pooled over their generator seeds, Holm-adjusted over the family: "
        + "; ".join(m["name"] for m in family) + ".",
        f"**Per arm** (seed ensemble, patient-bootstrap 95 % CI): AUC, AUPRC, and sensitivity at "
        f"{100 * SPECIFICITY:.0f} % specificity with the threshold chosen on the validation split; ROC curves "
        "and confusion matrices at Youden's threshold, also from validation. DeLong's test is shown as a "
        "secondary check and decides nothing.",
    ]
    warnings = [f"With {n_boot} bootstrap resamples and {m} comparisons the smallest reachable Holm-adjusted "
                f"p is {smallest_adjusted_p(n_boot, m):.3g} > α: the {what} cannot show a significant difference; "
                "raise study.bootstrap_samples." for what, m in (("primary endpoint", len(variants)),
                                                                 ("secondary family", len(family)))
                if m and smallest_adjusted_p(n_boot, m) > ALPHA]
    return {"alpha": ALPHA, "target": target, "primary_count": count, "primary_contrasts": primaries,
            "decision_estimand": estimand, "estimands": list(ESTIMANDS), "classifier_seeds": list(study.seeds),
            "generator_variants": variants, "generator_seeds": generator_seeds, "bootstrap_samples": n_boot,
            "specificity": SPECIFICITY, "secondary_family": family, "warnings": warnings, "text": text + warnings}


def verdict(estimate: float, adjusted_p: float, alpha: float = ALPHA) -> tuple[bool, str]:
    """(significant, phrase) by the pre-specified rule: significant exactly when adjusted_p <= alpha."""
    if not adjusted_p <= alpha:   # NaN is never significant
        return False, "no statistically significant difference"
    direction = "improvement" if estimate > 0 else "decrease" if estimate < 0 else "difference"
    return True, f"a statistically significant {direction}"


def statement(arm_b: str, arm_a: str, metric: str, difference: dict, adjusted_p: float, family_size: int,
              estimand: str, alpha: float = ALPHA) -> str:
    """One sentence: B − A with its CI and p-values, and the verdict of `verdict`.

    `difference`: {"estimate", "lower", "upper", "p_value"} of the decision estimand."""
    _, phrase = verdict(difference["estimate"], adjusted_p, alpha)
    p_text = f"p = {difference['p_value']:.3g}"
    if family_size > 1:
        p_text += f", Holm-adjusted over {family_size} comparisons p = {adjusted_p:.3g}"
    return (f"'{arm_b}' vs '{arm_a}': {metric} difference {difference['estimate']:+.3f} (95% CI "
            f"[{difference['lower']:+.3f}, {difference['upper']:+.3f}], {ESTIMANDS[estimand].split(' (')[0]}; "
            f"{p_text}) — {phrase} at α = {alpha}.")
