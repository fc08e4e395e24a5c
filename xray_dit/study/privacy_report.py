"""The report's privacy and quality section, from 08_privacy's and 05_filter's results.

`report_section` returns blocks in the report builder's form — ("h", level, text), ("p", text),
("ul", [items]), ("table", header, rows of text cells), ("img", path, caption) — led by one sentence a
clinician can read: what was tested, against which adversary, with what result and interval.
"""

from __future__ import annotations

import numpy as np
from etils import epath

from xray_dit.study.privacy import ACCEPTED, ALL, DISTANCE_ATTACK


def ordinal(value: float) -> str:
    """A percentile's ordinal: 1 → "1st", 5 → "5th", 22 → "22nd", 2.5 → "2.5th"."""
    if value != int(value):
        return f"{value:g}th"
    number = int(value)
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _pct(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.0f} %"


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _interval(estimate, lower, upper, digits: int = 2) -> str:
    return f"{_num(estimate, digits)} [{_num(lower, digits)}, {_num(upper, digits)}]"


def _released_attack(priv: dict) -> tuple[str, dict] | None:
    """The black-box attack on the set that would be shared: the accepted images, else all generated."""
    attacks = priv.get("membership_inference", {}).get(DISTANCE_ATTACK, {})
    for name in (ACCEPTED, ALL):
        if name in attacks:
            return name, attacks[name]
    return None


def headline(priv: dict, filt: dict, config) -> str:
    """One sentence: what was tested, against which adversary, with what result and 95 % interval."""
    target = config.data.target_class
    memorisation = priv["memorisation"]
    control = priv.get("privacy_controls", {}).get("memorisation_detector")
    copies = (f"a copy detector that caught {_pct(control['detected'])} (95 % CI {_pct(control['detected_ci'][0])}–"
              f"{_pct(control['detected_ci'][1])}) of near-copies of training images planted as a test flagged "
              if control else "a copy detector flagged ")
    copies += f"{memorisation['flagged']} of the {memorisation['generated']} generated images as copies"
    released = _released_attack(priv)
    if released is None:
        return f"We checked whether the synthetic {target} images copy training patients: {copies}."
    name, mia = released
    shared = priv["sets"].get(name, 0)
    verdict = ("better than chance" if mia["lower"] > 0.5 else
               "worse than chance" if mia["upper"] < 0.5 else "no better than chance")
    return (f"We tested whether someone who holds a patient's chest X-ray could tell, by comparing it with the "
            f"{shared} synthetic {target} images that would be shared ({name}), whether that patient was among "
            f"the {mia['member_patients']} patients whose images trained the generator: they did {verdict} "
            f"(membership AUC {_num(mia['auc'], 2)}, 95 % CI {_num(mia['lower'], 2)}–{_num(mia['upper'], 2)}, "
            f"where 0.5 is a coin toss and 1 identifies every patient), and {copies}.")


def _calibration_rows(filt: dict) -> list[list[str]]:
    rows = []
    for space, entry in filt["calibration"].items():
        patients = f" of {entry['heldout_patients']} patients" if entry.get("heldout_patients") else ""
        threshold = filt["thresholds"][f"privacy_{space}"]
        rows.append([space, entry["source"], f"{entry['heldout_count']}{patients}", str(entry["reference_count"]),
                     f"{entry['percentile']:g}", _num(threshold, 4), entry["distance"]])
    return rows


def _controls_rows(controls: dict) -> list[list[str]]:
    rows = []
    for name, label in (("memorisation_detector", "pixel detector (memorisation rate)"),
                        ("privacy_filter", "privacy filter (pixel or feature)")):
        entry = controls.get(name)
        if entry:
            rows.append([label, f"{_pct(entry['detected'])} [{_pct(entry['detected_ci'][0])}, "
                                f"{_pct(entry['detected_ci'][1])}] of {entry['copies']}",
                         f"{_pct(entry['false_positive'])} [{_pct(entry['false_positive_ci'][0])}, "
                         f"{_pct(entry['false_positive_ci'][1])}] of {entry['fresh']}"])
    return rows


def _mia_rows(mia: dict) -> list[list[str]]:
    return [[attack, name, _interval(m["auc"], m["lower"], m["upper"]), f"{m['p_value']:.3g}",
             f"{m['members']} ({m['member_patients']})", f"{m['non_members']} ({m['nonmember_patients']})"]
            for attack, sets in mia.items() for name, m in sets.items()]


def _quality_blocks(priv: dict) -> list[tuple]:
    q = priv["quality"]
    blocks = [("h", 2, "Quality of the synthetic set (independent encoder, equal n, vs real test images of the "
                       "class)"),
              ("p", f"Features: {q['encoder']} — {q['encoder_note']}. Reference: {q['reference']}. " + (
                  f"Every row at n = {q['n']} (mean ± sd over {q['repeats']} redraws), because the Fréchet distance "
                  "grows as n shrinks; lower is closer to the real images, and the two real rows frame the scale."
                  if q.get("rows") else f"Not computed: {q.get('reason', '')}.") + (
                  " Left out (too few images): " + ", ".join(f"{k} ({v})" for k, v in q["left_out"].items()) + "."
                  if q.get("left_out") else ""))]
    if q.get("rows"):
        blocks.append(("table", ["set", "kind", "n", "Fréchet distance (mean ± sd)", "KID (mean ± sd)"],
                       [[name, r["kind"], str(r["n"]), f"{r['frechet_distance']['mean']:.3f} ± "
                         f"{r['frechet_distance']['sd']:.3f}", f"{r['kid']['mean']:.4f} ± {r['kid']['sd']:.4f}"]
                        for name, r in q["rows"].items()]))
    detect = priv.get("detectability", {})
    if detect:
        blocks.append(("p", "Detectability: the held-out AUC of a cross-validated logistic regression telling "
                            "real target-class validation and test images from synthetic ones (0.5 = "
                            "indistinguishable, 1 = every synthetic image recognisable)."))
        blocks.append(("table", ["set", "real / synthetic", "AUC on pixels [95% CI]",
                                 "AUC on encoder features [95% CI]"],
                       [[name, f"{d['n_real']} / {d['n_synthetic']}", _interval(d["auc"], d["lower"], d["upper"]),
                         _interval(d["encoder"]["auc"], d["encoder"]["lower"], d["encoder"]["upper"])
                         if "auc" in d["encoder"] else "n/a"] for name, d in detect.items()]))
    blocks.append(("p", "MS-SSIM diversity (1 − mean MS-SSIM of random pairs; higher = more diverse): " + ", ".join(
        f"{k} {_num(v)}" for k, v in priv["ms_ssim_diversity"].items()) + "."))
    return blocks


def _figure(path, caption: str) -> list[tuple]:
    return [("img", str(path), caption)] if path and epath.Path(path).exists() else []


def report_section(priv: dict, filt: dict, config) -> list[tuple]:
    """The privacy and quality section: the headline sentence, then tables and figures."""
    target = config.data.target_class
    controls = priv.get("privacy_controls", {})
    dup = filt["duplicate_reference"]
    blocks = [("h", 2, "Privacy"), ("p", "**" + headline(priv, filt, config) + "**"),
              ("p", f"Thresholds are class-matched: distances of held-out {target} images to the {target} training "
                    f"images, at the {ordinal(filt['calibration']['pixel']['percentile'])} percentile. "
                    + _sentence(filt["calibration"]["pixel"]["description"])),
              ("table", ["space", "held-out source", "held-out images", "reference images", "percentile", "threshold",
                         "distance"], _calibration_rows(filt))]
    real_dup = dup.get("real_pair_fraction_above")
    blocks.append(("p", f"Duplicates: pixel correlation above {dup['threshold']:.4f} ({dup['source']}); "
                        + (f"{_pct(real_dup)} of {dup['real_pairs']} pairs of real {target} training images of "
                           "different patients exceed it" if real_dup is not None else "no real pairs to compare")
                        + "; among generated pairs: " + ", ".join(
                            f"{name} {_pct(g['synthetic_pair_fraction_above'])}"
                            for name, g in filt["generators"].items()) + "."))
    if controls:
        blocks.append(("p", f"Positive controls: {controls['copies']} near-copies of {target} training images "
                            f"(shifted by up to {controls['perturbation']['max_shift_px']} px, contrast ±10 %, noise) "
                            f"must be flagged; {controls['fresh']} {controls['fresh_source']} must not "
                            "(Clopper-Pearson 95 % intervals)."
                            + (f" {controls['reason']}." if "reason" in controls else "")))
        rows = _controls_rows(controls)
        if rows:
            blocks.append(("table", ["detector", "near-copies flagged [95% CI]", "new patients flagged [95% CI]"],
                           rows))
    mia = priv.get("membership_inference", {})
    if mia:
        blocks.append(("p", f"Membership inference: members are the {priv['members']} {target} training images, "
                            f"non-members the {priv['non_members']} {target} validation and test images (counts of "
                            "patients in brackets); AUC with a patient-level bootstrap 95 % CI and a permutation "
                            "p-value against 0.5."))
        blocks.append(("table", ["attack", "set", "AUC [95% CI]", "p", "members", "non-members"], _mia_rows(mia)))
    memorisation = priv["memorisation"]
    blocks.append(("table", ["measure", "value"], [
        ["memorisation rate (all generated, before filtering)", f"{100 * memorisation['rate']:.2f} %"]] + [
        [f"memorisation rate, {name}", f"{100 * rate:.2f} %"]
        for name, rate in memorisation["per_generator"].items() if len(memorisation["per_generator"]) > 1] + [
        ["median distance synthetic → train", _num(priv["synthetic_to_train_median"], 4)],
        ["median distance held-out → train (calibration)", _num(priv["heldout_to_train_median"], 4)]]))
    blocks += _figure(priv["figures"]["histogram"], "Nearest-training-image distances with the privacy threshold")
    blocks += _figure(priv["figures"]["closest_pairs"], "The closest synthetic / training pairs")
    blocks += _quality_blocks(priv)
    ctr = priv.get("ctr_oracle")
    if ctr and ctr.get("figure"):
        blocks += _figure(ctr["figure"], "Cardiothoracic ratio of real and synthetic target-class images (oracle)")
    return blocks
