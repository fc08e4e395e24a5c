"""The study's training phases: they call the trainers with the study's config, one folder per run."""

from __future__ import annotations

from typing import Any

from xray_dit import generate as generation
from xray_dit.study.context import StudyContext
from xray_dit.train import classifier as classifier_trainer
from xray_dit.train import dit as dit_trainer
from xray_dit.train import vae as vae_trainer


def _classifier_runs(context: StudyContext, folder, **mix) -> dict[str, Any]:
    runs = {}
    for seed in context.config.study.seeds:
        workdir = folder / f"seed_{seed}"
        result = classifier_trainer.train_classifier(context.with_seed(seed), workdir, mesh=context.mesh, **mix)
        runs[str(seed)] = {"workdir": str(workdir), **result}
    return runs


def baseline(context: StudyContext) -> dict:
    """Phase 1: the classifier on real training data only, one run per seed."""
    return {"arm": "real only", "runs": _classifier_runs(context, context.phase_dir("01_baseline"))}


def vae(context: StudyContext) -> dict:
    """Phase 2: the autoencoder (fine-tuned when `vae.init_from` names imported weights)."""
    return vae_trainer.train_vae(context.config, context.phase_dir("02_vae"), mesh=context.mesh)


def dit(context: StudyContext) -> dict:
    """Phase 3: latent cache of the minority class, then the DiT."""
    return dit_trainer.train_dit(context.config, context.phase_dir("03_dit"), vae_dir=context.results["02_vae"]["export"],
                         mesh=context.mesh)


def generate(context: StudyContext) -> dict:
    """Phase 4: `study.num_synthetic` images of the target class from the DiT's EMA weights."""
    config = context.with_seed(context.config.seed)
    config.sample.num_images = int(context.config.study.num_synthetic)
    config.sample.class_name = context.config.data.target_class
    return generation.sample(config, context.phase_dir("04_generate"), dit_dir=context.results["03_dit"]["export"],
                             out_dir=str(context.phase_dir("04_generate") / "samples"), mesh=context.mesh)


def arms(context: StudyContext) -> list[dict]:
    """The retrained arms: real + filtered synthetic and real + oversampled real, at each configured count."""
    accepted = int(context.results["05_filter"]["accepted"])
    out = []
    for count in context.config.study.synthetic_counts:
        n = min(int(count), accepted)
        if n <= 0:
            continue
        out.append({"name": f"real + {n} synthetic", "folder": context.results["05_filter"]["accepted_dir"],
                    "count": n, "kind": "synthetic"})
        out.append({"name": f"real + {n} oversampled real", "folder": context.results["05_filter"]["oversampled_dir"],
                    "count": n, "kind": "oversampled"})
    return out


def retrain(context: StudyContext) -> dict:
    """Phase 6: the classifier per arm, same hyper-parameters and seeds as the baseline."""
    results = {}
    for i, arm in enumerate(arms(context)):
        folder = context.phase_dir("06_retrain") / f"arm_{i}_{arm['kind']}_{arm['count']}"
        results[arm["name"]] = {**arm, "runs": _classifier_runs(context, folder, synthetic=arm["folder"],
                                                                synthetic_count=arm["count"])}
    return {"arms": results}
