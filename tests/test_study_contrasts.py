"""study/contrasts.py on hand-made entries: the verdict of a family is decided by its Holm-adjusted p."""

import pytest

from xray_dit.study import contrasts


def _entry(name: str, estimate: float, p: float) -> dict:
    difference = {"estimate": estimate, "lower": estimate - 0.02, "upper": estimate + 0.02, "p_value": p}
    return {"name": name, "single_model": difference, "ensemble": dict(difference, p_value=1.0), "p_value": p}


def test_a_family_is_judged_on_holm_adjusted_p_values_not_on_each_raw_p():
    # Raw p-values all at or below alpha = 0.05; Holm by hand (m = 3, sorted 0.01, 0.03, 0.04):
    #   0.01 * 3 = 0.03;  max(0.03, 0.03 * 2 = 0.06) = 0.06;  max(0.06, 0.04 * 1 = 0.04) = 0.06.
    # Only the smallest survives. Plain p would call all three significant; Bonferroni would give
    # 0.03, 0.09, 0.12; a Holm without the running maximum would give 0.04 to the largest p.
    entries = [_entry("B1", 0.05, 0.01), _entry("B2", 0.04, 0.04), _entry("B3", -0.03, 0.03)]
    contrasts._adjust(entries, "single_model", 0.05, "A", "AUC")
    assert [e["p_holm"] for e in entries] == pytest.approx([0.03, 0.06, 0.06])
    assert [e["significant"] for e in entries] == [True, False, False]
    assert "a statistically significant improvement" in entries[0]["statement"]
    for e in entries[1:]:
        assert "no statistically significant difference" in e["statement"]
        assert "a statistically significant" not in e["statement"]
        assert e["statement"].startswith(f"'{e['name']}' vs 'A'") and "over 3 comparisons p = 0.06" in e["statement"]
