"""The classifier against a pixel logistic regression on real X-rays: patient-wise cross-validation on NIH.

    python -m bench.nih_cv [--config=configs/quickstart.py] [--config.classifier.train.steps=400 ...]
                           [--folds=5] [--only_folds=0,1] [--seeds=0] [--append=false]

Task: Pneumonia vs No Finding on the real NIH sample (../shared/data/nih_sample), the one finding with enough
positives there. Its official test list holds Pneumonia images only, so the official train_val images are
cross-validated instead: those with exactly one of the two labels, in `--folds` patient-wise folds (stratified
by label). For each fold, the held-out fold is the test split and a `--validation_fraction` of the other
patients the validation split (model selection, the baselines' C); the rest is train. Written as a split file
(`config.data.split_file`) over the sample prepared once at `--image_size` px, so each fold is an ordinary run of
the real trainer, `train_classifier`, with the config's classifier block (the quickstart's by default; override
keys like `--config.classifier.train.lr=3e-4`). Its results.json holds the network's test AUC and the pixel
logistic regressions' (`classifier.baselines`, fitted on the same train split, C chosen on validation).

Prints one row per fold and the mean ± sd, and appends them with the command to bench/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import resource
import shlex
import shutil
import sys
import time

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from bench.data_pipeline import _machine
from xray_dit.data import builders, pipeline, split_rows, splits
from xray_dit.evaluation import classification
from xray_dit.train import classifier

ROOT = pathlib.Path(__file__).resolve().parents[1]
NIH_SAMPLE = ROOT.parent / "shared" / "data" / "nih_sample"
POSITIVE, NEGATIVE = "Pneumonia", "No Finding"

def _define_flags() -> None:
    """The command's flags; defined only when it runs, so that importing its functions defines none."""
    config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "quickstart.py"),
                                    "config whose classifier block is measured", lock_config=True)
    flags.DEFINE_string("manual_dir", str(NIH_SAMPLE), "the NIH download (the sample's layout)")
    flags.DEFINE_string("workdir", str(ROOT / "bench" / "out" / "nih_cv"), "prepared data and fold runs")
    flags.DEFINE_integer("image_size", 64, "NIH builder config (resolution) the sample is prepared at")
    flags.DEFINE_integer("folds", 5, "number of patient-wise folds")
    flags.DEFINE_list("only_folds", [], "run only these folds (default: all)")
    flags.DEFINE_list("seeds", ["0"], "classifier seeds per fold (the network's AUC is their mean)")
    flags.DEFINE_float("validation_fraction", 0.15, "share of a fold's training patients held out for model "
                       "selection")
    flags.DEFINE_integer("split_seed", 0, "seed of the folds and the inner validation split")
    flags.DEFINE_bool("append", True, "append the table to bench/RESULTS.md")


# ---- Folds (pure) ----------------------------------------------------------------------------------


def binary_rows(table: splits.MetadataTable, positive: str = POSITIVE, negative: str = NEGATIVE) -> np.ndarray:
    """Indices of the images known to carry exactly one of the two labels (the others are not used)."""
    columns = table.label_columns([positive, negative])
    known = (table.label_mask[:, columns] == 1).all(axis=1)
    return np.flatnonzero(known & (table.labels[:, columns].sum(axis=1) == 1))


def patient_folds(patient_ids: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number of each image: a patient's images share a fold; folds are stratified by label."""
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = np.full(len(patient_ids), -1)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups=patient_ids)):
        fold_of[held_out] = fold
    return fold_of


def fold_splits(image_ids: np.ndarray, patient_ids: np.ndarray, fold_of: np.ndarray, fold: int,
                validation_fraction: float, seed: int) -> dict[str, str]:
    """image id → "test" (the held-out fold), "validation" (a fraction of the other patients) or "train"."""
    rest = fold_of != fold
    validation = splits.carve_validation_patients(patient_ids[rest], validation_fraction, seed + fold)
    split_of = {}
    for image_id, patient, held_out in zip(image_ids, patient_ids, ~rest):
        split_of[str(image_id)] = "test" if held_out else "validation" if patient in validation else "train"
    return split_of


def ensemble_auc(prediction_files: list[pathlib.Path]) -> float:
    """Test AUC of the mean probability over seeds' predictions (the same images, joined on image id)."""
    runs = [classification.read_predictions(path) for path in prediction_files]
    order = [np.argsort(run["image_id"]) for run in runs]
    ids = [run["image_id"][o] for run, o in zip(runs, order)]
    if any(not np.array_equal(ids[0], other) for other in ids[1:]):
        raise ValueError(f"the seeds' predictions cover different images: {prediction_files}")
    labels = runs[0]["labels"][order[0]][:, 0]
    probs = np.mean([run["probs"][o][:, 0] for run, o in zip(runs, order)], axis=0)
    return float(roc_auc_score(labels, probs))


def mean_sd(values) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


# ---- Runs --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FoldResult:
    fold: int
    counts: dict[str, tuple[int, int]]      # split → (images, positives)
    network_auc: list[float]                # one per seed
    baseline_auc: dict[str, float]          # baseline name → test AUC
    seconds: list[float]                    # wall time of each seed's whole run (train + evaluation)
    cpu_seconds: list[float]                # CPU time (user + system, all threads) of each seed's run
    ensemble_auc: float = float("nan")      # AUC of the seeds' mean probability (the study's seed ensemble)

    @property
    def best_baseline(self) -> float:
        """The stronger baseline on this fold's test split: a conservative bar for the network."""
        return max(self.baseline_auc.values()) if self.baseline_auc else float("nan")


def _cpu_seconds() -> float:
    """CPU time of this process so far: on a shared machine, the cost of a run that wall time is not."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fold_config(base: ml_collections.ConfigDict, data_dir: str, split_file: str, image_size: int, seed: int):
    config = ml_collections.ConfigDict(base.to_dict())
    config.task = "train_classifier"
    config.seed = seed
    config.data.update(name="nih_chestxray14", builder_config=str(image_size), image_size=image_size,
                       data_dir=data_dir, split_file=split_file, labels=(POSITIVE,), target_class=POSITIVE)
    config.classifier.select_metric = f"auc/{POSITIVE}"
    return config


def cross_validate(base: ml_collections.ConfigDict, *, manual_dir: str, workdir: pathlib.Path, image_size: int,
                   folds: int, only_folds=(), seeds=(0,), validation_fraction: float = 0.15,
                   split_seed: int = 0) -> list[FoldResult]:
    """Prepares the NIH data once, then trains and evaluates each fold (fresh run folders)."""
    data_dir = workdir / "tfds"
    builders.prepare("nih_chestxray14", str(image_size), data_dir=data_dir, manual_dir=manual_dir)
    data = {"name": "nih_chestxray14", "builder_config": str(image_size), "data_dir": str(data_dir)}
    # The official train_val list, as the builder prepared it (its own validation carve-out included).
    table = splits.MetadataTable.concatenate([pipeline.metadata_table(data, s) for s in ("train", "validation")])
    rows = binary_rows(table)
    image_ids, patient_ids = table.image_id[rows], table.patient_id[rows]
    labels = table.labels[rows, table.label_columns([POSITIVE])[0]].astype(int)
    fold_of = patient_folds(patient_ids, labels, folds, split_seed)
    results = []
    for fold in range(folds):
        if only_folds and fold not in only_folds:
            continue
        split_of = fold_splits(image_ids, patient_ids, fold_of, fold, validation_fraction, split_seed)
        split_file = workdir / f"folds{folds}_seed{split_seed}_fold{fold}.csv"
        split_rows.write_split_file(split_file, split_of)
        split = np.array([split_of[str(i)] for i in image_ids])
        counts = {s: (int(np.sum(split == s)), int(np.sum(labels[split == s]))) for s in ("train", "validation", "test")}
        network, seconds, cpu_seconds, baseline, predictions = [], [], [], {}, []
        for seed in seeds:
            run_dir = workdir / "runs" / f"fold{fold}_seed{seed}"
            predictions.append(run_dir / "predictions_test.csv")
            shutil.rmtree(run_dir, ignore_errors=True)
            start, start_cpu = time.perf_counter(), _cpu_seconds()
            out = classifier.train_classifier(fold_config(base, str(data_dir), str(split_file), image_size, seed),
                                              run_dir)
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(_cpu_seconds() - start_cpu)
            network.append(out["test_auc"][POSITIVE])
            baseline = {name: b["test_auc"][POSITIVE] for name, b in out["baselines"].items()}
        results.append(FoldResult(fold, counts, network, baseline, seconds, cpu_seconds, ensemble_auc(predictions)))
        logging.info("fold %d: network %s, baselines %s", fold, network, baseline)
    return results


# ---- Report --------------------------------------------------------------------------------------------


def table_markdown(results: list[FoldResult]) -> list[str]:
    """One row per fold, then mean ± sd over folds. "network" is the mean single seed's AUC; "ensemble" the AUC
    of the seeds' mean probability (as the study's seed-ensemble estimand), shown when a fold ran several seeds."""
    names = sorted({name for r in results for name in r.baseline_auc})
    ensembles = any(len(r.network_auc) > 1 for r in results)
    extra = " | seed ensemble AUC | ensemble − best LR" if ensembles else ""
    lines = ["| fold | train (pos) | val (pos) | test (pos) | network AUC | " + " | ".join(names)
             + f" | network − best LR{extra} | wall s per run | CPU s per run |",
             "|---|---|---|---|---:|" + "---:|" * (len(names) + 1 + 2 * ensembles) + "---:|---:|"]

    def columns(r: FoldResult) -> list[float]:
        network = float(np.mean(r.network_auc))
        cells = [network] + [r.baseline_auc.get(n, float("nan")) for n in names] + [network - r.best_baseline]
        return cells + ([r.ensemble_auc, r.ensemble_auc - r.best_baseline] if ensembles else [])

    def text(cells: list[str], r_seconds: float, r_cpu: float) -> str:
        return " | ".join(cells) + f" | {r_seconds:.0f} | {r_cpu:.0f} |"

    margin_columns = {1 + len(names)} | ({3 + len(names)} if ensembles else set())
    for r in results:
        counts = " | ".join(f"{n} ({p})" for n, p in (r.counts[s] for s in ("train", "validation", "test")))
        cells = [f"{v:+.3f}" if i in margin_columns else f"{v:.3f}" for i, v in enumerate(columns(r))]
        lines.append(f"| {r.fold} | {counts} | " + text(cells, np.mean(r.seconds), np.mean(r.cpu_seconds)))
    stats = [mean_sd(column) for column in zip(*(columns(r) for r in results))]
    cells = [f"{m:+.3f} ± {sd:.3f}" if i in margin_columns else f"{m:.3f} ± {sd:.3f}"
             for i, (m, sd) in enumerate(stats)]
    lines.append("| **mean ± sd** | | | | " + text(cells, np.mean([np.mean(r.seconds) for r in results]),
                                                   np.mean([np.mean(r.cpu_seconds) for r in results])))
    return lines


def _classifier_summary(config: ml_collections.ConfigDict) -> str:
    c, t = config.classifier, config.classifier.train
    return (f"model {c.model}, patch {c.patch_size}, steps {t.steps}, batch {t.batch_size}, lr {t.lr}, "
            f"warmup {t.warmup_steps}, weight decay {t.weight_decay}, drop path {c.drop_path_rate}, "
            f"augment {dict(config.data.augment)}")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    base = FLAGS.config
    seeds = tuple(int(s) for s in FLAGS.seeds)
    machine = _machine()
    results = cross_validate(base, manual_dir=FLAGS.manual_dir, workdir=pathlib.Path(FLAGS.workdir),
                             image_size=FLAGS.image_size, folds=FLAGS.folds,
                             only_folds=tuple(int(f) for f in FLAGS.only_folds), seeds=seeds,
                             validation_fraction=FLAGS.validation_fraction, split_seed=FLAGS.split_seed)
    command = "python -m bench.nih_cv " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"\n## NIH Pneumonia vs No Finding, patient-wise {FLAGS.folds}-fold CV: `{command}` "
             f"({datetime.date.today().isoformat()})",
             f"Machine: {machine}. {FLAGS.image_size} px; classifier: {_classifier_summary(base)}; seeds "
             f"{list(seeds)} (network AUC = their mean); baselines fitted on the same train split, C chosen on the "
             f"inner validation split ({FLAGS.validation_fraction:.0%} of the training patients); test = the "
             "held-out fold. Seconds: one whole run (training, evaluation; the baselines are fitted in a fold's first "
             "run only), wall and CPU (user + system, all threads).\n",
             *table_markdown(results)]
    print("\n".join(lines), flush=True)
    if FLAGS.append:
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
