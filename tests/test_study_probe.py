"""The study's probe: the quality encoder is a baseline seed the filters did not use."""


from xray_dit.study import probe


def test_quality_encoder_is_a_baseline_seed_the_filters_did_not_use():
    assert probe.quality_encoder_seed(["10", "2", "7"]) == "7"   # the filters' probe takes seed "2"
    assert probe.quality_encoder_seed([3, 1]) == 3
    assert probe.quality_encoder_seed(["0"]) is None
