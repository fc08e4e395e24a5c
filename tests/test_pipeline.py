"""The Grain pipeline on a small prepared phantom: batches, determinism, filtering, balancing, mixing,
checkpoint/resume, process sharding onto the 8 fake devices, worker processes, and its errors."""

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from xray_dit import sharding
from xray_dit.data import DataError, builders, phantom, pipeline, split_rows, splits, synthetic
from xray_dit.data import synthetic as synthetic_lib
from xray_dit.data.builders import common, cxr_phantom

SIZE = 32
NUM_IMAGES = 400
LABELS = ("Cardiomegaly", "Effusion")
NO_AUGMENT = dict(rotation_deg=0.0, scale=0.0, translate=0.0, brightness=0.0, contrast=0.0, hflip=False)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """400 phantom images at 32 px; Cardiomegaly common (25 %), no Nodule at all, no label noise."""
    directory = tmp_path_factory.mktemp("tfds")
    spec = phantom.PhantomSpec(cardiomegaly_prevalence=0.25, nodule_prevalence=0.0, label_noise=0.0)
    builders.prepare("cxr_phantom", cxr_phantom.PhantomConfig(name="32_pipe", size=SIZE, num_images=NUM_IMAGES,
                                                              spec=spec), data_dir=directory, prepare_workers=0)
    return directory


def data_config(data_dir, **overrides):
    config = ml_collections.ConfigDict(dict(
        name="cxr_phantom", builder_config="32_pipe", data_dir=str(data_dir), manual_dir="", image_size=SIZE,
        labels=LABELS, target_class="Cardiomegaly", balanced_sampling=False, num_workers=0,
        augment=dict(rotation_deg=5.0, scale=0.05, translate=0.03, brightness=0.05, contrast=0.05, hflip=False)))
    config.update(overrides)
    return config


def take(dataset, count):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(count)]


def unaugmented(data_dir, split, indices):
    """The stored images of these records, as the pipeline's [-1, 1] floats."""
    source = builders.load_prepared("cxr_phantom", "32_pipe", data_dir=data_dir).as_data_source(split=split)
    return np.stack([source[int(i)]["image"] for i in indices]).astype(np.float32) / 127.5 - 1.0


def test_batches_hold_numeric_arrays_that_match_the_records(data_dir):
    table = pipeline.metadata_table(data_config(data_dir), "train")
    batch = take(pipeline.make_dataset(data_config(data_dir), "train", train=True, seed=0, batch_size=16), 1)[0]
    assert set(batch) == {"image", "labels", "label_mask", "index", "is_synthetic", "valid"}
    assert batch["image"].shape == (16, SIZE, SIZE, 1) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
    assert batch["labels"].shape == batch["label_mask"].shape == (16, 2)
    for key in ("index", "is_synthetic", "valid"):
        assert batch[key].dtype == np.int32 and batch[key].shape == (16,)
    assert all(np.issubdtype(v.dtype, np.number) for v in batch.values())
    columns = table.label_columns(LABELS)
    np.testing.assert_array_equal(batch["labels"], table.labels[batch["index"]][:, columns])
    assert not batch["is_synthetic"].any() and batch["valid"].all()


def test_evaluation_covers_every_image_once_unaugmented_and_padded(data_dir):
    table = pipeline.metadata_table(data_config(data_dir), "validation")
    batches = list(pipeline.make_dataset(data_config(data_dir), "validation", train=False, seed=0, batch_size=16))
    valid = np.concatenate([b["valid"] for b in batches]).astype(bool)
    indices = np.concatenate([b["index"] for b in batches])[valid]
    np.testing.assert_array_equal(np.sort(indices), np.arange(len(table)))
    assert all(b["image"].shape[0] == 16 for b in batches) and (~valid).sum() == -len(table) % 16
    images = np.concatenate([b["image"] for b in batches])[valid]
    np.testing.assert_allclose(images, unaugmented(data_dir, "validation", indices), atol=1e-6)


def test_same_seed_same_batches_and_augmentation_is_applied(data_dir):
    config = data_config(data_dir)
    first, again = (take(pipeline.make_dataset(config, "train", train=True, seed=1, batch_size=16), 3) for _ in "ab")
    other = take(pipeline.make_dataset(config, "train", train=True, seed=2, batch_size=16), 1)[0]
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(first[0]["index"], other["index"])
    stored = unaugmented(data_dir, "train", first[0]["index"])
    assert np.abs(first[0]["image"] - stored).mean() > 0.01  # jittered
    plain = take(pipeline.make_dataset(data_config(data_dir, augment=NO_AUGMENT), "train", train=True, seed=1,
                                       batch_size=16), 1)[0]
    np.testing.assert_array_equal(plain["index"], first[0]["index"])  # augmentation does not change the order
    np.testing.assert_allclose(plain["image"], stored, atol=1e-6)     # all-zero magnitudes are the identity


def test_horizontal_flip_only_when_asked(data_dir):
    config = data_config(data_dir, augment={**NO_AUGMENT, "hflip": True})
    batch = take(pipeline.make_dataset(config, "train", train=True, seed=0, batch_size=32), 1)[0]
    stored = unaugmented(data_dir, "train", batch["index"])
    same = [np.allclose(a, b, atol=1e-6) for a, b in zip(batch["image"], stored)]
    mirrored = [np.allclose(a, b[:, ::-1], atol=1e-6) for a, b in zip(batch["image"], stored)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)


def test_only_class_keeps_one_class_and_empty_class_fails(data_dir):
    table = pipeline.metadata_table(data_config(data_dir), "train")
    dataset = pipeline.make_dataset(data_config(data_dir), "train", train=True, seed=0, batch_size=8,
                                    only_class="Cardiomegaly")
    for batch in take(dataset, 5):
        assert (batch["labels"][:, 0] == 1).all()
        assert set(batch["index"]) <= set(table.positives("Cardiomegaly"))
    with pytest.raises(DataError, match="no image known positive for 'Nodule'"):
        pipeline.make_dataset(data_config(data_dir), "train", train=True, seed=0, batch_size=8, only_class="Nodule")


def test_balanced_sampling_evens_out_classes(data_dir):
    def effusion_share(balanced):
        dataset = pipeline.make_dataset(data_config(data_dir, balanced_sampling=balanced), "train", train=True,
                                        seed=0, batch_size=32)
        return np.concatenate([b["labels"][:, 1] for b in take(dataset, 20)]).mean()
    # Groups: Cardiomegaly, Effusion, neither → each about a third of the draws; natural share ~12 %.
    assert effusion_share(False) < 0.2
    assert 0.25 < effusion_share(True) < 0.45


def test_mixing_synthetic_by_count_and_ratio(data_dir, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 48, 48), dtype=np.uint8)  # another resolution: resized on read
    synthetic.write_synthetic(tmp_path / "synth", images, ["Cardiomegaly"] * 10, {"seed": list(range(10))})
    config = data_config(data_dir)
    num_real = len(pipeline.metadata_table(config, "validation"))

    def synthetic_entries(**kwargs):
        batches = list(pipeline.make_dataset(config, "validation", train=False, seed=0, batch_size=16,
                                             synthetic=tmp_path / "synth", **kwargs))
        keep = np.concatenate([b["valid"] & b["is_synthetic"] for b in batches]).astype(bool)
        stacked = {k: np.concatenate([b[k] for b in batches])[keep] for k in batches[0]}
        real = sum(int((b["valid"] & (1 - b["is_synthetic"])).sum()) for b in batches)
        return stacked, real

    mixed, real = synthetic_entries(synthetic_count=25)
    assert len(mixed["index"]) == 25 and real == num_real
    assert set(np.bincount(mixed["index"], minlength=10)) <= {2, 3}
    np.testing.assert_array_equal(mixed["labels"], np.tile([1.0, 0.0], (25, 1)))
    assert mixed["image"].shape[1:] == (SIZE, SIZE, 1)
    assert len(synthetic_entries(synthetic_ratio=0.5)[0]["index"]) == round(0.5 * num_real)
    assert len(synthetic_entries()[0]["index"]) == 10

    source = synthetic.SyntheticSource(tmp_path / "synth", ("Cardiomegaly", "Effusion"), unlisted="unknown")
    np.testing.assert_array_equal(source.label_mask[0], [1.0, 0.0])
    assert source.rows[3]["seed"] == "3" and source.table.image_id[3] == "synthetic_000003.png"
    with pytest.raises(DataError, match="does not have"):
        synthetic.SyntheticSource(tmp_path / "synth", ("Effusion",))


def test_iterator_checkpoint_resumes_with_the_same_batches(data_dir, tmp_path):
    def make():
        return iter(pipeline.make_dataset(data_config(data_dir), "train", train=True, seed=0, batch_size=16))
    iterator = make()
    take_from = lambda it, n: [next(it) for _ in range(n)]  # noqa: E731
    take_from(iterator, 3)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = take_from(iterator, 2)

    resumed = make()
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    for want, got in zip(expected, take_from(resumed, 2)):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_process_shards_form_the_global_batch_on_8_devices(data_dir):
    config = data_config(data_dir)
    single = take(pipeline.make_dataset(config, "test", train=False, seed=0, batch_size=16), 2)
    shards = [take(pipeline.make_dataset(config, "test", train=False, seed=0, batch_size=16, process_index=p,
                                         process_count=2), 2) for p in range(2)]
    for step, batch in enumerate(single):
        assert shards[0][step]["image"].shape[0] == 8
        union = np.concatenate([shards[0][step]["index"], shards[1][step]["index"]])
        assert sorted(union) == sorted(batch["index"])

    mesh = sharding.make_mesh((8, 1, 1))
    assert len(jax.devices()) == 8
    global_batch = sharding.host_to_global(single[0], mesh)
    image = global_batch["image"]
    assert image.shape == (16, SIZE, SIZE, 1) and len(image.addressable_shards) == 8
    assert image.sharding.spec == jax.sharding.PartitionSpec(sharding.BATCH_AXES, None, None, None)
    np.testing.assert_array_equal(np.asarray(image), single[0]["image"])
    np.testing.assert_array_equal(np.asarray(global_batch["index"]), single[0]["index"])


def test_worker_processes_give_the_same_batches(data_dir):
    config = data_config(data_dir)
    expected = take(pipeline.make_dataset(config, "train", train=True, seed=0, batch_size=16), 4)
    for workers in (1, 2):
        iterator = iter(pipeline.make_dataset(config, "train", train=True, seed=0, batch_size=16,
                                              num_workers=workers))
        try:
            for want in expected:
                got = next(iterator)
                for key in want:
                    np.testing.assert_array_equal(want[key], got[key])
        finally:
            iterator.close()


def test_epochs_reshuffle_and_balanced_groups_are_uniform():
    plan = pipeline._EpochPlan(real=np.arange(100), groups=None, synthetic=np.zeros(0, np.int64), shuffle=True,
                               seed=0, pad_to=1)
    first, second = plan.entries(0), plan.entries(1)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(np.sort(first[:, 1]), np.sort(second[:, 1]))
    groups = (np.array([0]), np.arange(1, 100))  # one image vs 99 images
    balanced = pipeline._EpochPlan(real=np.arange(100), groups=groups, synthetic=np.zeros(0, np.int64),
                                   shuffle=True, seed=0, pad_to=1)
    draws = np.concatenate([balanced.entries(e)[:, 1] for e in range(20)])
    assert 0.4 < np.mean(draws == 0) < 0.6


def test_clear_errors(data_dir, tmp_path):
    config = data_config(data_dir)
    with pytest.raises(DataError, match="fewer than one global batch"):
        pipeline.make_dataset(config, "validation", train=True, seed=0, batch_size=4096)
    with pytest.raises(DataError, match="unknown label.*--config.data.labels"):
        pipeline.make_dataset(data_config(data_dir, labels=("Cardiomegally",)), "train", train=True, seed=0,
                              batch_size=8)
    with pytest.raises(DataError, match="holds 32x32"):
        pipeline.make_dataset(data_config(data_dir, image_size=64), "train", train=True, seed=0, batch_size=8)
    with pytest.raises(DataError, match="no split 'dev'"):
        pipeline.make_dataset(config, "dev", train=True, seed=0, batch_size=8)
    with pytest.raises(builders.NotPreparedError, match="python -m xray_dit.data.builders.prepare"):
        pipeline.make_dataset(data_config(tmp_path), "train", train=True, seed=0, batch_size=8)
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        pipeline.make_dataset(config, "train", train=True, seed=0, batch_size=16, process_index=0, process_count=3)


def _split_file(tmp_path, data_dir):
    """Folds drawn across the prepared splits by patient: "fold_a" takes patients of train and test, "fold_b"
    the rest of test and all of validation; the other train patients are left out."""
    tables = {s: pipeline.metadata_table(data_config(data_dir), s) for s in ("train", "validation", "test")}
    train_patients = sorted(set(tables["train"].patient_id))
    chosen = set(train_patients[:40])
    test_patients = sorted(set(tables["test"].patient_id))
    split_of = {}
    for split, table in tables.items():
        for image_id, patient in zip(table.image_id, table.patient_id):
            if split == "train" and patient in chosen or split == "test" and patient in test_patients[:10]:
                split_of[image_id] = "fold_a"
            elif split != "train":
                split_of[image_id] = "fold_b"
    path = tmp_path / "folds.csv"
    split_rows.write_split_file(path, split_of)
    return path, split_of, tables


def test_a_split_file_redraws_the_splits_across_prepared_ones(data_dir, tmp_path):
    path, split_of, tables = _split_file(tmp_path, data_dir)
    config = data_config(data_dir, split_file=str(path))
    assert split_rows.read_split_file(path) == split_of
    every_image = {i: (s, n) for s, t in tables.items() for n, i in enumerate(t.image_id)}
    for fold in ("fold_a", "fold_b"):
        table = pipeline.metadata_table(config, fold)
        assert sorted(table.image_id) == sorted(i for i, f in split_of.items() if f == fold)
        # The prepared order: prepared split by prepared split, record index within each.
        order = [every_image[i] for i in table.image_id]
        assert order == sorted(order, key=lambda sn: (list(tables).index(sn[0]), sn[1]))
        # Every record index of a batch is that record's row of the table: image and labels agree.
        batches = list(pipeline.make_dataset(config, fold, train=False, seed=0, batch_size=16))
        index = np.concatenate([b["index"][b["valid"] == 1] for b in batches])
        np.testing.assert_array_equal(index, np.arange(len(table)))
        labels = np.concatenate([b["labels"][b["valid"] == 1] for b in batches])
        np.testing.assert_array_equal(labels, table.labels[:, table.label_columns(LABELS)])
        images = np.concatenate([b["image"][b["valid"] == 1][..., 0] for b in batches])
        for row in (0, len(table) - 1):
            prepared, record = every_image[table.image_id[row]]
            np.testing.assert_allclose(images[row], unaugmented(data_dir, prepared, [record])[0, ..., 0], atol=1e-6)
    with pytest.raises(DataError, match="no split 'train'.*fold_a"):
        pipeline.metadata_table(config, "train")
    assert len(take(pipeline.make_dataset(config, "fold_a", train=True, seed=0, batch_size=8), 3)) == 3


def test_a_split_file_that_leaks_a_patient_or_names_unknown_images_is_refused(data_dir, tmp_path):
    path, split_of, tables = _split_file(tmp_path, data_dir)
    patient_of = {i: p for t in tables.values() for i, p in zip(t.image_id, t.patient_id)}
    # A fold_a patient with two images: one of them moved to fold_b puts the patient in both.
    images_of = {}
    for image_id, fold in split_of.items():
        if fold == "fold_a":
            images_of.setdefault(patient_of[image_id], []).append(image_id)
    first_a, sibling = next(images for images in images_of.values() if len(images) > 1)[:2]
    leaky = tmp_path / "leaky.csv"
    split_rows.write_split_file(leaky, {**split_of, sibling: "fold_b"})
    with pytest.raises(splits.PatientLeakError, match=f"{patient_of[first_a]}: fold_a, fold_b"):
        pipeline.make_dataset(data_config(data_dir, split_file=str(leaky)), "fold_a", train=False, seed=0,
                              batch_size=8)
    unknown = tmp_path / "unknown.csv"
    split_rows.write_split_file(unknown, {**split_of, "not_an_image.png": "fold_a"})
    with pytest.raises(DataError, match="1 image.*not_an_image.png"):
        pipeline.metadata_table(data_config(data_dir, split_file=str(unknown)), "fold_a")
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("image,fold\nx,a\n")
    with pytest.raises(DataError, match="header must be image_id,split"):
        split_rows.read_split_file(bad_header)


class LeakyCxr(common.CxrBuilder, skip_registration=True):
    """A deliberately broken dataset: patient p2 is in train and test."""
    name = "leaky_cxr"
    LABELS = ("Cardiomegaly",)
    BUILDER_CONFIGS = [common.CxrConfig(name="8", size=8)]

    def _split_generators(self, dl_manager):
        return {"train": self._records(["p1", "p2"]), "test": self._records(["p2", "p3"])}

    def _records(self, patients):
        for patient in patients:
            yield patient, {"image": common.encode_png(np.zeros((8, 8), np.uint8)), "image_id": f"{patient}_0",
                            "patient_id": patient, "labels": np.ones(1, np.float32),
                            "label_mask": np.ones(1, np.float32), "age": 50.0, "sex": "F", "view": "PA"}


def test_patient_in_two_splits_is_refused_on_load(tmp_path, monkeypatch):
    LeakyCxr(data_dir=str(tmp_path)).download_and_prepare(download_config=tfds.download.DownloadConfig())
    monkeypatch.setitem(builders.BUILDERS, "leaky_cxr", LeakyCxr)
    with pytest.raises(splits.PatientLeakError, match="p2: test, train"):
        pipeline.make_dataset({"name": "leaky_cxr/8", "data_dir": str(tmp_path)}, "train", train=False, seed=0,
                              batch_size=2)


def test_write_synthetic_converts_floats_and_round_trips(tmp_path):
    floats = np.linspace(-1, 1, 2 * 16 * 16).reshape(2, 16, 16, 1)
    manifest = synthetic.write_synthetic(tmp_path, floats, ["Effusion", "Cardiomegaly|Effusion"])
    assert manifest.name == "manifest.csv" and not (tmp_path / "manifest.csv.partial").exists()
    source = synthetic.SyntheticSource(tmp_path, ("Cardiomegaly", "Effusion"))
    np.testing.assert_array_equal(source.labels, [[0, 1], [1, 1]])
    pixels = np.asarray(Image.open(tmp_path / "synthetic_000001.png"))
    np.testing.assert_array_equal(pixels, np.round((floats[1, ..., 0] + 1) * 127.5).astype(np.uint8))


def test_target_fraction_of_training_patients_leaves_validation_and_test_alone(data_dir):
    config = data_config(data_dir)
    tables = {split: pipeline.metadata_table(config, split) for split in ("train", "validation", "test")}
    held_out = {split: (t.image_id.copy(), t.labels.copy()) for split, t in tables.items() if split != "train"}
    train = tables["train"]
    positive_patients = set(train.patient_id[train.positives("Cardiomegaly")])
    kept = splits.target_fraction_patients(train, "Cardiomegaly", 0.25, seed=0)
    kept_positive = set(train.patient_id[kept]) & positive_patients
    assert len(kept_positive) == round(0.25 * len(positive_patients))
    dropped = ~np.isin(np.arange(len(train)), kept)
    assert not set(train.patient_id[dropped]) & set(train.patient_id[kept]), "patients are kept or dropped whole"
    assert set(train.patient_id[dropped]) <= positive_patients
    for split, (image_ids, labels) in held_out.items():
        again = pipeline.metadata_table(config, split)
        np.testing.assert_array_equal(again.image_id, image_ids)
        np.testing.assert_array_equal(again.labels, labels)


def _all_rows(dataset):
    """Every valid element of a finite pipeline, stacked."""
    batches = list(dataset)
    valid = np.concatenate([b["valid"] for b in batches]).astype(bool)
    return {k: np.concatenate([b[k] for b in batches])[valid] for k in batches[0]}


def test_target_fraction_thins_the_train_split_for_every_reader_and_nothing_else(data_dir):
    whole, thin = data_config(data_dir), data_config(data_dir, target_fraction=0.5, target_fraction_seed=3)
    full, table = pipeline.metadata_table(whole, "train"), pipeline.metadata_table(thin, "train")
    kept = splits.target_fraction_patients(full, "Cardiomegaly", 0.5, seed=3)
    np.testing.assert_array_equal(table.image_id, full.image_id[kept])
    np.testing.assert_array_equal(table.labels, full.labels[kept])
    positive_patients = set(full.patient_id[full.positives("Cardiomegaly")])
    dropped = set(full.patient_id) - set(table.patient_id)
    assert dropped and dropped <= positive_patients, "only target patients leave, each with all their images"
    assert len(set(table.patient_id) & positive_patients) == round(0.5 * len(positive_patients))

    record_of = {image_id: i for i, image_id in enumerate(full.image_id)}
    rows = _all_rows(pipeline.make_dataset(thin, "train", train=False, seed=0, batch_size=16))
    np.testing.assert_array_equal(rows["index"], np.arange(len(table)))   # the batch index is the table's row
    np.testing.assert_array_equal(rows["labels"], table.labels[:, :2])
    np.testing.assert_allclose(rows["image"],
                               unaugmented(data_dir, "train", [record_of[i] for i in table.image_id]), atol=1e-6)
    trained = take(pipeline.make_dataset(data_config(data_dir, augment=NO_AUGMENT, target_fraction=0.5,
                                                     target_fraction_seed=3), "train", train=True, seed=0,
                                         batch_size=16), 2)
    for batch in trained:
        records = [record_of[i] for i in table.image_id[batch["index"]]]
        np.testing.assert_allclose(batch["image"], unaugmented(data_dir, "train", records), atol=1e-6)
        np.testing.assert_array_equal(batch["labels"], table.labels[batch["index"]][:, :2])

    positives = _all_rows(pipeline.make_dataset(thin, "train", train=False, seed=0, batch_size=16,
                                                only_class="Cardiomegaly"))
    np.testing.assert_array_equal(np.sort(positives["index"]), table.positives("Cardiomegaly"))
    assert len(positives["index"]) < len(full.positives("Cardiomegaly"))

    for split in ("validation", "test"):
        np.testing.assert_array_equal(pipeline.metadata_table(thin, split).image_id,
                                      pipeline.metadata_table(whole, split).image_id)
        untouched = _all_rows(pipeline.make_dataset(thin, split, train=False, seed=0, batch_size=16))
        np.testing.assert_array_equal(untouched["index"], np.arange(len(pipeline.metadata_table(whole, split))))


def _write_inverted_store(data_dir, folder, *, drop_last=False):
    """A round-trip store whose every image is its real image inverted (unmistakable when swapped in)."""
    table = pipeline.metadata_table(data_config(data_dir), "train")
    stored = unaugmented(data_dir, "train", range(len(table)))
    count = len(table) - int(drop_last)
    synthetic.write_synthetic(folder, -stored[:count], [""] * count, {"image_id": list(table.image_id[:count])},
                              prefix="roundtrip")
    return stored


def test_roundtrip_prob_swaps_real_images_for_their_stored_round_trip(data_dir, tmp_path):
    stored = _write_inverted_store(data_dir, tmp_path / "store")
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE), dtype=np.uint8)
    synthetic.write_synthetic(tmp_path / "synth", images, ["Cardiomegaly"] * 4)

    def batches(augment, prob, count=3):
        config = data_config(data_dir, augment=augment, roundtrip_dir=str(tmp_path / "store"), roundtrip_prob=prob)
        return take(pipeline.make_dataset(config, "train", train=True, seed=5, batch_size=16,
                                          synthetic=tmp_path / "synth", synthetic_count=8), count)

    today = take(pipeline.make_dataset(data_config(data_dir), "train", train=True, seed=5, batch_size=16,
                                       synthetic=tmp_path / "synth", synthetic_count=8), 3)
    for before, after in zip(today, batches(data_config(data_dir).augment.to_dict(), 0.0)):
        for key in before:
            np.testing.assert_array_equal(before[key], after[key])

    swapped = unswapped = 0
    for prob in (1.0, 0.5):
        for batch in batches(NO_AUGMENT, prob, count=6):
            for image, index, is_synthetic in zip(batch["image"], batch["index"], batch["is_synthetic"]):
                if is_synthetic:
                    np.testing.assert_allclose(image[..., 0], images[index] / np.float32(127.5) - 1, atol=1e-6)
                elif np.allclose(image, -stored[index], atol=1e-5):
                    swapped += 1
                else:
                    np.testing.assert_allclose(image, stored[index], atol=1e-6)
                    assert prob < 1, "with roundtrip_prob 1 every real image is the stored one"
                    unswapped += 1
    assert swapped > 16 * 6 * 0.5 and unswapped > 10   # p=1 swaps all real; p=0.5 about half
    for before, after in zip(batches(NO_AUGMENT, 0.5), batches(NO_AUGMENT, 0.5)):
        np.testing.assert_array_equal(before["image"], after["image"])
    evaluation = pipeline.make_dataset(data_config(data_dir, augment=NO_AUGMENT, roundtrip_dir=str(tmp_path / "store"),
                                                   roundtrip_prob=1.0), "train", train=False, seed=0, batch_size=16)
    np.testing.assert_allclose(_all_rows(evaluation)["image"], stored, atol=1e-6)  # evaluation never swaps


def test_roundtrip_swap_mask_is_a_pure_function_of_seed_and_epoch():
    from xray_dit.data import roundtrip
    first = roundtrip.swap_mask(1, 0, 1000, 0.3)
    np.testing.assert_array_equal(first, roundtrip.swap_mask(1, 0, 1000, 0.3))
    assert 0.25 < first.mean() < 0.35 and not np.array_equal(first, roundtrip.swap_mask(1, 1, 1000, 0.3))
    assert not roundtrip.swap_mask(1, 0, 1000, 0.0).any() and roundtrip.swap_mask(1, 0, 1000, 1.0).all()
    plan = pipeline._EpochPlan(real=np.arange(50), groups=None, synthetic=np.arange(10), shuffle=True, seed=2,
                               pad_to=1, roundtrip_prob=1.0)
    kinds = plan.entries(0)[:, 0]
    assert (kinds == pipeline._SYNTHETIC).sum() == 10 and (kinds == pipeline._ROUNDTRIP).sum() == 50


def test_scarcity_and_roundtrip_errors(data_dir, tmp_path):
    _write_inverted_store(data_dir, tmp_path / "store", drop_last=True)
    config = data_config(data_dir, roundtrip_dir=str(tmp_path / "store"), roundtrip_prob=0.5)
    with pytest.raises(ValueError, match="lacks 1 of the"):
        pipeline.make_dataset(config, "train", train=True, seed=0, batch_size=16)
    with pytest.raises(DataError, match="needs data.roundtrip_dir"):
        pipeline.DataConfig.from_config(data_config(data_dir, roundtrip_prob=0.5))
    with pytest.raises(DataError, match="needs data.target_class"):
        pipeline.DataConfig.from_config(data_config(data_dir, target_class="", target_fraction=0.5))
    with pytest.raises(DataError, match="target_fraction=1.5 must lie in"):
        pipeline.metadata_table(data_config(data_dir, target_fraction=1.5), "train")


SMALL_NAME = "32_failures"


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory):
    """60 phantom images at 32 px, a quarter of them Cardiomegaly."""
    directory = tmp_path_factory.mktemp("tfds")
    builders.prepare("cxr_phantom", cxr_phantom.PhantomConfig(
        name=SMALL_NAME, size=32, num_images=60, spec=phantom.PhantomSpec(cardiomegaly_prevalence=0.25)),
        data_dir=directory, prepare_workers=0)
    return directory


def _small_data_config(data_dir):
    return {"name": "cxr_phantom", "builder_config": SMALL_NAME, "data_dir": str(data_dir),
            "labels": ("Cardiomegaly", "Effusion", "Nodule")}


def test_an_undecodable_synthetic_image_is_named_when_it_is_read(small_data_dir, tmp_path):
    folder = tmp_path / "synthetic"
    synthetic_lib.write_synthetic(folder, np.zeros((4, 32, 32), np.uint8), ["Cardiomegaly"] * 4)
    broken = folder / "synthetic_000002.png"
    broken.write_bytes(broken.read_bytes()[:40])
    dataset = pipeline.make_dataset(_small_data_config(small_data_dir), "validation", train=False, seed=0, batch_size=8,
                                    synthetic=folder)
    with pytest.raises(common.BadImageError) as error:
        list(dataset)
    assert f"synthetic image {broken} cannot be decoded" in str(error.value)
    assert "remove its row from" in str(error.value) and str(folder / synthetic_lib.MANIFEST) in str(error.value)


def test_a_class_filter_that_leaves_less_than_one_batch_is_a_clear_error(small_data_dir):
    config = _small_data_config(small_data_dir)
    train = len(pipeline.metadata_table(config, "train"))
    positives = len(pipeline.metadata_table(config, "train").positives("Cardiomegaly"))
    assert 0 < positives < 16 <= train          # the whole split fills a batch; its Cardiomegaly images do not
    next(iter(pipeline.make_dataset(config, "train", train=True, seed=0, batch_size=16)))
    with pytest.raises(DataError) as error:
        pipeline.make_dataset(config, "train", train=True, seed=0, batch_size=16, only_class="Cardiomegaly")
    assert f"has {positives} images after filtering/mixing, fewer than one global batch of 16" in str(error.value)
    assert "lower the batch size or add data" in str(error.value)
