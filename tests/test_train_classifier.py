"""The classifier trainer on tiny configs (CPU, 8 fake devices): its loss pieces on hand examples, overfitting
one batch, the task end to end with its artefacts and pixel baselines, ResNet batch statistics, an easy phantom
learnt.

The 300-image phantom is prepared once per session (conftest).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from tests.helpers import tiny_configs
from tests.helpers.training import fit, one_device_mesh, phantom_batch, read_png
from xray_dit import checkpoint, sharding
from xray_dit.data import pipeline
from xray_dit.evaluation import classification
from xray_dit.models import eva02 as eva02_lib
from xray_dit.models import factory
from xray_dit.train import classifier, eval_pass


def test_positive_weights_are_negatives_over_positives_clipped_and_masked():
    labels = np.zeros((60, 4), np.float32)
    mask = np.ones((60, 4), np.float32)
    labels[:15, 0] = 1                 # 15 positives, 45 negatives → 3
    labels[:40, 1] = 1                 # more positives than negatives → clipped up to 1
    labels[:1, 3] = 1                  # 1 positive, 59 negatives → capped at MAX_POS_WEIGHT
    mask[15:45, 0] = 0                 # unknown labels count neither way: 15 positives, 15 negatives → 1
    mask[:, 2] = 0                     # nothing known at all → 1
    weights = classifier.positive_weights(labels, mask)
    np.testing.assert_allclose(weights, [1.0, 1.0, 1.0, classifier.MAX_POS_WEIGHT])
    mask[15:45, 0] = 1
    assert classifier.positive_weights(labels, mask)[0] == pytest.approx(3.0)


def test_bce_loss_averages_known_labels_and_weights_positives():
    logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    neg_log_sigmoid = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log σ(x)
    known_terms = [neg_log_sigmoid(2.0), neg_log_sigmoid(1.0), neg_log_sigmoid(0.0), neg_log_sigmoid(2.0)]
    assert float(classifier.bce_loss(logits, labels, mask)) == pytest.approx(sum(known_terms) / 4, rel=1e-6)

    # Only the positive term of a positive label is weighted; the average is still over known labels.
    weighted = [2.0 * neg_log_sigmoid(2.0), neg_log_sigmoid(1.0), neg_log_sigmoid(0.0), neg_log_sigmoid(2.0)]
    pos_weight = jnp.array([2.0, 7.0, 5.0])
    assert float(classifier.bce_loss(logits, labels, mask, pos_weight)) == pytest.approx(sum(weighted) / 4, rel=1e-6)

    # Whatever an unknown label says changes nothing; an all-unknown batch gives 0, not NaN.
    flipped = labels.at[0, 2].set(0.0).at[1, 1].set(0.0)
    assert float(classifier.bce_loss(logits, flipped, mask)) == pytest.approx(sum(known_terms) / 4, rel=1e-6)
    assert float(classifier.bce_loss(logits, labels, jnp.zeros_like(mask))) == 0.0


def test_layer_decay_multipliers_by_layer():
    params = {"cls_token": 0, "pos_embed": 0, "patch_embed": {"proj": {"kernel": 0, "bias": 0}},
              "blocks_0": {"attn": {"qkv": {"kernel": 0}}}, "blocks_1": {"mlp": {"fc2": {"kernel": 0}}},
              "fc_norm": {"scale": 0}, "head": {"kernel": 0, "bias": 0}}
    got = classifier.layer_decay_multipliers(params, depth=2, decay=0.5)
    assert got == {"cls_token": 0.125, "pos_embed": 0.125, "patch_embed": {"proj": {"kernel": 0.125, "bias": 0.125}},
                   "blocks_0": {"attn": {"qkv": {"kernel": 0.25}}}, "blocks_1": {"mlp": {"fc2": {"kernel": 0.5}}},
                   "fc_norm": {"scale": 1.0}, "head": {"kernel": 1.0, "bias": 1.0}}

    # On the real model: one multiplier per parameter, the same tree the optimiser scales.
    model = eva02_lib.make_eva02("tiny", img_size=16, num_classes=2, patch_size=8)
    abstract = sharding.unbox(factory.abstract_params(model))
    multipliers = classifier.layer_decay_multipliers(abstract, model.depth, 0.75)
    assert jax.tree.structure(multipliers) == jax.tree.structure(abstract)
    assert sorted(set(jax.tree.leaves(multipliers))) == [0.75 ** k for k in range(model.depth + 1, -1, -1)]


def test_classifier_overfits_a_fixed_batch():
    model = eva02_lib.make_eva02("tiny", img_size=32, num_classes=3, patch_size=8, drop_path_rate=0.0)
    images = jnp.asarray(phantom_batch(8, 32))
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 2, (8, 3)), jnp.float32)
    mask = jnp.ones_like(labels).at[0, 0].set(0.0)
    params = sharding.unbox(factory.init_params(model, jax.random.PRNGKey(0)))
    key = jax.random.PRNGKey(1)

    def loss(params):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
        return classifier.bce_loss(logits, labels, mask)

    first, last = fit(loss, params, steps=40, lr=3e-3)
    assert last < 0.1 * first, (first, last)


def test_classifier_end_to_end_writes_test_artefacts(phantom_data_dir, tmp_path, monkeypatch):
    config = tiny_configs.tiny_config(phantom_data_dir)
    config.task = "train_classifier"
    passes = []
    original = eval_pass.run_over_split
    monkeypatch.setattr(eval_pass, "run_over_split", lambda *a, **k: passes.append(a[4]) or original(*a, **k))
    monkeypatch.setattr(classifier, "_BASELINE_CACHE", {})
    results = classifier.train_classifier(config, tmp_path)   # the default mesh: 8 devices, data parallel
    names = tuple(config.data.labels)
    # Validation at steps 10 and 20 chooses the kept parameters; the final report reuses those predictions.
    # Then the pixel baselines read the three splits once.
    assert passes == ["validation", "validation", "test", "train", "validation", "test"]

    best = json.loads((tmp_path / "best.json").read_text())
    assert best["step"] in (10, 20) and results["best_step"] == best["step"]
    params, info = checkpoint.load_export(tmp_path / "best", kind="eva02")
    assert info["class_names"] == list(names) and info["step"] == best["step"]
    assert set(results["test_auc"]) == set(names)

    for split in ("validation", "test"):
        table = pipeline.metadata_table(config.data, split, data_dir=phantom_data_dir)
        rows = classification.read_predictions(tmp_path / f"predictions_{split}.csv")
        assert rows["class_names"] == list(names)
        assert sorted(rows["image_id"]) == sorted(table.image_id)   # every image once, no padding rows
        patient_of = dict(zip(table.image_id, table.patient_id))
        assert [patient_of[i] for i in rows["image_id"]] == list(rows["patient_id"])
        row_of = {image_id: i for i, image_id in enumerate(table.image_id)}
        columns = table.label_columns(names)
        order = [row_of[i] for i in rows["image_id"]]
        np.testing.assert_array_equal(rows["labels"], table.labels[order][:, columns])
        assert np.all((rows["probs"] >= 0) & (rows["probs"] <= 1)) and rows["probs"].std() > 0

    assert read_png(tmp_path / "roc_test.png").ndim == 3
    assert results["test_confusion"], "no class had both outcomes in validation: the fixture data changed"
    # Each confusion matrix is the test split at Youden's threshold on the *validation* predictions.
    val = classification.read_predictions(tmp_path / "predictions_validation.csv")
    test = classification.read_predictions(tmp_path / "predictions_test.csv")
    assert set(results["thresholds_from_validation"]) == set(results["test_confusion"])
    for name, threshold in results["thresholds_from_validation"].items():
        c = names.index(name)
        known = val["mask"][:, c]
        # The run chose it from unrounded probabilities; the file holds them to 6 decimals.
        want = classification.youden_threshold(val["labels"][known, c], val["probs"][known, c])
        assert threshold == pytest.approx(want, abs=1e-6), name
        known = test["mask"][:, c]
        predicted = (test["probs"][known, c] >= want).astype(int)
        assert results["test_confusion"][name] == confusion_matrix(test["labels"][known, c], predicted,
                                                                   labels=[0, 1]).tolist(), name
    for name, matrix in results["test_confusion"].items():
        assert read_png(tmp_path / f"confusion_{name}.png").ndim == 3
        assert np.sum(matrix) == np.sum(classification.read_predictions(tmp_path / "predictions_test.csv")["mask"][
            :, names.index(name)])
    table_md = (tmp_path / "test_auc.md").read_text()
    assert all(name in table_md for name in names)

    # The pixel baselines, fitted on the same training images, sit beside the network's AUC.
    written = json.loads((tmp_path / "results.json").read_text())["baselines"]
    assert set(written) == set(config.classifier.baselines) == {"pixel_logreg_16", "pixel_logreg_32"}
    for name, baseline in written.items():
        assert baseline["size"] == int(name.rsplit("_", 1)[1]) and f"{name} (test)" in table_md
        assert baseline["train_images"] == len(pipeline.metadata_table(config.data, "train", data_dir=phantom_data_dir))
        assert 0.0 <= baseline["test_auc"]["Cardiomegaly"] <= 1.0 and "Cardiomegaly" in baseline["C"]
    # A deliberately broken baseline (training labels shuffled) gives other AUCs: the numbers come from the fit.
    sizes = {"pixel_logreg_16": 16}
    rng = np.random.default_rng(0)

    def shuffled_train_labels(*args, **kwargs):
        out = original(*args, **kwargs)
        if args[4] == "train":
            out["labels"] = rng.permutation(out["labels"])
        return out

    monkeypatch.setattr(classifier, "_BASELINE_CACHE", {})
    monkeypatch.setattr(eval_pass, "run_over_split", shuffled_train_labels)
    broken = classifier.pixel_baselines(config, phantom_data_dir, sharding.make_mesh((-1, 1, 1)), sizes, 16)
    assert broken["pixel_logreg_16"]["test_auc"] != written["pixel_logreg_16"]["test_auc"]


def test_resnet_classifier_trains_batch_statistics_evaluates_with_them_and_resumes_them(phantom_data_dir, tmp_path,
                                                                                       monkeypatch):
    config = tiny_configs.tiny_config(phantom_data_dir)
    config.task = "train_classifier"
    config.classifier.model = "resnet_tiny"
    config.classifier.baselines = ()   # their passes over the splits carry no batch statistics
    passes = []   # (split, variables, outputs) of every evaluation pass, copied before the loop donates them
    original = eval_pass.run_over_split

    def spy(*args, **kwargs):
        passes.append((args[4], jax.device_get(args[1]), original(*args, **kwargs)))
        return passes[-1][2]
    monkeypatch.setattr(eval_pass, "run_over_split", spy)
    results = classifier.train_classifier(config, tmp_path, mesh=one_device_mesh())
    assert set(results["test_auc"]) == set(config.data.labels)
    assert [split for split, _, _ in passes] == ["validation", "validation", "test"]
    for step_10, step_20 in zip(jax.tree.leaves(passes[0][1]["batch_stats"]),
                                jax.tree.leaves(passes[1][1]["batch_stats"])):
        assert not np.array_equal(step_10, step_20)   # trained between the evaluations
    bn1 = passes[1][1]["batch_stats"]["bn1"]
    assert np.abs(bn1["mean"]).max() > 1e-3 and np.abs(bn1["var"] - 1).max() > 1e-3   # not the initial 0 and 1
    kept, info = checkpoint.load_export(tmp_path / "best", kind="resnet")
    assert set(kept) == {"params", "batch_stats"} and info["step"] == results["best_step"]
    evaluated = passes[results["best_step"] // 10 - 1]
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(evaluated[1])):
        np.testing.assert_array_equal(np.asarray(a), b)
    # The study's probe reads that export and predicts as the evaluation did.
    from xray_dit.study import probe
    runs = {"0": {"workdir": str(tmp_path)}}
    probe_model = probe.ClassifierProbe({"01_baseline": {"runs": runs}})
    images = np.concatenate([b["image"][b["valid"] > 0][..., 0] for b in eval_pass.eval_passes(
        config, phantom_data_dir, "validation", 16)])
    probs, features = probe_model(images)
    np.testing.assert_allclose(probs, evaluated[2]["probs"], rtol=1e-4, atol=1e-6)
    assert features.shape == (len(images), 128)
    # A rerun resumes at step 20, trains nothing, and evaluates the restored state: same statistics, same outputs.
    first_run = passes[1]
    passes.clear()
    classifier.train_classifier(config, tmp_path, mesh=one_device_mesh())
    assert passes[0][0] == "validation"
    for a, b in zip(jax.tree.leaves(passes[0][1]), jax.tree.leaves(first_run[1])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(passes[0][2]["probs"], first_run[2]["probs"])


def test_classifier_reaches_high_auc_on_an_easy_phantom(phantom_data_dir, tmp_path):
    tiny_configs.prepare_easy_phantom(phantom_data_dir)
    config = tiny_configs.easy_classifier_config(phantom_data_dir, steps=250)
    results = classifier.train_classifier(config, tmp_path, mesh=one_device_mesh())
    assert results["test_auc"]["Cardiomegaly"] >= 0.95, results
