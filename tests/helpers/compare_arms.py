"""Hand-made arms for phase 07 and the report: folders of `predictions_{validation,test}.csv` written by the
project's own writer. An arm's target-class probabilities are the label times its signal plus seed noise, so a
stronger signal is a clearly better arm and an arm that reuses the baseline's files is the same arm.
"""

import ml_collections
import numpy as np

from xray_dit.evaluation import classification
from xray_dit.study.context import StudyContext


LABELS = ("Cardiomegaly", "Effusion")
TARGET = "Cardiomegaly"
N_TEST, N_VAL = 160, 60


def study_config(**study):
    values = dict(seeds=(0, 1), synthetic_counts=(4, 8), primary_count=8, bootstrap_samples=400,
                  arms=("synthetic", "oversampled", "vae_roundtrip"), swept_arms=("synthetic", "oversampled"),
                  primary_estimand="single_model", privacy_percentile=1.0)
    values.update(study)
    data = {"name": "nih_chestxray14", "builder_config": "256", "image_size": 256, "labels": LABELS,
            "target_class": TARGET, "target_fraction": 1.0, "data_dir": ""}
    return ml_collections.ConfigDict({"data": data, "study": values})


def split_data(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = np.stack([np.arange(n) % 3 == 0, rng.random(n) < 0.3], axis=1).astype(np.float32)
    return {"ids": [f"img{i}" for i in range(n)], "patients": [f"p{i // 2}" for i in range(n)], "labels": labels}


SPLITS = {"test": split_data(N_TEST, 0), "validation": split_data(N_VAL, 1)}


def write_run(folder, signal: float, seed: int) -> dict:
    """One trained model's prediction files; its noise depends on the seed only, so arms pair by seed."""
    probs = {}
    for split, data in SPLITS.items():
        rng = np.random.default_rng([seed, len(data["ids"])])
        probs[split] = 1 / (1 + np.exp(-(signal * data["labels"] + rng.normal(size=data["labels"].shape))))
        classification.write_predictions(folder / f"predictions_{split}.csv", data["ids"], data["patients"],
                                         data["labels"], probs[split], LABELS)
    return {"workdir": str(folder), "test_auc": classification.per_class_auc(SPLITS["test"]["labels"], probs["test"],
                                                                             LABELS)}


def write_arm(root, key: str, signal: float, seed_offset: int = 0, **fields) -> dict:
    runs = {str(s): write_run(root / key / f"seed_{s}", signal, s + seed_offset) for s in (0, 1)}
    return {"key": key, "folder": str(root / key), **fields, "runs": runs}


def study_context(root, retrained: dict, **study) -> StudyContext:
    (root / "07_compare").mkdir(parents=True, exist_ok=True)
    baseline = {"arm": "real only",
                "runs": {str(s): write_run(root / "baseline" / f"seed_{s}", 1.0, s) for s in (0, 1)}}
    return StudyContext(config=study_config(**study), workdir=root, mesh=None,
                        results={"01_baseline": baseline, "06_retrain": {"arms": retrained}})
