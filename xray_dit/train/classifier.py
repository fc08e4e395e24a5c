"""Task `train_classifier`: the multi-label classifier (EVA-02 or ResNet) and its evaluation artefacts.

Multi-label sigmoid BCE (label mask for unknown labels; optional positive weighting), drop-path (EVA-02),
layer-wise lr decay, optional start from imported timm / torchvision weights. A model with BatchNorm
trains its running statistics as the loop's model state and is evaluated with them. Validation every `eval_every` steps
(per-class ROC-AUC); the parameters with the best `select_metric` are kept in `<workdir>/best`.
At the end, on the test split with those parameters: per-class AUC table, ROC curves, a confusion
matrix per class at the validation-chosen (Youden) threshold, and `predictions_{validation,test}.csv`
(image id, patient id, labels, probabilities) for the study's statistics. The test split is used for
nothing else: no threshold, no model selection. Beside the network, the configured baselines
(`classifier.baselines`, e.g. logistic regression on 16x16 pixels; `evaluation/baselines.py`) are fitted on
the same real training images, their C chosen on validation, and scored on test.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from xray_dit import checkpoint, sharding
from xray_dit.data import pipeline, prepared
from xray_dit.evaluation import baselines as baselines_lib
from xray_dit.evaluation import classification, plots
from xray_dit.models import eva02 as eva02_lib
from xray_dit.models import factory
from xray_dit.models import resnet as resnet_lib
from xray_dit.train import eval_pass, loop
from xray_dit.train import seeds as seeds_lib

MAX_POS_WEIGHT = 50.0
# Baseline results by everything they depend on: a study's seeds and arms share the real training split, so
# the baselines are fitted once per process.
_BASELINE_CACHE: dict[tuple, dict] = {}


def positive_weights(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """negatives / positives per class (capped), so each class's positives weigh as much as its negatives."""
    pos = np.sum(labels * mask, axis=0)
    neg = np.sum((1 - labels) * mask, axis=0)
    return np.clip(neg / np.maximum(pos, 1.0), 1.0, MAX_POS_WEIGHT).astype(np.float32)


def bce_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array, pos_weight: jax.Array | None = None) -> jax.Array:
    """Masked multi-label BCE with logits, averaged over known labels."""
    logits = logits.astype(jnp.float32)
    log_p, log_not_p = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
    positive = labels * log_p * (pos_weight if pos_weight is not None else 1.0)
    per_label = -(positive + (1 - labels) * log_not_p)
    return jnp.sum(per_label * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def layer_decay_multipliers(params: Any, depth: int, decay: float, layer_id=eva02_lib.layer_id) -> Any:
    """lr multiplier decay ** (depth + 1 - layer_id): the head learns at full rate, embeddings slowest."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {path: float(decay ** (depth + 1 - layer_id(path, depth))) for path in flat})


def _layer_decay(model, params: Any, decay: float) -> Any:
    if isinstance(model, resnet_lib.ResNet):   # the stem, each stage, the head
        return layer_decay_multipliers(params, len(model.stage_sizes), decay, resnet_lib.layer_id)
    return layer_decay_multipliers(params, model.depth, decay)


def export_tree(variables: dict) -> Any:
    """What a classifier export holds: the params alone, or all variables for a model with state (BatchNorm)."""
    return variables["params"] if set(variables) == {"params"} else variables


def variables_from_export(tree: Any, model_state_names) -> dict:
    """The inverse of `export_tree`, given the model's state collections (none: the tree is the params)."""
    return dict(tree) if model_state_names else {"params": tree}


def _weights_kind(config: ml_collections.ConfigDict) -> str:
    return "resnet" if config.classifier.model in resnet_lib.RESNET_SIZES else "eva02"


def import_command(config: ml_collections.ConfigDict) -> str:
    """The command that writes the export `classifier.init_from` names, for the configured model."""
    c = config.classifier
    kind = _weights_kind(config)
    source = "<torchvision or timm .pth/.safetensors>" if kind == "resnet" else "<timm model.safetensors>"
    return (f"python -m xray_dit.tools.import_weights --kind={kind} --model={c.model} "
            f"--image_size={config.data.image_size} --num_classes={len(config.data.labels)} --src={source} "
            f"--out={c.init_from}")


def check_init_from(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError (one line: the folder and the command that creates it) unless `classifier.init_from` is
    empty or an export of the configured model's kind. Runs before any data is prepared."""
    path = config.classifier.init_from
    if not path:
        return
    try:
        info = checkpoint.load_export_info(path)
    except FileNotFoundError:
        raise ValueError(f"classifier.init_from={path}: no imported weights there ({path}/{checkpoint.EXPORT_INFO} "
                         f"is missing); create them with: {import_command(config)}") from None
    kind = _weights_kind(config)
    if info.get("kind") != kind:
        raise ValueError(f"classifier.init_from={path} holds {info.get('kind')!r} weights but classifier.model="
                         f"{config.classifier.model} needs {kind!r} weights; create them with: "
                         f"{import_command(config)}")


def _evaluated_variables(state: dict) -> dict:
    """EMA parameters (with their EMA statistics) when the run keeps them, else the trained ones."""
    prefix = "ema_" if "ema_params" in state else ""
    return {"params": state[f"{prefix}params"], **state.get(f"{prefix}model_state", {})}


def _baseline_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The pixel baselines' sizes (`classifier.baselines`), each dividing the image size."""
    size = int(config.data.image_size)
    sizes = baselines_lib.pixel_sizes(tuple(config.classifier.baselines))
    for name, side in sizes.items():
        if size % side:
            raise ValueError(f"classifier baseline {name} needs an image size divisible by {side}, got {size}; "
                             "change config.classifier.baselines (e.g. to pixel_logreg_<a divisor of the size>)")
    return sizes


def _positive_weight(config: ml_collections.ConfigDict, directory) -> jax.Array | None:
    """`classifier.pos_weight`: None, or "balanced" weights from the (possibly thinned) training split."""
    mode, class_names = config.classifier.pos_weight, tuple(config.data.labels)
    if not mode:
        return None
    if mode != "balanced":
        raise ValueError(f"classifier.pos_weight must be '' or 'balanced', got {mode!r}")
    table = pipeline.metadata_table(config.data, "train", data_dir=directory)
    columns = table.label_columns(class_names)
    weight = jnp.asarray(positive_weights(table.labels[:, columns], table.label_mask[:, columns]))
    logging.info("classifier: positive weights %s", dict(zip(class_names, np.asarray(weight).round(2))))
    return weight


def _make_loss_fn(model, state_names: list[str], pos_weight: jax.Array | None):
    """The loop's loss: masked BCE; a model with state (BatchNorm) also returns its updated statistics."""
    def loss_fn(params, batch, rng, step, model_state=None):
        del step
        if model_state is None:
            logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
        else:
            logits, model_state = model.apply({"params": params, **model_state}, batch["image"], train=True,
                                              rngs={"dropout": rng}, mutable=state_names)
        loss = bce_loss(logits, batch["labels"], batch["label_mask"], pos_weight)
        return (loss, {"bce": loss}) if model_state is None else (loss, ({"bce": loss}, dict(model_state)))
    return loss_fn


def _initial_variables(init_from: str, kind: str, abstract: dict, state_names: list[str]):
    """(params, model state or None) imported from `init_from`, or (None, None) to start fresh."""
    if not init_from:
        return None, None
    loaded, info = checkpoint.load_export(init_from, export_tree(abstract), kind=kind)
    variables = variables_from_export(loaded, state_names)
    logging.info("classifier: starting from %s (%s)", init_from, info.get("source", "?"))
    return variables.pop("params"), variables or None


def train_classifier(config: ml_collections.ConfigDict, workdir: epath.Path, *, mesh=None,
                     synthetic: str | None = None, synthetic_count: int | None = None) -> dict:
    """Trains, keeps the best validation parameters, evaluates them on test; returns the results.

    `synthetic` (a folder of PNGs + manifest.csv) mixes `synthetic_count` extra images into training:
    the study uses it both for generated images and for the oversampled-real control arm.
    """
    workdir = epath.Path(workdir)
    mesh = mesh or sharding.make_mesh(config.mesh.shape)
    task, finish = classifier_task(config, workdir, mesh=mesh, synthetic=synthetic, synthetic_count=synthetic_count)
    return finish(loop.train(config, workdir, task, mesh=mesh))


def train_classifier_seeds(config: ml_collections.ConfigDict, folder: epath.Path, seeds, *, mesh=None,
                           synthetic: str | None = None, synthetic_count: int | None = None) -> dict[int, dict]:
    """`train_classifier` for every seed in one program (`train/seeds.py`): seed s writes in `folder/seed_<s>`
    what its own run would, checkpoints included. Returns {seed: results}."""
    folder = epath.Path(folder)
    mesh = mesh or sharding.make_mesh(config.mesh.shape)
    runs, finishers = [], []
    for seed in seeds:
        seed_config = ml_collections.ConfigDict(config.to_dict())
        seed_config.seed = int(seed)
        workdir = folder / f"seed_{int(seed)}"
        task, finish = classifier_task(seed_config, workdir, mesh=mesh, synthetic=synthetic,
                                       synthetic_count=synthetic_count)
        runs.append(seeds_lib.SeedRun(config=seed_config, workdir=workdir, task=task))
        finishers.append(finish)
    states = seeds_lib.train(runs, mesh=mesh)
    return {int(seed): finish(state) for seed, finish, state in zip(seeds, finishers, states)}


def classifier_task(config: ml_collections.ConfigDict, workdir: epath.Path, *, mesh, synthetic: str | None = None,
                    synthetic_count: int | None = None):
    """(the loop's TrainTask, finish): `finish(final state) -> results` evaluates the kept parameters on test."""
    cfg = config.classifier
    train_cfg = cfg.train
    check_init_from(config)
    directory = prepared.ensure_prepared(config, workdir)
    class_names = tuple(config.data.labels)
    model = factory.classifier_from_config(config, num_classes=len(class_names))
    baseline_sizes = _baseline_sizes(config)
    pos_weight = _positive_weight(config, directory)

    def init_variables(rng):
        return factory.init_variables(model, rng)

    abstract = sharding.unbox(jax.eval_shape(init_variables, jax.random.PRNGKey(0)))
    state_names = sorted(set(abstract) - {"params"})   # e.g. BatchNorm's "batch_stats"; none for EVA-02

    def init_model_state(rng):
        return {name: value for name, value in init_variables(rng).items() if name in state_names}

    loss_fn = _make_loss_fn(model, state_names, pos_weight)
    kind = factory.kind_of(model)
    initial, initial_model_state = _initial_variables(cfg.init_from, kind, abstract, state_names)
    multipliers = _layer_decay(model, abstract["params"], cfg.layer_decay) if cfg.layer_decay < 1 else None

    data = iter(pipeline.make_dataset(config.data, "train", train=True, seed=int(config.seed),
                                      batch_size=int(train_cfg.batch_size), data_dir=directory,
                                      synthetic=synthetic, synthetic_count=synthetic_count))
    eval_bs = eval_pass.eval_batch_size(int(train_cfg.batch_size), mesh)

    @jax.jit
    def predict(variables, batch):   # eval mode: BatchNorm uses its running statistics
        return {"probs": jax.nn.sigmoid(model.apply(variables, batch["image"]))}

    def predictions(variables, split):
        return eval_pass.run_over_split(predict, variables, config, directory, split, mesh, batch_size=eval_bs)

    best_dir = workdir / "best"
    best_info_path = workdir / "best.json"
    best_validation = {}   # step → validation predictions of the kept parameters (this process only)

    def evaluate(state, step, writer):
        del writer   # the loop writes the returned AUCs
        variables = _evaluated_variables(state)
        out = predictions(variables, "validation")
        metrics = _validation_metrics(out, class_names, cfg.select_metric)
        value = metrics[cfg.select_metric]
        if _replaces_the_kept(value, best_info_path, cfg.select_metric):
            checkpoint.save_export(best_dir, export_tree(variables), {
                "kind": kind, "model": factory.model_fields(model), "class_names": list(class_names),
                "step": step})
            best_validation.clear()
            best_validation[step] = out
            if jax.process_index() == 0:
                best_info_path.write_text(json.dumps({"metric": cfg.select_metric, "value": value, "step": step}))
        return metrics

    task = loop.TrainTask(name="classifier", init_params=lambda rng: init_variables(rng)["params"],
                          loss_fn=loss_fn, train=train_cfg, data=data, evaluate=evaluate, initial_params=initial,
                          lr_multipliers=multipliers, init_model_state=init_model_state if state_names else None,
                          initial_model_state=initial_model_state)

    def finish(state):   # the final evaluation, with the best validation parameters
        kept, _ = checkpoint.load_export(best_dir, export_tree(_evaluated_variables(state)), kind=kind)
        best = json.loads(best_info_path.read_text())
        return evaluate_on_test(config, workdir, predictions, variables_from_export(kept, state_names), class_names,
                                directory, best, validation=best_validation.get(best["step"]),
                                baselines=lambda: pixel_baselines(config, directory, mesh, baseline_sizes, eval_bs))
    return task, finish


def _validation_metrics(out: dict, class_names: Sequence[str], select_metric: str) -> dict[str, float]:
    """Per-class validation AUCs and their mean, refusing a `select_metric` that is not one of them."""
    aucs = classification.per_class_auc(out["labels"], out["probs"], class_names, out["label_mask"] > 0)
    metrics = {f"auc/{k}": v for k, v in aucs.items()} | {"auc/mean": classification.mean_auc(aucs)}
    if select_metric not in metrics:
        raise ValueError(f"classifier.select_metric {select_metric!r} is not one of {sorted(metrics)}")
    return metrics


def _replaces_the_kept(value: float, best_info_path: epath.Path, select_metric: str) -> bool:
    """Whether parameters scoring `value` replace the kept best: they improve on it, or the kept value is
    undefined (or nothing is kept yet), so that the latest parameters are kept until the metric is defined."""
    best = json.loads(best_info_path.read_text()) if best_info_path.exists() else None
    if not np.isfinite(value):
        logging.warning("classifier: %s is undefined on validation (a class without positives?); until it is "
                        "defined, the latest parameters are kept as the best", select_metric)
    improves = np.isfinite(value) and (best is None or not np.isfinite(best["value"]) or value > best["value"])
    return improves or best is None or not np.isfinite(best["value"])


def pixel_baselines(config, directory, mesh, sizes: dict[str, int], batch_size: int) -> dict:
    """`baselines.pixel_logreg` for each named size, on the real train/validation/test splits (un-augmented)."""
    if not sizes:
        return {}
    key = (str(directory), repr(config.data.to_dict()), tuple(sorted(sizes.items())))
    if key in _BASELINE_CACHE:
        return _BASELINE_CACHE[key]

    @jax.jit
    def downsample(_, batch):
        return {name: baselines_lib.area_downsample(batch["image"], side) for name, side in sizes.items()}

    passes = {split: eval_pass.run_over_split(downsample, None, config, directory, split, mesh, batch_size=batch_size,
                                           keys=("labels", "label_mask"))
              for split in ("train", "validation", "test")}
    labels = {split: out["labels"] for split, out in passes.items()}
    masks = {split: out["label_mask"] for split, out in passes.items()}
    results = {name: {"size": side, **baselines_lib.pixel_logreg({s: out[name] for s, out in passes.items()}, labels,
                                                                 masks, tuple(config.data.labels))}
               for name, side in sizes.items()}
    _BASELINE_CACHE[key] = results
    return results


def evaluate_on_test(config, workdir, predictions, variables, class_names, directory, best, *,
                     validation=None, baselines=None) -> dict:
    """Test metrics and plots of the kept variables; `validation`: their validation predictions, if at hand
    (the evaluation that chose them made them), else they are computed again; `baselines`: a function giving
    the baselines' results, reported beside the network's (results.json "baselines", test_auc.md columns)."""
    val = validation if validation is not None else predictions(variables, "validation")
    test = predictions(variables, "test")
    tables = {split: pipeline.metadata_table(config.data, split, data_dir=directory) for split in ("validation", "test")}
    results: dict[str, Any] = {"best_step": best["step"], "select_metric": best["metric"], "val_value": best["value"]}
    test_aucs = classification.per_class_auc(test["labels"], test["probs"], class_names, test["label_mask"] > 0)
    results["test_auc"] = test_aucs
    results["test_auc_mean"] = classification.mean_auc(test_aucs)
    thresholds, confusion = {}, {}
    for c, name in enumerate(class_names):
        known_val = val["label_mask"][:, c] > 0
        y_val = val["labels"][known_val, c]
        if np.unique(y_val).size < 2:
            continue
        thresholds[name] = classification.youden_threshold(y_val, val["probs"][known_val, c])
        known = test["label_mask"][:, c] > 0
        confusion[name] = classification.confusion(test["labels"][known, c], test["probs"][known, c],
                                                   thresholds[name]).tolist()
    results["thresholds_from_validation"] = thresholds
    results["test_confusion"] = confusion
    results["baselines"] = baselines() if baselines is not None else {}
    if jax.process_index() == 0:
        for split, out in (("validation", val), ("test", test)):
            table = tables[split]
            classification.write_predictions(workdir / f"predictions_{split}.csv", table.image_id[out["index"]],
                                             table.patient_id[out["index"]], out["labels"], out["probs"],
                                             class_names, mask=out["label_mask"] > 0)
        columns = {"test AUC": test_aucs} | {f"{name} (test)": b["test_auc"] for name, b in results["baselines"].items()}
        (workdir / "test_auc.md").write_text(classification.auc_table_markdown(columns))
        curves = classification.roc_curves(test["labels"], test["probs"], class_names, test["label_mask"] > 0)
        if curves:
            plots.plot_roc_curves(curves, workdir / "roc_test.png", title="ROC curves (test)")
        for name, cm in confusion.items():
            plots.plot_confusion_matrix(np.asarray(cm), [f"no {name}", name], workdir / f"confusion_{name}.png",
                                        title=f"{name} (test; threshold {thresholds[name]:.3f} from validation)")
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    logging.info("classifier test AUC: %s", {k: round(v, 4) for k, v in test_aucs.items()})
    for name, baseline in results["baselines"].items():
        logging.info("baseline %s test AUC: %s", name, {k: round(v, 4) for k, v in baseline["test_auc"].items()})
    return results


def run(config, workdir):
    return train_classifier(config, workdir)

