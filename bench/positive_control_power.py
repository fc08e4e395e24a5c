"""Can the full study see a true gain? The phantom positive control alone, on a pilot cohort.

    python -m bench.positive_control_power [--builder_config=64_study] [--fractions=1.0,0.25] [--count=200]

Trains `configs/phantom_full.py`'s classifier (3 seeds in one program) on real data only and on real + `count`
fresh phantom patients with Cardiomegaly, at each target fraction, on a phantom cohort drawn with seed 1 (the
studies use seed 0, so nothing here looks at a study's test split), and prints the positive control's test
AUC gain over real only with the study's two-level (patients × seeds) bootstrap: what the study's power is
for an effect that certainly exists. No DiT, no VAE: a few minutes on 2 cores.
"""

from __future__ import annotations

import pathlib
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "positive_control_power"
PILOT_SEED = 1

_BUILDER = flags.DEFINE_string("builder_config", "64_study", "the phantom layout (a cxr_phantom config name)")
_FRACTIONS = flags.DEFINE_list("fractions", ["1.0", "0.25"], "target fractions")
_COUNT = flags.DEFINE_integer("count", 200, "fresh positives added")
_BOOT = flags.DEFINE_integer("bootstrap", 2000, "two-level bootstrap resamples")


def _prepare(name: str) -> tuple[str, object]:
    from xray_dit.data import builders
    from xray_dit.data.builders import cxr_phantom
    listed = cxr_phantom.CxrPhantom.named_config(name)
    pilot = cxr_phantom.PhantomConfig(name=f"{name}_pilot{PILOT_SEED}", size=listed.size,
                                      num_images=listed.num_images, seed=PILOT_SEED, spec=listed.spec)
    builders.prepare("cxr_phantom", pilot, data_dir=OUT / "tfds")
    return pilot.name, listed.spec


def _test_probs(folder: pathlib.Path, seeds, target: str):
    """(labels, patient ids, one row of target probabilities per seed) of the seeds' test predictions."""
    from xray_dit.evaluation import classification
    runs = [classification.read_predictions(folder / f"seed_{s}" / "predictions_test.csv") for s in seeds]
    t = runs[0]["class_names"].index(target)
    return runs[0]["labels"][:, t], runs[0]["patient_id"], [run["probs"][:, t] for run in runs]


def main(argv):
    del argv
    from configs import phantom_full
    from xray_dit.evaluation import statistics
    from xray_dit.study import arms
    from xray_dit.train import classifier
    name, spec = _prepare(_BUILDER.value)
    config = phantom_full.get_config()
    config.data.update(builder_config=name, data_dir=str(OUT / "tfds"))
    seeds, target = [int(s) for s in config.study.seeds], config.data.target_class
    positives = OUT / f"positives_{_COUNT.value}"
    if not (positives / "manifest.csv").exists():
        arms.write_phantom_positives(positives, count=_COUNT.value, size=int(config.data.image_size),
                                     target_class=target, labels=list(config.data.labels), seed=0, spec=spec)
    for fraction in map(float, _FRACTIONS.value):
        start = time.perf_counter()
        config.data.target_fraction = fraction
        base, plus = OUT / f"{name}_f{fraction}" / "real_only", OUT / f"{name}_f{fraction}" / "positive"
        classifier.train_classifier_seeds(config, base, seeds)
        classifier.train_classifier_seeds(config, plus, seeds, synthetic=str(positives), synthetic_count=_COUNT.value)
        labels, patients, probs_a = _test_probs(base, seeds, target)
        _, _, probs_b = _test_probs(plus, seeds, target)
        result = statistics.two_level_bootstrap_difference(labels, probs_a, probs_b, patients, seeds_a=seeds,
                                                           seeds_b=seeds, n_boot=_BOOT.value)
        d = result.single_model
        print(f"{name} fraction {fraction:g}: {int(labels.sum())} test positives; real only "
              f"{d.arm_a.estimate:.3f}, + {_COUNT.value} phantom positives {d.arm_b.estimate:.3f}; gain "
              f"{d.estimate:+.3f} [{d.lower:+.3f}, {d.upper:+.3f}] p {d.p_value:.3g} (mean single model, "
              f"{_BOOT.value} two-level resamples); {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    app.run(main)
