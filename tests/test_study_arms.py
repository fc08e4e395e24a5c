"""The study's arms, data side: the positive-control phantom folder, VAE round-trip folders and store, the plan."""

import csv
import io

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import base
from xray_dit.data import phantom, roundtrip, synthetic
from xray_dit.evaluation import ctr_oracle
from xray_dit.study import arms

LABELS = ("Cardiomegaly", "Effusion", "Nodule")
# A cohort where the finding is common keeps the test's cohort small; the drawing is the same at any prevalence.
SPEC = phantom.PhantomSpec(cardiomegaly_prevalence=0.3, effusion_prevalence=0.3)


def _manifest(folder):
    with open(folder / "manifest.csv") as f:
        return list(csv.DictReader(f))


def _png(folder, name):
    return np.asarray(Image.open(folder / name))


def test_phantom_positives_are_fresh_truthfully_labelled_enlarged_hearts(tmp_path):
    arms.write_phantom_positives(tmp_path, count=12, size=64, target_class="Cardiomegaly", labels=LABELS, seed=0,
                                 spec=SPEC)
    rows = _manifest(tmp_path)
    assert len(rows) == 12 and len(synthetic.SyntheticSource(tmp_path, LABELS)) == 12
    truth = {image.image_id: image for image in arms.phantom_positive_cohort(12, "Cardiomegaly", 0, SPEC)}
    for row in rows:
        image = truth[row["image_id"]]
        assert row["label"] == "|".join(n for n, v in zip(phantom.LABELS, image.true_labels) if v and n in LABELS)
        assert row["label"].startswith("Cardiomegaly") and row["patient_id"] == image.patient_id
    assert any("Effusion" in row["label"] for row in rows), "other true findings are named too"
    ctrs = [ctr_oracle.measure_ctr(_png(tmp_path, row["file"])) for row in rows]
    assert sum(c > 0.5 for c in ctrs) >= 10, ctrs

    ids = [row["image_id"] for row in rows]
    dataset = phantom.make_cohort(600, seed=0, spec=SPEC)
    assert len(set(ids)) == len(ids)
    assert not set(ids) & {i.image_id for i in dataset}
    assert not {row["patient_id"] for row in rows} & {i.patient_id for i in dataset}


def test_phantom_positive_cohort_conditions_on_any_finding_and_refuses_unknown_ones():
    effusions = arms.phantom_positive_cohort(5, "Effusion", seed=3, spec=SPEC)
    assert len(effusions) == 5 and all(image.true_labels[1] for image in effusions)
    assert {i.image_id for i in effusions} != {i.image_id for i in arms.phantom_positive_cohort(5, "Effusion", 4, SPEC)}
    with pytest.raises(ValueError, match="no finding 'Pneumonia'"):
        arms.phantom_positive_cohort(5, "Pneumonia", seed=0)
    with pytest.raises(ValueError, match="prevalence 0"):
        arms.phantom_positive_cohort(5, "Nodule", seed=0, spec=phantom.PhantomSpec(nodule_prevalence=0.0))


def _blur(images):
    """A stand-in for the VAE: a 3x3 box blur of (B, H, W, 1), recording the batch shapes it saw."""
    _blur.shapes.append(images.shape)
    padded = np.pad(images[..., 0], ((0, 0), (1, 1), (1, 1)), mode="edge")
    out = sum(padded[:, dy:dy + images.shape[1], dx:dx + images.shape[2]] for dy in range(3) for dx in range(3))
    return (out / 9.0)[..., None]


def test_vae_roundtrip_folder_holds_the_round_trips_with_their_real_labels(tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, (10, 16, 16)).astype(np.float32)
    labels = np.zeros((10, 3), np.float32)
    labels[:, 0] = 1
    labels[3, 1] = 1
    _blur.shapes = []
    arms.write_vae_roundtrip(tmp_path, images, labels, [f"img{i}" for i in range(10)], _blur, label_names=LABELS,
                             batch_size=4)
    assert set(_blur.shapes) == {(4, 16, 16, 1)}   # the last batch is padded: one shape, one compilation
    rows = _manifest(tmp_path)
    assert [row["source_id"] for row in rows] == [f"img{i}" for i in range(10)]
    assert rows[3]["label"] == "Cardiomegaly|Effusion" and {r["label"] for r in rows[4:]} == {"Cardiomegaly"}
    expected = synthetic.to_uint8(_blur(images[..., None]))
    for row, pixels in zip(rows, expected):
        np.testing.assert_array_equal(_png(tmp_path, row["file"]), pixels)
    np.testing.assert_array_equal(synthetic.SyntheticSource(tmp_path, LABELS).labels, labels)
    with pytest.raises(ValueError, match="must match"):
        arms.write_vae_roundtrip(tmp_path, images, labels[:3], ["a"] * 10, _blur, label_names=LABELS, batch_size=4)


def test_roundtrip_store_is_found_by_image_id(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 16, 16), dtype=np.uint8)
    ids = ["b", "a", "e", "c", "d"]
    _blur.shapes = []
    arms.write_roundtrip_store(tmp_path, ids, images, _blur, batch_size=2)
    expected = synthetic.to_uint8(_blur(images[..., None].astype(np.float32) / 127.5 - 1))
    source = roundtrip.RoundtripSource(tmp_path, ["a", "c"])
    for position, image_id in enumerate(["a", "c"]):
        with Image.open(io.BytesIO(source[position]["image"])) as png:
            np.testing.assert_array_equal(np.asarray(png), expected[ids.index(image_id)])
    with pytest.raises(ValueError, match="ids repeat"):
        arms.write_roundtrip_store(tmp_path / "again", ["a", "a"], images[:2], _blur)


class _FakeVae:
    """Stands in for AutoencoderKL.apply: the posterior mean's decode is 2x, a posterior sample would be noise."""

    def apply(self, variables, images, *, sample_posterior=True):
        scale = variables["params"]["scale"]
        decoded = images * scale if not sample_posterior else images + np.random.normal(size=images.shape)
        return decoded, images, jnp.zeros_like(images)


def test_vae_roundtrip_fn_decodes_the_posterior_mean():
    images = np.random.default_rng(2).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    out = arms.vae_roundtrip_fn(_FakeVae(), {"scale": jnp.float32(2.0)})(images)
    assert isinstance(out, np.ndarray) and out.shape == images.shape
    np.testing.assert_allclose(out, 2 * images, rtol=1e-6)


def _study(**overrides) -> ml_collections.ConfigDict:
    study = base.get_config().study
    study.update({"synthetic_counts": (100, 200, 400), "primary_count": 200, "roundtrip_prob": 0.25, **overrides})
    return study


def _generators(*names_and_seeds):
    return [{"name": name, "variant": name.rsplit("_seed", 1)[0], "seed": seed, "out_dir": f"/gen/{name}",
             "count": 500} for name, seed in names_and_seeds]


G1, G2 = "target_only_seed1", "class_conditional_seed2"


def test_plan_arms_sweeps_the_doses_and_runs_controls_at_the_primary_one():
    plan = arms.plan_arms(_study(arms=arms.ARM_KINDS), accepted_count={G1: 350, G2: 500}, have_phantom=True,
                          generators=_generators((G1, 1), (G2, 2)))
    assert [a["name"] for a in plan] == [
        f"real + 100 synthetic ({G1})", f"real + 100 synthetic ({G2})",
        f"real + 200 synthetic ({G1})", f"real + 200 synthetic ({G2})",
        f"real + 400 synthetic ({G2})",   # the 350 images target_only accepted cannot supply 400
        "real + 100 oversampled real", "real + 200 oversampled real", "real + 400 oversampled real",
        "real + 200 phantom positives", "real + 200 VAE round-trip real",
        f"real + 200 synthetic ({G1}), real round-tripped p=0.25",
        f"real + 200 synthetic ({G2}), real round-tripped p=0.25"]
    assert [a["name"] for a in plan if a["primary"]] == [a["name"] for a in plan if a["count"] == 200]
    assert plan[-1] == {"name": f"real + 200 synthetic ({G2}), real round-tripped p=0.25",
                        "key": f"synthetic_mitigated_200_{G2}", "kind": "synthetic_mitigated", "count": 200,
                        "generator": G2, "generator_seed": 2, "roundtrip_prob": 0.25, "primary": True}
    assert {(a["generator"], a["generator_seed"]) for a in plan if a["kind"] in ("oversampled", "phantom_positive",
                                                                                 "vae_roundtrip")} == {(None, None)}
    assert {a["roundtrip_prob"] for a in plan if a["kind"] != "synthetic_mitigated"} == {0.0}
    assert len({a["key"] for a in plan}) == len(plan)


def test_plan_arms_names_the_generator_only_when_there_are_several():
    plan = arms.plan_arms(_study(arms=("synthetic", "synthetic_mitigated")), accepted_count={G1: 500},
                          have_phantom=True, generators=_generators((G1, 1)))
    assert [(a["name"], a["key"], a["generator"]) for a in plan if a["count"] == 200] == [
        ("real + 200 synthetic", f"synthetic_200_{G1}", G1),
        ("real + 200 synthetic, real round-tripped p=0.25", f"synthetic_mitigated_200_{G1}", G1)]


def test_plan_arms_follows_the_switches_and_refuses_bad_ones():
    one = _generators((G1, 0))
    real_data = arms.plan_arms(_study(), accepted_count=1000, have_phantom=False, generators=one)
    assert {a["kind"] for a in real_data} == {"synthetic", "oversampled", "vae_roundtrip"}
    largest = arms.plan_arms(_study(primary_count=0, arms=("oversampled",), swept_arms=()), accepted_count=150,
                             have_phantom=True, generators=())
    assert [(a["name"], a["primary"]) for a in largest] == [("real + 150 oversampled real", True)]
    # Doses are capped at what the best-supplied variant gives (its seeds' fewest); a variant that cannot
    # supply a dose is left out there.
    two_seeds = _generators((G1, 1), ("target_only_seed2", 2), (G2, 2))
    few = arms.plan_arms(_study(arms=("synthetic", "oversampled")), accepted_count={G1: 150, "target_only_seed2": 120,
                                                                                    G2: 30}, have_phantom=True,
                         generators=two_seeds)
    assert [(a["name"], a["primary"]) for a in few] == [
        (f"real + 100 synthetic ({G1})", False), ("real + 100 synthetic (target_only_seed2)", False),
        (f"real + 120 synthetic ({G1})", True), ("real + 120 synthetic (target_only_seed2)", True),
        ("real + 100 oversampled real", False), ("real + 120 oversampled real", True)]
    # No image accepted anywhere: no generated arm can run, but the controls run at the configured doses.
    none = arms.plan_arms(_study(arms=arms.ARM_KINDS), accepted_count={G1: 0, G2: 0}, have_phantom=True,
                          generators=_generators((G1, 1), (G2, 2)))
    assert [(a["name"], a["primary"]) for a in none] == [
        ("real + 100 oversampled real", False), ("real + 200 oversampled real", True),
        ("real + 400 oversampled real", False), ("real + 200 phantom positives", True),
        ("real + 200 VAE round-trip real", True)]
    with pytest.raises(ValueError, match="unknown kind"):
        arms.plan_arms(_study(arms=("synthetic", "mixup")), accepted_count=10, have_phantom=True, generators=one)
    with pytest.raises(ValueError, match="primary_count=300 is not one of"):
        arms.plan_arms(_study(primary_count=300), accepted_count=10, have_phantom=True, generators=one)
    with pytest.raises(ValueError, match="at least one generator"):
        arms.plan_arms(_study(), accepted_count=10, have_phantom=True, generators=())
    with pytest.raises(ValueError, match="roundtrip_prob=0.0 must lie"):
        arms.plan_arms(_study(arms=("synthetic_mitigated",), roundtrip_prob=0.0), accepted_count=10,
                       have_phantom=True, generators=one)
