"""The contrasts of the analysis plan, computed from the arms' prediction files.

An arm of 06_retrain is one (kind, dose, generator) with one trained classifier per classifier seed. The
plan's contrasts are between *groups*: the arms of one kind, dose and generator variant, whose generator
seeds are drawn as a bootstrap factor of their own (one arm is a group by itself). Every contrast runs
`statistics.two_level_bootstrap_difference` on the target-class test probabilities, one row per trained
model, with the classifier seed as the paired factor.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from xray_dit.evaluation import classification, statistics
from xray_dit.study import analysis_plan


@dataclasses.dataclass(frozen=True)
class TargetTestSet:
    """The target class's known test images, as the baseline's predictions list them."""
    image_ids: np.ndarray   # every test image, the order every arm's predictions must follow
    known: np.ndarray       # (images,) bool: the target label is known
    labels: np.ndarray      # (known,) 0/1
    patients: np.ndarray    # (known,)
    all_labels: np.ndarray  # (images, classes), every class
    all_mask: np.ndarray    # (images, classes) bool


@dataclasses.dataclass(frozen=True)
class ArmRows:
    """One arm's trained models: target-class probabilities, one row per model, and its seed levels."""
    test: np.ndarray                    # (models, known test images)
    test_ensemble: np.ndarray           # (test images, classes): every class's mean probability over models
    validation: np.ndarray              # (models, known validation images)
    validation_labels: np.ndarray       # (known validation images,)
    seeds: list[str]                    # classifier seed of each row
    generators: list[str]               # generator of each row ("" for arms without one)


@dataclasses.dataclass(frozen=True)
class Group:
    """Arms of one kind, dose and generator variant, compared as one (generator seeds as a factor)."""
    name: str
    kind: str
    count: int
    variant: str | None
    arms: tuple[str, ...]
    primary: bool


def read_runs(runs: Mapping[str, Mapping], split: str) -> tuple[list[str], list[dict]]:
    """(classifier seeds, predictions) of an arm's runs on `split` (`classification.read_predictions`)."""
    seeds = list(runs)
    return seeds, [classification.read_predictions(epath.Path(runs[s]["workdir"]) / f"predictions_{split}.csv")
                   for s in seeds]


def target_test_set(baseline_test: Sequence[dict], target_index: int) -> TargetTestSet:
    first = baseline_test[0]
    known = first["mask"][:, target_index]
    return TargetTestSet(first["image_id"], known, first["labels"][known, target_index].astype(np.int8),
                         first["patient_id"][known], first["labels"], first["mask"])


def arm_rows(runs: Mapping[str, Mapping], tests: TargetTestSet, target_index: int, generator: str = "",
             arm: str = "") -> ArmRows:
    """An arm's target-class rows on the known test images (and validation), checked against `tests`."""
    seeds, test = read_runs(runs, "test")
    _, validation = read_runs(runs, "validation")
    for preds in test:
        if not np.array_equal(preds["image_id"], tests.image_ids):
            raise ValueError(f"arm {arm!r} was tested on other images than the baseline")
    for preds in validation[1:]:
        if not np.array_equal(preds["image_id"], validation[0]["image_id"]):
            raise ValueError(f"validation predictions of arm {arm!r} list different images for different seeds")
    val_known = validation[0]["mask"][:, target_index]
    return ArmRows(test=np.stack([p["probs"][tests.known, target_index] for p in test]).astype(np.float64),
                   test_ensemble=np.mean([p["probs"] for p in test], axis=0),
                   validation=np.stack([p["probs"][val_known, target_index] for p in validation]).astype(np.float64),
                   validation_labels=validation[0]["labels"][val_known, target_index].astype(np.int8),
                   seeds=[str(s) for s in seeds], generators=[generator] * len(seeds))


# ---- groups -------------------------------------------------------------------------------------------
def generator_of(entry: Mapping[str, Any]) -> str:
    """An arm's generator as a bootstrap level ("" when the arm mixes in no generated images)."""
    for key in ("generator", "generator_seed"):
        if entry.get(key) is not None:
            return str(entry[key])
    return "generated" if entry.get("kind") in analysis_plan.GENERATED_KINDS else ""


def variant_of(generator: str, variants: Mapping[str, str]) -> str | None:
    """A generator's variant: from 04_generate's entries when known, else its name without `_seed<k>`."""
    if not generator or generator == "generated":
        return None
    return variants.get(generator) or re.sub(r"_seed\d+$", "", generator)


def fallback_primary_count(study_config: Any, arms: Mapping[str, Mapping]) -> int:
    """The primary dose for arms that do not say whether they are primary: the configured dose, capped as
    the doses were (at the largest synthetic dose that ran)."""
    counts = [int(e["count"]) for e in arms.values() if e.get("kind") == "synthetic"]
    return min(analysis_plan.primary_dose(study_config), max(counts, default=0))


def group_arms(arms: Mapping[str, Mapping], variants: Mapping[str, str], primary_count: int) -> list[Group]:
    """The comparison groups of 06_retrain's arms, in the order the arms come; `variants`: generator → variant."""
    members: dict[tuple, list[str]] = {}
    for name, entry in arms.items():
        key = (entry["kind"], int(entry["count"]), variant_of(generator_of(entry), variants))
        members.setdefault(key, []).append(name)
    groups = []
    for (kind, count, variant), names in members.items():
        first = arms[names[0]]
        primary = bool(first["primary"]) if "primary" in first else count == primary_count
        groups.append(Group(_group_name(names, arms, variant), kind, count, variant, tuple(names), primary))
    return groups


def _group_name(names: Sequence[str], arms: Mapping[str, Mapping], variant: str | None) -> str:
    if len(names) == 1:
        return names[0]
    generator = generator_of(arms[names[0]])
    pooled = f"({variant + ', ' if variant else ''}{len(names)} generator seeds)"
    if f"({generator})" in names[0]:
        return names[0].replace(f"({generator})", pooled)
    return f"{names[0]} {pooled}"


def group_rows(group: Group, rows: Mapping[str, ArmRows]) -> tuple[np.ndarray, dict[str, list[str]]]:
    """The group's test rows (models, images) and seed factors: the classifier seed, and the generator when
    the group holds several."""
    parts = [rows[arm] for arm in group.arms]
    factors = {"seed": [s for p in parts for s in p.seeds]}
    if len(parts) > 1:
        factors["generator"] = [g for p in parts for g in p.generators]
    return np.concatenate([p.test for p in parts]), factors


# ---- contrasts ----------------------------------------------------------------------------------------
def contrast(tests: TargetTestSet, a: tuple[np.ndarray, dict], b: tuple[np.ndarray, dict], n_boot: int,
             alpha: float, metric: str = "auc") -> statistics.ArmComparison:
    """B − A with the two-level bootstrap; a and b as `group_rows` gives them."""
    return statistics.two_level_bootstrap_difference(tests.labels, a[0], b[0], tests.patients, seeds_a=a[1],
                                                     seeds_b=b[1], metric=metric, n_boot=n_boot, seed=0, alpha=alpha)


def difference_dict(d: statistics.BootstrapDifference) -> dict:
    return {"estimate": d.estimate, "lower": d.lower, "upper": d.upper, "p_value": d.p_value,
            "arm_a": [d.arm_a.estimate, d.arm_a.lower, d.arm_a.upper],
            "arm_b": [d.arm_b.estimate, d.arm_b.lower, d.arm_b.upper]}


def _entry(comparison: statistics.ArmComparison, estimand: str) -> dict:
    both = {name: difference_dict(d) for name, d in comparison._asdict().items()}
    return {**both, "p_value": both[estimand]["p_value"]}


def _adjust(entries: list[dict], estimand: str, alpha: float, arm_a: str | None, metric: str) -> None:
    """Holm over `entries` (in place): p_holm, significant, statement."""
    if not entries:
        return
    holm = statistics.holm({i: e["p_value"] for i, e in enumerate(entries)}, alpha)
    for i, e in enumerate(entries):
        e["p_holm"] = holm.adjusted_p[i]
        e["significant"], _ = analysis_plan.verdict(e[estimand]["estimate"], e["p_holm"], alpha)
        e["statement"] = analysis_plan.statement(e["name"], arm_a or e["control"], metric, e[estimand], e["p_holm"],
                                                 len(entries), estimand, alpha)


def primary_contrasts(groups: Sequence[Group], rows: Mapping[str, ArmRows], tests: TargetTestSet, *, n_boot: int,
                      alpha: float, estimand: str, metric: str) -> tuple[list[dict], list[str]]:
    """Synthetic − oversampled at the primary dose, one per generator variant (Holm across them), and the
    reasons a planned primary contrast could not be computed."""
    primary = [g for g in groups if g.primary]
    controls = [g for g in primary if g.kind == "oversampled"]
    synthetic = [g for g in primary if g.kind == "synthetic"]
    missing = []
    if not synthetic:
        missing.append("no synthetic arm at the primary dose ran")
    if not controls:
        missing.append("no oversampled-real arm at the primary dose ran")
    if missing:
        return [], missing
    control = controls[0]
    entries = []
    for group in synthetic:
        comparison = contrast(tests, group_rows(control, rows), group_rows(group, rows), n_boot, alpha)
        entries.append({"name": group.name, "control": control.name, "count": group.count, "variant": group.variant,
                        "arms": list(group.arms), **_entry(comparison, estimand)})
    _adjust(entries, estimand, alpha, None, metric)
    return entries, []


def baseline_family(groups: Sequence[Group], rows: Mapping[str, ArmRows], baseline: str, tests: TargetTestSet, *,
                    n_boot: int, alpha: float, estimand: str, metric: str
                    ) -> tuple[list[dict], dict[str, dict[int, statistics.ArmComparison]]]:
    """Every group against the baseline, Holm over the family; and the comparisons by family label and dose
    (`statistics.dose_response_rows`' input)."""
    base = (rows[baseline].test, {"seed": rows[baseline].seeds})
    entries, by_family = [], {}
    for group in groups:
        comparison = contrast(tests, base, group_rows(group, rows), n_boot, alpha)
        entries.append({"name": group.name, "kind": group.kind, "count": group.count, "variant": group.variant,
                        "arms": list(group.arms), "primary_dose": group.primary, **_entry(comparison, estimand)})
        family = group.kind + (f" ({group.variant})" if group.variant and group.kind in
                               analysis_plan.GENERATED_KINDS else "")
        by_family.setdefault(family, {})[group.count] = comparison
    _adjust(entries, estimand, alpha, baseline, metric)
    return entries, by_family


# ---- one arm's seed ensemble --------------------------------------------------------------------------
def ensemble_metrics(tests: TargetTestSet, rows: ArmRows, *, n_boot: int, alpha: float,
                     specificity: float = analysis_plan.SPECIFICITY) -> dict:
    """The seed ensemble's AUPRC and its sensitivity at `specificity` (threshold from validation), each with
    a patient-bootstrap percentile interval on the same resamples."""
    scores = rows.test.mean(axis=0)
    y = tests.labels
    val_scores, val_y = rows.validation.mean(axis=0), rows.validation_labels
    auprc_reps, sens_reps = [], []
    threshold = None
    if np.unique(val_y).size == 2:
        threshold = classification.threshold_at_specificity(val_y, val_scores, specificity)
    called = (scores >= threshold) if threshold is not None else None
    for weights in classification.patient_bootstrap(tests.patients, n_boot, seed=0):
        auprc_reps.append(statistics.weighted_ranking_metric(y, scores, weights, "auprc"))
        if called is not None:
            positives = (weights * y).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                sens_reps.append(np.where(positives > 0, (weights * (y * called)).sum(axis=1) / positives, np.nan))
    out = {"auprc": _with_interval(classification.auprc(y, scores), np.concatenate(auprc_reps), alpha)}
    if threshold is None:
        out["sensitivity_at_specificity"] = {"specificity": specificity, "threshold": None,
                                             "threshold_source": "none: the validation split holds only one class"}
        return out
    out["sensitivity_at_specificity"] = {
        "specificity": specificity, "threshold": threshold,
        "threshold_source": f"validation, seed ensemble (specificity ≥ {specificity:g} there)",
        "sensitivity": _with_interval(classification.sensitivity_at_threshold(y, scores, threshold),
                                      np.concatenate(sens_reps), alpha),
        "test_specificity": float(np.mean(scores[y == 0] < threshold))}
    return out


def _with_interval(estimate: float, replicates: np.ndarray, alpha: float) -> list[float]:
    valid = replicates[~np.isnan(replicates)]
    if valid.size == 0:
        return [float(estimate), float("nan"), float("nan")]
    lower, upper = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return [float(estimate), float(lower), float(upper)]
