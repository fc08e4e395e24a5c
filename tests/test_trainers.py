"""The trainers on tiny configs (CPU, 8 fake devices): artefacts, learning, sharding.

Expensive things happen once per session (conftest): the 300-image phantom is prepared into one data dir,
the tiny VAE is trained once and the tiny DiT once (on an FSDP mesh); the DiT and cache tests reuse them,
as do the sample tests in test_generate.py.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix

from tests.conftest import REPO_ROOT
from tests.helpers import tiny_configs
from xray_dit import checkpoint, generate, sharding
from xray_dit.data import phantom, pipeline, prepared
from xray_dit.diffusion import schedules
from xray_dit.evaluation import classification, ctr_oracle, plots
from xray_dit.models import dit as dit_lib
from xray_dit.models import eva02 as eva02_lib
from xray_dit.models import factory
from xray_dit.models import vae as vae_lib
from xray_dit.train import classifier, dit, eval_pass, vae

TINY_DIT_STEPS = 20
FIRST_STEPS_COMPARED = 5


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def _train_losses(workdir, name: str) -> dict[int, float]:
    from tests.test_foundation import read_events
    return {e.step: v.simple_value for e in read_events(workdir / "tensorboard") for v in e.summary.value
            if v.tag == f"{name}/train/loss"}


def _one_device_mesh():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


# --------------------------------------------------------------------------------------------------
# The per-task configs
# --------------------------------------------------------------------------------------------------
def _keys(config, prefix=""):
    return {prefix + k for k, v in config.items()} | {
        key for k, v in config.items() if hasattr(v, "items") for key in _keys(v, prefix + k + ".")}


@pytest.mark.parametrize("name, task", [("vae", "train_vae"), ("classifier", "train_classifier")])
def test_task_configs_set_their_task_keep_the_base_keys_and_name_bad_variants(name, task):
    import importlib
    from configs import base
    from xray_dit import main
    module = importlib.import_module(f"configs.{name}")
    for variant, dataset in ((None, "cxr_phantom"), ("phantom", "cxr_phantom"), ("nih", "nih_chestxray14")):
        config = module.get_config(variant)
        assert config.task == task and config.data.name == dataset
        assert _keys(config) == _keys(base.get_config())   # overrides only, no key of their own
    with pytest.raises(ValueError, match="phantom.*nih"):
        module.get_config("chexpert")
    main._check_argv(["main", f"--config={REPO_ROOT}/configs/{name}.py:nih", f"--config.{name}.train.steps=5"])
    phantom_config = module.get_config()
    assert phantom_config.data.image_size == 64 and phantom_config.compute_dtype == "float32"


@pytest.mark.parametrize("variant, model, size", [("resnet50", "resnet50", 256), ("pretrained_vit", "S", 224)])
def test_study_variants_start_from_imported_weights_and_a_missing_import_stops_at_once(
        tmp_path, monkeypatch, variant, model, size):
    from configs import base, study
    from xray_dit import main
    config = study.get_config(variant)
    assert _keys(config) == _keys(base.get_config())
    assert config.classifier.model == model and config.data.image_size == size and config.classifier.init_from
    factory.check_sizes(config)
    built = factory.classifier_from_config(config, num_classes=len(config.data.labels))
    assert factory.kind_of(built) == ("resnet" if model.startswith("resnet") else "eva02")
    command = classifier.import_command(config)
    assert command.split(" --src=")[0] in " ".join(study.__doc__.split())   # the docstring's command
    config.classifier.init_from = str(tmp_path / "weights" / variant)
    config.data.update(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "nih"))
    monkeypatch.setattr(prepared, "ensure_prepared", lambda *a: pytest.fail("data prepared before the weights check"))
    with pytest.raises(main.UsageError) as error:
        main.run(config, str(tmp_path / "work"))
    message = str(error.value)
    assert "\n" not in message and f"{tmp_path}/weights/{variant}/model.json" in message
    assert classifier.import_command(config) in message
    assert not (tmp_path / "work").exists() and not (tmp_path / "tfds").exists()
    config.task = "train_classifier"
    with pytest.raises(ValueError, match="no imported weights there"):
        classifier.train_classifier(config, tmp_path / "work")
    (tmp_path / "weights" / variant / "params").mkdir(parents=True)
    (tmp_path / "weights" / variant / "model.json").write_text(json.dumps({"kind": "dit"}))
    with pytest.raises(ValueError, match="holds 'dit' weights.*--kind="):
        classifier.check_init_from(config)
    with pytest.raises(ValueError, match="resnet50.*pretrained_vit"):
        study.get_config("vit")


@pytest.mark.parametrize("backend, dtype, want", [("gpu", "bfloat16", "cudnn"), ("gpu", "float16", "cudnn"),
                                                   ("gpu", "float32", "xla"), ("tpu", "bfloat16", "xla"),
                                                   ("cpu", "bfloat16", "xla")])
def test_auto_attention_is_cudnn_only_where_it_runs(backend, dtype, want, monkeypatch):
    from configs import base
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    config = base.get_config()
    config.compute_dtype = dtype
    assert config.attention_impl == "auto" and factory.attention_impl(config) == want
    config.attention_impl = "xla"
    assert factory.attention_impl(config) == "xla"


# --------------------------------------------------------------------------------------------------
# Classifier pieces on hand examples
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Each model's training loss goes down on one fixed batch (the loss functions the trainers use)
# --------------------------------------------------------------------------------------------------
def test_to_uint8_maps_minus_one_to_black_and_one_to_white():
    images = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, -3.0, 2.0], np.float32).reshape(1, 1, 7, 1)
    assert plots.to_uint8(images).tolist() == [[[0, 64, 128, 191, 255, 0, 255]]]
    assert plots.to_uint8(images[..., 0]).dtype == np.uint8


def test_psnr_is_ten_log_of_range_squared_over_mse_per_image():
    images = _phantom_batch(4, 64)[..., 0]
    np.testing.assert_allclose(vae.psnr(images, images + 0.1), 10 * np.log10(4.0 / 0.01), rtol=1e-6)
    blank = vae.psnr(images, np.zeros_like(images))
    np.testing.assert_allclose(blank, 10 * np.log10(4.0 / np.mean(images.astype(np.float64) ** 2, axis=(1, 2))))
    assert blank.shape == (4,) and np.all(blank < 15.0)
    assert np.all(vae.psnr(images, images) > 100.0)
    half = images.copy()
    half[:2] = images[:2] + 0.2                      # only the first two are off
    assert vae.psnr(images, half)[:2] == pytest.approx([10 * np.log10(100.0)] * 2, rel=1e-5)


def test_ctr_preservation_counts_lost_hearts_as_not_preserved():
    cohort = phantom.make_cohort(6, seed=3, spec=tiny_configs.EASY_SPEC)   # normal and enlarged hearts
    images = np.stack([phantom.render(image, 64) for image in cohort]).astype(np.float32) / 127.5 - 1.0
    measured = np.array([ctr_oracle.measure_ctr(image) for image in images])
    assert np.all(np.isfinite(measured))
    assert vae.ctr_preservation(images, images) == {"ctr_within_0.03": 1.0, "ctr_mean_abs_diff": 0.0}
    # Another patient's image as the "reconstruction": the oracle's CTRs decide, pair by pair.
    swapped = images[::-1]
    differences = np.abs(measured - measured[::-1])
    got = vae.ctr_preservation(images, swapped)
    assert got["ctr_within_0.03"] == pytest.approx(np.mean(differences <= 0.03))
    assert got["ctr_mean_abs_diff"] == pytest.approx(differences.mean())
    assert 0.0 < got["ctr_within_0.03"] < 1.0
    # A reconstruction without a measurable thorax keeps no CTR: it counts against, never drops out.
    assert vae.ctr_preservation(images, np.zeros_like(images))["ctr_within_0.03"] == 0.0
    half_blank = images.copy()
    half_blank[3:] = 0.0
    assert vae.ctr_preservation(images, half_blank)["ctr_within_0.03"] == pytest.approx(0.5)
    assert vae.ctr_preservation(images, half_blank)["ctr_mean_abs_diff"] == pytest.approx(0.0)


def _fit(loss_of_params, params, *, steps: int, lr: float) -> tuple[float, float]:
    tx = optax.adam(lr)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_of_params)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert all(np.isfinite(losses)), losses
    return losses[0], float(loss_of_params(params))


def _phantom_batch(count: int, size: int) -> np.ndarray:
    images = [phantom.render(image, size) for image in phantom.make_cohort(count, seed=3)]
    return (np.stack(images).astype(np.float32)[..., None] / 127.5 - 1.0)


def test_classifier_overfits_a_fixed_batch():
    model = eva02_lib.make_eva02("tiny", img_size=32, num_classes=3, patch_size=8, drop_path_rate=0.0)
    images = jnp.asarray(_phantom_batch(8, 32))
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 2, (8, 3)), jnp.float32)
    mask = jnp.ones_like(labels).at[0, 0].set(0.0)
    params = sharding.unbox(factory.init_params(model, jax.random.PRNGKey(0)))
    key = jax.random.PRNGKey(1)

    def loss(params):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
        return classifier.bce_loss(logits, labels, mask)

    first, last = _fit(loss, params, steps=40, lr=3e-3)
    assert last < 0.1 * first, (first, last)


def test_vae_overfits_a_fixed_batch():
    model = vae_lib.make_vae(dict(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=8))
    config = tiny_configs.tiny_config()
    loss_fn = vae.make_loss_fn(model, None, config.vae)
    batch = {"image": jnp.asarray(_phantom_batch(4, 32))}
    params = {"vae": sharding.unbox(factory.init_params(model, jax.random.PRNGKey(0)))}
    key = jax.random.PRNGKey(1)
    first, last = _fit(lambda p: loss_fn(p, batch, key, jnp.asarray(0))[0], params, steps=40, lr=2e-3)
    assert last < 0.3 * first, (first, last)


def test_dit_overfits_a_fixed_batch():
    model = dit_lib.make_dit("DiT-S/2", input_size=8, in_channels=4, num_classes=0, hidden_size=64, depth=2,
                             num_heads=4, class_dropout_prob=0.0)
    schedule = schedules.make_schedule("linear", 1000)
    loss_fn = dit.make_loss_fn(model, schedule, scale=1.0)
    rng = np.random.default_rng(0)
    batch = {"mean": jnp.asarray(rng.normal(size=(4, 8, 8, 4)), jnp.float32),
             "std": jnp.full((4, 8, 8, 4), 0.05, jnp.float32), "label": jnp.zeros((4,), jnp.int32)}
    params = sharding.unbox(factory.init_params(model, jax.random.PRNGKey(0)))
    key = jax.random.PRNGKey(1)  # the same t, noise and posterior sample every step: one fixed objective
    first, last = _fit(lambda p: loss_fn(p, batch, key, jnp.asarray(0))[0], params, steps=40, lr=1e-3)
    assert last < 0.2 * first, (first, last)


def test_vae_gan_term_is_off_before_gan_start_step_and_on_after():
    model = vae_lib.make_vae(dict(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=8))
    disc = vae_lib.PatchDiscriminator(base_channels=32, num_layers=1, max_channel_multiplier=1)
    cfg = tiny_configs.tiny_config().vae
    cfg.gan_start_step = 5
    batch = {"image": jnp.asarray(_phantom_batch(2, 32))}
    params = {"vae": sharding.unbox(factory.init_params(model, jax.random.PRNGKey(0))),
              "disc": sharding.unbox(disc.init(jax.random.PRNGKey(1), batch["image"][:1]))["params"]}
    key = jax.random.PRNGKey(2)
    loss_and_grads = jax.jit(jax.value_and_grad(vae.make_loss_fn(model, disc, cfg), has_aux=True))
    (before, before_terms), before_grads = loss_and_grads(params, batch, key, jnp.asarray(4))
    (after, after_terms), after_grads = loss_and_grads(params, batch, key, jnp.asarray(5))
    reconstruction = lambda t: t["l1"] + cfg.ssim_weight * t["ssim_loss"] + cfg.kl_weight * t["kl"]  # noqa: E731
    assert float(before_terms["gan_weight"]) == 0.0
    np.testing.assert_allclose(float(before), float(reconstruction(before_terms)), rtol=1e-6)
    assert float(after_terms["gan_weight"]) > 0.0
    np.testing.assert_allclose(float(after), float(reconstruction(after_terms) + after_terms["gan_weight"]
                                                   * after_terms["g_loss"] + after_terms["d_loss"]), rtol=1e-6)
    # The discriminator learns only once the GAN is on: before, its gradient is exactly zero.
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(before_grads["disc"]))
    assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(after_grads["disc"]))


# --------------------------------------------------------------------------------------------------
# Tasks end to end
# --------------------------------------------------------------------------------------------------
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

    assert _png(tmp_path / "roc_test.png").ndim == 3
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
        assert _png(tmp_path / f"confusion_{name}.png").ndim == 3
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
    results = classifier.train_classifier(config, tmp_path, mesh=_one_device_mesh())
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
    classifier.train_classifier(config, tmp_path, mesh=_one_device_mesh())
    assert passes[0][0] == "validation"
    for a, b in zip(jax.tree.leaves(passes[0][1]), jax.tree.leaves(first_run[1])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(passes[0][2]["probs"], first_run[2]["probs"])


def test_vae_end_to_end_writes_export_reconstructions_and_metrics(trained_vae):
    workdir, config, result = trained_vae
    info = checkpoint.load_export_info(workdir / "export")
    assert info["kind"] == "vae" and info["trained_steps"] == 20
    scale = info["scaling_factor"]
    assert np.isfinite(scale) and scale > 0 and scale == result["scaling_factor"]
    evaluation = json.loads((workdir / "vae_eval.json").read_text())
    assert evaluation["scaling_factor"] == scale
    metrics = evaluation["eval"]
    assert 5.0 < metrics["psnr"] < 60.0 and -1.0 < metrics["ssim"] <= 1.0
    assert {"ctr_within_0.03", "ctr_mean_abs_diff"} <= set(metrics)   # the phantom's CTR check ran

    # Originals above reconstructions, 8 per row: 2 x 8 tiles of 64 px with 2 px padding.
    grids = sorted((workdir / "reconstructions").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000010.png", "step_0000020.png"]
    grid = _png(grids[-1])
    assert grid.shape == (2 * 66 + 2, 8 * 66 + 2)
    assert not np.array_equal(grid[2:66], grid[68:132])   # reconstructions are not copies of the input

    # The scaling factor makes the training latents (posterior samples) unit-variance.
    model, params, loaded_scale = generate.load_vae(workdir / "export", config)
    assert loaded_scale == scale
    images = next(iter(pipeline.make_dataset(config.data, "train", train=False, seed=0, batch_size=64,
                                             data_dir=config.data.data_dir)))["image"]
    mean, logvar = model.apply({"params": params}, images, method=model.encode)
    assert float(jnp.std(mean * scale)) < 1.05   # the posterior noise adds the rest of the variance
    assert 0.5 < float(jnp.sqrt(jnp.var(mean) + jnp.mean(jnp.exp(logvar)))) * scale < 1.5


def test_dit_end_to_end_writes_latent_cache_grids_and_export(trained_dit, trained_vae):
    workdir, config, result = trained_dit
    vae_info = checkpoint.load_export_info(trained_vae[0] / "export")
    positives = pipeline.metadata_table(config.data, "train", data_dir=config.data.data_dir).positives("Cardiomegaly")
    cache = json.loads((workdir / "latents" / dit.CACHE_INFO).read_text())
    assert cache["count"] == len(positives) == result["latents"] > 0   # the target class only
    assert cache["latent_shape"] == [8, 8, 4] and cache["scaling_factor"] == vae_info["scaling_factor"]

    grids = sorted((workdir / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000010.png", "step_0000020.png"]
    assert _png(grids[-1]).shape == (4 * 66 + 2, 4 * 66 + 2)

    model, params, info = factory.load_export(workdir / "export", kind="dit")
    assert info["kind"] == "dit" and info["weights"] == "ema" and info["trained_steps"] == TINY_DIT_STEPS
    assert info["class_names"] == [] and info["target_class"] == "Cardiomegaly" and model.num_classes == 0
    assert info["scaling_factor"] == vae_info["scaling_factor"]
    assert info["vae_dir"] == str(trained_vae[0] / "export")
    losses = _train_losses(workdir, "dit")
    assert sorted(losses) == list(range(1, TINY_DIT_STEPS + 1)) and all(np.isfinite(list(losses.values())))


def test_dit_loss_is_the_same_on_one_device_and_on_an_fsdp_mesh(trained_dit, tmp_path):
    """The first steps of the (1, 8, 1) FSDP run, repeated on one device from the same latent cache."""
    workdir, fsdp_config, _ = trained_dit
    config = fsdp_config.copy_and_resolve_references()
    config.mesh.shape = (1, 1, 1)
    config.dit.latent_cache_dir = str(workdir / "latents")
    # Warmup is 100 steps, so the learning rate of these first steps does not depend on the total.
    assert config.dit.train.warmup_steps > FIRST_STEPS_COMPARED
    config.dit.train.update(steps=FIRST_STEPS_COMPARED, eval_every=0)
    vae_dir = checkpoint.load_export_info(workdir / "export")["vae_dir"]
    dit.train_dit(config, tmp_path, vae_dir=vae_dir, mesh=_one_device_mesh())
    assert not (tmp_path / "latents").exists()   # the cache was reused, so both runs saw the same latents
    single, sharded = _train_losses(tmp_path, "dit"), _train_losses(workdir, "dit")
    steps = list(range(1, FIRST_STEPS_COMPARED + 1))
    assert sorted(single) == steps
    np.testing.assert_allclose([single[s] for s in steps], [sharded[s] for s in steps], rtol=2e-5)
    assert len({round(sharded[s], 6) for s in steps}) > 1   # the steps differ, so the comparison has teeth


def test_class_conditional_labels_put_the_target_first_and_images_without_findings_in_their_own_class():
    names = ("Effusion", "Cardiomegaly", "Nodule")
    classes = dit.conditioning_classes(names)
    assert classes == ("Effusion", "Cardiomegaly", "Nodule", "No Finding")
    assert dit.conditioning_classes(("Cardiomegaly", "No Finding")) == ("Cardiomegaly", "No Finding")
    rows = np.array([[0, 0, 0], [1, 1, 0], [1, 0, 1], [0, 0, 1], [0, 1, 1]], np.float32)
    got = dit.conditioning_labels(rows, names, classes, "Cardiomegaly")
    assert [classes[i] for i in got] == ["No Finding", "Cardiomegaly", "Effusion", "Nodule", "Cardiomegaly"]


def test_latent_cache_is_reused_when_unchanged_and_rebuilt_when_the_vae_changes(trained_vae, tmp_path):
    vae_workdir, config, _ = trained_vae
    vae_dir = tmp_path / "vae_export"
    params, info = checkpoint.load_export(vae_workdir / "export")
    checkpoint.save_export(vae_dir, params, info)
    config = config.copy_and_resolve_references()
    config.dit.latent_cache_dir = str(tmp_path / "latents")
    mesh = sharding.make_mesh((-1, 1, 1))
    build = lambda: dit.build_latent_cache(config, tmp_path, str(vae_dir), mesh=mesh,  # noqa: E731
                                           class_names=(), only_class="Cardiomegaly")
    records = tmp_path / "latents" / dit.CACHE_FILE

    cache_dir, first = build()
    written = records.stat().st_mtime_ns
    _, again = build()
    assert again == first and records.stat().st_mtime_ns == written   # same inputs: not re-encoded

    # The VAE retrained into the same folder (its weights change, its model.json need not).
    checkpoint.save_export(vae_dir, jax.tree.map(lambda p: p * 1.01, params), info)
    _, retrained = build()
    assert records.stat().st_mtime_ns != written
    assert retrained["fingerprint"] != first["fingerprint"]

    # A different scaling factor in the export is picked up too.
    changed = dict(info, scaling_factor=2 * info["scaling_factor"])
    (vae_dir / checkpoint.EXPORT_INFO).write_text(json.dumps(changed))
    _, rescaled = build()
    assert rescaled["scaling_factor"] == pytest.approx(2 * info["scaling_factor"])
    assert rescaled["count"] == first["count"]


# --------------------------------------------------------------------------------------------------
# The classifier learns an easy task
# --------------------------------------------------------------------------------------------------
def test_classifier_reaches_high_auc_on_an_easy_phantom(phantom_data_dir, tmp_path):
    tiny_configs.prepare_easy_phantom(phantom_data_dir)
    config = tiny_configs.easy_classifier_config(phantom_data_dir, steps=250)
    results = classifier.train_classifier(config, tmp_path, mesh=_one_device_mesh())
    assert results["test_auc"]["Cardiomegaly"] >= 0.95, results


def test_latent_cache_fingerprint_follows_the_scarcity_axis(tmp_path):
    from configs import base
    vae_dir = tmp_path / "vae_export"
    checkpoint.save_export(vae_dir, {"w": np.zeros(2, np.float32)}, {"kind": "vae"})
    config = base.get_config()
    fingerprints = [dit._cache_fingerprint(config, vae_dir, (), "Cardiomegaly")]
    config.data.target_fraction = 0.5
    fingerprints.append(dit._cache_fingerprint(config, vae_dir, (), "Cardiomegaly"))
    config.data.target_fraction_seed = 1
    fingerprints.append(dit._cache_fingerprint(config, vae_dir, (), "Cardiomegaly"))
    assert len({json.dumps(f, sort_keys=True) for f in fingerprints}) == 3
