"""Phase 08's quality part on constructed features: the equal-n table and its reference rows."""


import numpy as np

from xray_dit.study import quality


def test_equal_n_table_draws_every_row_at_one_n_and_leaves_small_sets_out():
    rng = np.random.default_rng(0)
    reference, real_other = rng.normal(size=(40, 3)), rng.normal(size=(30, 3))
    synthetic = {"all generated": rng.normal(size=(25, 3)) + 1.0, "accepted": rng.normal(size=(4, 3))}
    table = quality.equal_n_table(synthetic, reference, real_other, rng.normal(size=(50, 3)) + 5.0)
    assert table["left_out"] == {"accepted": 4} and table["n"] == 25
    rows = table["rows"]
    assert list(rows) == ["all generated", quality.synthesis.AS_GOOD_AS_REAL, quality.synthesis.WRONG_CLASS]
    assert {r["n"] for r in rows.values()} == {25}
    fd = {name: r["frechet_distance"]["mean"] for name, r in rows.items()}
    assert fd[quality.synthesis.AS_GOOD_AS_REAL] < fd["all generated"] < fd[quality.synthesis.WRONG_CLASS]
    assert quality.equal_n_table({"accepted": rng.normal(size=(4, 3))}, reference, real_other, real_other)["rows"] == {}
