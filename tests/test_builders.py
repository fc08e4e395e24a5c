"""TFDS builders against fixtures in each dataset's real on-disk layout (written here) and the real NIH sample;
radiographs in other pixel formats, unreadable files, hostile rows and label tables (builders/common.py and the
dataset builders)."""

import csv
import io
import logging
import os
import re
import signal
import subprocess
import struct
import sys
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from xray_dit.data import DataError, builders, phantom, splits
from xray_dit.data.builders import chexpert, common, cxr_phantom, medmnist, nih_chestxray14

NIH_HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                   "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
NIH_HEADER_2020 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                   "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NIH_PATIENTS = 100  # two images each → 200 rows, so two bad rows are exactly the 1 % still accepted
NIH_TEST_PATIENTS = range(81, 101)
NIH_FINDINGS = ["Cardiomegaly|Effusion", "No Finding", "Nodule", "Hernia|Pneumonia", "No Finding"]
NIH_16 = nih_chestxray14.NihConfig(name="16", size=16)
CORRUPT, MISSING, DEEP, COLOUR, WIDE = "00000003_001.png", "00000005_000.png", "00000007_000.png", \
    "00000009_000.png", "00000011_000.png"


def _save_png(path, pixels, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path, format="PNG")


def _prepare(builder_cls, config, data_dir, manual_dir=None):
    builder = builder_cls(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual_dir) if manual_dir else None))
    return builder


def _read_all(builder, split):
    """Every record of a split, images decoded by TFDS itself (proves the files read back without TF)."""
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


# ---- NIH ChestX-ray14 ---------------------------------------------------------------------------


def write_nih(root, header, *, bad_extra=0, leak_patient=None):
    """200 rows of 100 patients in the download's layout: images_001/images and images_002/images."""
    rng = np.random.default_rng(0)
    lines, train_val, test = [header], [], []
    for patient in range(1, NIH_PATIENTS + 1):
        for follow_up in range(2):
            name = f"{patient:08d}_{follow_up:03d}.png"
            findings = NIH_FINDINGS[patient % len(NIH_FINDINGS)]
            view = "PA" if follow_up == 0 else "AP"
            age = f"{30 + patient % 50:03d}Y" if header == NIH_HEADER_2017 else str(30 + patient % 50)
            sex = "M" if patient % 2 else "F"
            line = f"{name},{findings},{follow_up},{patient},{age},{sex},{view},2500,2048,0.143,0.143"
            lines.append(line + ("," if header == NIH_HEADER_2017 else ""))
            (test if patient in NIH_TEST_PATIENTS or patient == leak_patient and follow_up else train_val).append(name)
            folder = root / ("images_001" if patient <= 50 else "images_002") / "images"
            if name == MISSING or (bad_extra and patient > NIH_PATIENTS - bad_extra and follow_up == 0):
                continue
            pixels = rng.integers(0, 256, (24, 24), dtype=np.uint8)
            if name == CORRUPT:
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(buffer.getvalue()[:60])  # truncated mid-stream
            elif name == DEEP:  # 16-bit gray using 12 bits, as DICOM exports do
                deep = np.full((24, 24), 300, np.uint16)
                deep[:, 12:] = 3000
                _save_png(folder / name, deep)
            elif name == COLOUR:
                _save_png(folder / name, np.repeat(pixels[..., None], 4, axis=2), mode="RGBA")
            elif name == WIDE:  # 48 wide: the centre crop must drop the white 12-column bands at both sides
                wide = np.zeros((24, 48), np.uint8)
                wide[:, :12] = wide[:, -12:] = 255
                _save_png(folder / name, wide)
            else:
                _save_png(folder / name, pixels)
    root.mkdir(parents=True, exist_ok=True)
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


@pytest.fixture(scope="session")
def nih_prepared(tmp_path_factory):
    """The fixture under both header variants, prepared at 16 px."""
    prepared = {}
    for variant, header in (("2017", NIH_HEADER_2017), ("2020", NIH_HEADER_2020)):
        base = tmp_path_factory.mktemp(f"nih_{variant}")
        manual = write_nih(base / "download", header)
        prepared[variant] = _prepare(nih_chestxray14.NihChestxray14, NIH_16, base / "tfds", manual)
    return prepared


def test_nih_fixture_splits_labels_and_skipped_rows(nih_prepared):
    builder = nih_prepared["2020"]
    records = {s: _read_all(builder, s) for s in ("train", "validation", "test")}
    # 200 rows, one corrupt and one missing (both in train_val); test = patients 81..100.
    assert len(records["test"]) == 40
    assert len(records["train"]) + len(records["validation"]) == 158
    assert len(records["validation"]) > 0
    patients = {s: {_text(r["patient_id"]) for r in rs} for s, rs in records.items()}
    splits.check_patient_disjoint(patients)
    assert patients["test"] == {str(p) for p in NIH_TEST_PATIENTS}

    by_id = {_text(r["image_id"]): r for rs in records.values() for r in rs}
    assert CORRUPT not in by_id and MISSING not in by_id
    labels = nih_chestxray14.LABELS
    record = by_id["00000010_000.png"]  # patient 10 → "Cardiomegaly|Effusion"
    assert [labels[i] for i in np.flatnonzero(record["labels"])] == ["Cardiomegaly", "Effusion"]
    assert record["labels"].dtype == np.float32 and record["label_mask"].tolist() == [1.0] * len(labels)
    assert [labels[i] for i in np.flatnonzero(by_id["00000011_001.png"]["labels"])] == ["No Finding"]
    assert _text(record["view"]) == "PA" and _text(by_id["00000010_001.png"]["view"]) == "AP"
    assert record["age"] == 40.0 and _text(record["sex"]) == "F"
    assert record["image"].shape == (16, 16, 1) and record["image"].dtype == np.uint8

    report = (builder.data_path / builders.REPORT_FILE).read_text()
    assert CORRUPT in report and "unreadable" in report and MISSING in report and "missing" in report
    summary = builder.info.metadata["prepare_report"]
    assert sum(s["bad"] for s in summary.values()) == 2 and summary["test"] == {"rows": 40, "bad": 0, "written": 40}
    assert builder.info.metadata["labels"] == list(labels)


def test_nih_image_conversion(nih_prepared):
    by_id = {_text(r["image_id"]): r
             for s in ("train", "validation", "test") for r in _read_all(nih_prepared["2020"], s)}
    deep = by_id[DEEP]["image"]
    assert deep.max() >= 250 and deep.min() <= 5  # 12-bit range stretched to 8 bits, not left near-black
    assert by_id[COLOUR]["image"].shape == (16, 16, 1)
    assert by_id[WIDE]["image"].max() < 30  # centre crop: the white side bands are cut, not squeezed in


def test_nih_header_variants_agree(nih_prepared):
    tables = {}
    for variant, builder in nih_prepared.items():
        tables[variant] = {s: sorted((_text(r["image_id"]), _text(r["patient_id"]), tuple(r["labels"]), float(r["age"]))
                                     for r in _read_all(builder, s)) for s in ("train", "validation", "test")}
    assert tables["2017"] == tables["2020"]


def test_nih_view_config(tmp_path):
    manual = write_nih(tmp_path / "download", NIH_HEADER_2020)
    builder = _prepare(nih_chestxray14.NihChestxray14, nih_chestxray14.NihConfig(name="16_pa", size=16, view="PA"),
                       tmp_path / "tfds", manual)
    views = {_text(r["view"]) for s in ("train", "validation", "test") for r in _read_all(builder, s)}
    assert views == {"PA"}
    assert builder.info.splits["test"].num_examples == 20


def test_nih_too_many_bad_rows_fails_and_leaves_nothing(tmp_path):
    manual = write_nih(tmp_path / "download", NIH_HEADER_2020, bad_extra=3)
    with pytest.raises(builders.TooManyBadRecordsError) as error:
        _prepare(nih_chestxray14.NihChestxray14, NIH_16, tmp_path / "tfds", manual)
    assert MISSING in str(error.value) and "00000100_000.png" in str(error.value)
    assert "\n" not in str(error.value) and isinstance(error.value, DataError)   # main prints it as one line
    config_dir = tmp_path / "tfds" / "nih_chestxray14" / "16"
    assert not config_dir.exists() or not any(config_dir.iterdir())
    with pytest.raises(builders.NotPreparedError, match="prepare"):
        builders.load_prepared("nih_chestxray14", "16", data_dir=tmp_path / "tfds")


def test_nih_leaking_split_lists_fail(tmp_path):
    manual = write_nih(tmp_path / "download", NIH_HEADER_2020, leak_patient=7)
    with pytest.raises(splits.PatientLeakError, match=r"\b7: test, (train|validation)") as error:
        _prepare(nih_chestxray14.NihChestxray14, NIH_16, tmp_path / "tfds", manual)
    assert "\n" not in str(error.value) and isinstance(error.value, DataError)


def test_missing_manual_folder_and_csv_say_where_and_how(tmp_path):
    with pytest.raises(builders.ManualDataMissingError) as error:
        _prepare(nih_chestxray14.NihChestxray14, "64", tmp_path / "tfds", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value) and "nihcc.app.box.com" in str(error.value)
    assert "--config.data.manual_dir=" in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(builders.ManualDataMissingError) as error:
        _prepare(nih_chestxray14.NihChestxray14, "64", tmp_path / "tfds", tmp_path / "empty")
    assert str(tmp_path / "empty" / "Data_Entry_2017.csv") in str(error.value)
    assert "images_001" in str(error.value)  # the instructions


def test_real_nih_sample(nih_sample_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("nih_real")
    builder = builders.prepare("nih_chestxray14/64", data_dir=data_dir, manual_dir=nih_sample_dir, prepare_workers=0)
    counts = {s: builder.info.splits[s].num_examples for s in ("train", "validation", "test")}
    assert counts["train"] + counts["validation"] == 847 and counts["test"] == 153
    assert 0 < counts["validation"] < 847 * 0.2
    # TFDS's public reader, by registered name, without TensorFlow.
    test = tfds.data_source("nih_chestxray14/64", split="test", data_dir=str(data_dir))
    assert len(test) == 153 and test[0]["image"].shape == (64, 64, 1)
    records = [r for s in ("train", "validation", "test") for r in _read_all(builder, s)]
    labels = np.stack([r["labels"] for r in records])
    names = list(nih_chestxray14.LABELS)
    assert labels[:, names.index("Pneumonia")].sum() == 500
    assert labels[:, names.index("No Finding")].sum() == 500
    assert labels[:, names.index("Cardiomegaly")].sum() == 16
    splits.check_patient_disjoint({s: [_text(r["patient_id"]) for r in _read_all(builder, s)]
                                   for s in ("train", "validation", "test")})
    assert builder.info.metadata["prepare_report"]["train"]["bad"] == 0


# ---- CheXpert ------------------------------------------------------------------------------------

CHEXPERT_PATIENTS = 30
CHEXPERT_CELLS = ["1.0", "0.0", "-1.0", ""]  # Cardiomegaly by patient index


def write_chexpert(root, release="CheXpert-v1.0-small"):
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *chexpert.LABELS]
    rng = np.random.default_rng(1)

    def row(split, patient, view):
        relative = f"{split}/patient{patient:05d}/study1/{view}"
        path = root / release / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 18), dtype=np.uint8)).save(path, format="JPEG")
        cells = {label: "" for label in chexpert.LABELS}
        cells["Cardiomegaly"] = CHEXPERT_CELLS[patient % 4]
        cells["Edema"] = "-1.0"
        lateral = "lateral" in view
        return [f"{release}/{relative}", "Female" if patient % 2 else "Male", str(40 + patient),
                "Lateral" if lateral else "Frontal", "" if lateral else "AP", *cells.values()]

    (root / release).mkdir(parents=True, exist_ok=True)
    for name, split, patients in (("train.csv", "train", range(1, CHEXPERT_PATIENTS + 1)),
                                  ("valid.csv", "valid", range(64541, 64546))):
        with open(root / release / name, "w") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for patient in patients:
                writer.writerow(row(split, patient, "view1_frontal.jpg"))
                if split == "train":
                    writer.writerow(row(split, patient, "view2_lateral.jpg"))
    return root


@pytest.fixture(scope="session")
def chexpert_download(tmp_path_factory):
    return write_chexpert(tmp_path_factory.mktemp("chexpert"))


def test_chexpert_uncertainty_policies(chexpert_download, tmp_path):
    cardiomegaly, edema = chexpert.LABELS.index("Cardiomegaly"), chexpert.LABELS.index("Edema")
    expected = {"ignore": (0.0, 0.0), "ones": (1.0, 1.0), "zeros": (0.0, 1.0)}  # uncertain → (label, mask)
    for policy, (label, mask) in expected.items():
        builder = _prepare(chexpert.Chexpert, chexpert.ChexpertConfig(name=f"16_{policy}", size=16, uncertainty=policy),
                           tmp_path / policy, chexpert_download)
        records = [r for s in ("train", "validation", "test") for r in _read_all(builder, s)]
        assert len(records) == CHEXPERT_PATIENTS + 5  # frontal only
        for record in records:
            patient = int(_text(record["patient_id"])[len("patient"):])
            cell = CHEXPERT_CELLS[patient % 4]
            got = (record["labels"][cardiomegaly], record["label_mask"][cardiomegaly])
            want = {"1.0": (1.0, 1.0), "0.0": (0.0, 1.0), "": (0.0, 1.0), "-1.0": (label, mask)}[cell]
            assert got == want, (policy, cell, got)
            assert (record["labels"][edema], record["label_mask"][edema]) == (label, mask)
            assert record["uncertain"][edema] == 1.0
            assert _text(record["view"]) == "AP"


def test_chexpert_splits_and_per_label_override(chexpert_download, tmp_path):
    config = chexpert.ChexpertConfig(name="16_mixed", size=16, uncertainty="zeros",
                                     uncertainty_overrides={"Edema": "ignore"})
    builder = _prepare(chexpert.Chexpert, config, tmp_path, chexpert_download)
    test = _read_all(builder, "test")
    assert len(test) == 5 and {_text(r["patient_id"]) for r in test} == {f"patient{p}" for p in range(64541, 64546)}
    assert _text(test[0]["image_id"]).startswith("valid/patient")
    train = _read_all(builder, "train")
    edema, cardiomegaly = chexpert.LABELS.index("Edema"), chexpert.LABELS.index("Cardiomegaly")
    assert all(r["label_mask"][edema] == 0.0 for r in train)
    assert all(r["label_mask"][cardiomegaly] == 1.0 for r in train)
    assert builder.info.splits["validation"].num_examples >= 1
    splits.check_patient_disjoint({s: [_text(r["patient_id"]) for r in _read_all(builder, s)]
                                   for s in ("train", "validation", "test")})


def test_chexpert_full_layout_release_folder_with_laterals(tmp_path):
    download = write_chexpert(tmp_path / "download", release="CheXpert-v1.0")
    config = chexpert.ChexpertConfig(name="16_all_views", size=16, frontal_only=False)
    builder = _prepare(chexpert.Chexpert, config, tmp_path / "tfds", download / "CheXpert-v1.0")
    records = [r for s in ("train", "validation", "test") for r in _read_all(builder, s)]
    assert len(records) == 2 * CHEXPERT_PATIENTS + 5
    assert sum(_text(r["view"]) == "LATERAL" for r in records) == CHEXPERT_PATIENTS


def test_chexpert_bad_policy_is_refused():
    with pytest.raises(ValueError, match="uncertainty policy"):
        chexpert.ChexpertConfig(name="x", uncertainty="maybe")
    with pytest.raises(ValueError, match="not a CheXpert label"):
        chexpert.ChexpertConfig(name="x", uncertainty_overrides={"Cardiomegally": "ones"})


# ---- MedMNIST ------------------------------------------------------------------------------------


def test_medmnist_chest_and_pneumonia(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {}
    for prefix, count in (("train", 30), ("val", 10), ("test", 10)):
        arrays[f"{prefix}_images"] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}_labels"] = (rng.random((count, 14)) < 0.1).astype(np.uint8)
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    pneumonia = {f"{p}_images": rng.integers(0, 256, (n, 64, 64), dtype=np.uint8) for p, n in
                 (("train", 12), ("val", 4), ("test", 4))}
    pneumonia.update({f"{p}_labels": rng.integers(0, 2, (n, 1)).astype(np.uint8) for p, n in
                      (("train", 12), ("val", 4), ("test", 4))})
    np.savez(tmp_path / "pneumoniamnist_64.npz", **pneumonia)

    chest = _prepare(medmnist.Medmnist, "chestmnist_28", tmp_path / "tfds", tmp_path)
    assert chest.info.metadata["labels"] == list(nih_chestxray14.LABELS)
    for split, prefix in (("train", "train"), ("validation", "val"), ("test", "test")):
        records = sorted(_read_all(chest, split), key=lambda r: _text(r["image_id"]))
        assert len(records) == len(arrays[f"{prefix}_images"])
        for index, record in enumerate(records):
            np.testing.assert_array_equal(record["image"][..., 0], arrays[f"{prefix}_images"][index])
            np.testing.assert_array_equal(record["labels"][:14], arrays[f"{prefix}_labels"][index])
            assert record["labels"][14] == float(arrays[f"{prefix}_labels"][index].sum() == 0)  # No Finding
            assert _text(record["patient_id"]) == _text(record["image_id"]) == f"{split}-{index:06d}"

    pneu = _prepare(medmnist.Medmnist, "pneumoniamnist_64", tmp_path / "tfds", tmp_path)
    records = sorted(_read_all(pneu, "train"), key=lambda r: _text(r["image_id"]))
    assert pneu.info.metadata["labels"] == ["Pneumonia", "No Finding"]
    assert [r["labels"].tolist() for r in records] == [[float(v), 1.0 - v] for v in pneumonia["train_labels"][:, 0]]

    with pytest.raises(builders.ManualDataMissingError, match="chestmnist_128.npz"):
        _prepare(medmnist.Medmnist, "chestmnist_128", tmp_path / "tfds", tmp_path)


# ---- The phantom ---------------------------------------------------------------------------------


def test_phantom_builder_matches_the_cohort_and_is_deterministic(tmp_path):
    config = cxr_phantom.PhantomConfig(name="32_test", size=32, num_images=60, seed=3)
    first = _prepare(cxr_phantom.CxrPhantom, config, tmp_path / "a")
    second = _prepare(cxr_phantom.CxrPhantom, config, tmp_path / "b")
    cohort = {image.image_id: image for image in phantom.make_cohort(60, seed=3)}
    seen = 0
    for split in phantom.SPLITS:
        a = sorted(_read_all(first, split), key=lambda r: _text(r["image_id"]))
        b = sorted(_read_all(second, split), key=lambda r: _text(r["image_id"]))
        for record, again in zip(a, b, strict=True):
            np.testing.assert_array_equal(record["image"], again["image"])
            image = cohort[_text(record["image_id"])]
            assert image.split == split and _text(record["patient_id"]) == image.patient_id
            np.testing.assert_array_equal(record["image"][..., 0], phantom.render(image, 32))
            assert record["labels"].tolist() == list(image.labels)
            assert record["true_labels"].tolist() == list(image.true_labels)
            assert record["ctr"] == pytest.approx(image.ctr, abs=1e-6)
            seen += 1
    assert seen == 60
    assert first.info.metadata["labels"] == list(phantom.LABELS)


def test_a_prepared_phantom_remembers_its_spec(tmp_path):
    spec = phantom.PhantomSpec(cardiomegaly_prevalence=0.3, label_noise=0.0, split_fractions=(0.6, 0.2, 0.2))
    _prepare(cxr_phantom.CxrPhantom, cxr_phantom.PhantomConfig(name="16_spec", size=16, num_images=12, spec=spec),
             tmp_path)
    prepared = builders.load_prepared("cxr_phantom", "16_spec", data_dir=tmp_path)
    assert cxr_phantom.prepared_spec(prepared, "16_spec") == spec
    del prepared.info.metadata["phantom"]   # as prepared before the spec was kept: the named config's spec
    assert cxr_phantom.prepared_spec(prepared, "16_n12") == phantom.PhantomSpec()


def test_phantom_any_count_config_prepares_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "xray_dit.data.builders.prepare", "--dataset=cxr_phantom/16_n12",
                             f"--data_dir={tmp_path}", "--workers=0"],
                            cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    prepared = builders.load_prepared("cxr_phantom", "16_n12", data_dir=tmp_path)
    assert prepared.info.splits.total_num_examples == 12 and builders.image_size(prepared) == 16
    config = cxr_phantom.CxrPhantom.named_config("64_n300")
    assert (config.size, config.num_images, config.seed) == (64, 300, 0)
    assert cxr_phantom.CxrPhantom.named_config("128_10k").num_images == 10_000
    with pytest.raises(ValueError, match="<size>_n<count>"):
        builders.get_builder("cxr_phantom", "64_x300", data_dir=tmp_path)
    with pytest.raises(ValueError, match=">= 16"):
        builders.get_builder("cxr_phantom/8_n300", data_dir=tmp_path)


def test_interrupted_prepare_leaves_no_dataset_that_looks_complete(tmp_path):
    script = f"""
import os, signal
from xray_dit.data import builders
from xray_dit.data.builders import cxr_phantom
render = cxr_phantom.RenderPng.__call__
calls = []
def render_then_die(self, image):
    calls.append(1)
    if len(calls) == 40:
        os.kill(os.getpid(), signal.SIGKILL)
    return render(self, image)
cxr_phantom.RenderPng.__call__ = render_then_die
builders.prepare("cxr_phantom", cxr_phantom.PhantomConfig(name="16_kill", size=16, num_images=100),
                 data_dir={str(tmp_path)!r}, prepare_workers=0)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    config = cxr_phantom.PhantomConfig(name="16_kill", size=16, num_images=100)
    assert list((tmp_path / "cxr_phantom" / "16_kill").iterdir())  # the killed run left its temporary folder
    assert not cxr_phantom.CxrPhantom(config=config, data_dir=str(tmp_path)).is_prepared()
    with pytest.raises(builders.NotPreparedError):
        builders.load_prepared("cxr_phantom", "16_kill", data_dir=tmp_path)
    builders.prepare("cxr_phantom", config, data_dir=tmp_path, prepare_workers=0)  # a rerun completes
    assert builders.load_prepared("cxr_phantom", "16_kill", data_dir=tmp_path).info.splits.total_num_examples == 100


def test_prepare_workers_keep_row_order():
    images = phantom.make_cohort(300, seed=1)
    in_process = [png for _, png, _ in common.convert_rows(images, cxr_phantom.RenderPng(16), num_workers=0)]
    in_workers = [(image.image_id, png) for image, png, _ in
                  common.convert_rows(images, cxr_phantom.RenderPng(16), num_workers=2)]
    assert [image_id for image_id, _ in in_workers] == [image.image_id for image in images]
    assert [png for _, png in in_workers] == in_process


def test_validation_carve_is_seeded_and_ignores_row_order():
    patients = [f"p{i}" for i in range(50)]
    chosen = splits.carve_validation_patients(patients, 0.2, seed=0)
    assert len(chosen) == 10 and chosen <= set(patients)
    assert splits.carve_validation_patients(list(reversed(patients)) * 2, 0.2, seed=0) == chosen
    assert splits.carve_validation_patients(patients, 0.2, seed=1) != chosen
    with pytest.raises(splits.PatientLeakError, match="p3: test, train"):
        splits.check_patient_disjoint({"train": ["p1", "p3"], "test": ["p3"]})


def _scarcity_table():
    """Six patients: A, B, E known positive for Cardiomegaly (A also has a negative image), C negative,
    D only uncertain, F positive for Effusion only; rows deliberately not grouped by patient."""
    rows = [("A", 1, 1, 0), ("C", 0, 1, 0), ("B", 1, 1, 0), ("A", 0, 1, 0), ("D", 1, 0, 0), ("E", 1, 1, 0),
            ("F", 0, 1, 1), ("C", 0, 1, 0), ("E", 1, 1, 1)]
    patient, cardio, known, effusion = zip(*rows)
    n = len(rows)
    return splits.MetadataTable(
        label_names=("Cardiomegaly", "Effusion"), image_id=np.array([f"i{k}" for k in range(n)], dtype=object),
        patient_id=np.array(patient, dtype=object), labels=np.array([cardio, effusion], np.float32).T,
        label_mask=np.stack([np.array(known, np.float32), np.ones(n, np.float32)], axis=1),
        age=np.full(n, -1, np.float32), sex=np.array([""] * n, dtype=object), view=np.array(["PA"] * n, dtype=object))


def test_target_fraction_keeps_whole_positive_patients_and_every_other_patient():
    table = _scarcity_table()
    before = {f: getattr(table, f).copy() for f in ("patient_id", "labels", "label_mask")}
    always = {"C", "D", "F"}  # never known positive for Cardiomegaly
    for seed in range(6):
        kept = splits.target_fraction_patients(table, "Cardiomegaly", 1 / 3, seed)
        kept_patients = set(table.patient_id[kept])
        assert kept_patients >= always and len(kept_patients & {"A", "B", "E"}) == 1
        # Patient-wise: a kept patient keeps every image (A's negative too), a dropped one loses every image.
        np.testing.assert_array_equal(kept, np.flatnonzero(np.isin(table.patient_id, list(kept_patients))))
        wider = splits.target_fraction_patients(table, "Cardiomegaly", 2 / 3, seed)
        assert set(kept) < set(wider), "for one seed, smaller fractions keep subsets (a nested dose-response)"
    chosen = {frozenset(table.patient_id[splits.target_fraction_patients(table, "Cardiomegaly", 1 / 3, s)])
              for s in range(12)}
    assert len(chosen) == 3, "each positive patient is kept by some seed"
    np.testing.assert_array_equal(splits.target_fraction_patients(table, "Cardiomegaly", 1.0, 0), np.arange(9))
    np.testing.assert_array_equal(splits.target_fraction_patients(table, "Cardiomegaly", 0.0, 0), [1, 4, 6, 7])
    assert len(set(table.patient_id[splits.target_fraction_patients(table, "Cardiomegaly", 0.01, 0)]) - always) == 1
    for field, value in before.items():
        np.testing.assert_array_equal(getattr(table, field), value)


def test_target_fraction_ignores_row_order_and_refuses_bad_arguments():
    table = _scarcity_table()
    order = np.random.default_rng(0).permutation(len(table))
    shuffled = splits.MetadataTable(**{f: (v[order] if isinstance(v, np.ndarray) else v)
                                       for f, v in vars(table).items()})
    for seed in range(4):
        kept = set(table.patient_id[splits.target_fraction_patients(table, "Cardiomegaly", 0.5, seed)])
        assert set(shuffled.patient_id[splits.target_fraction_patients(shuffled, "Cardiomegaly", 0.5, seed)]) == kept
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        splits.target_fraction_patients(table, "Cardiomegaly", 1.5, 0)
    with pytest.raises(DataError, match="unknown label"):
        splits.target_fraction_patients(table, "Nodule", 0.5, 0)


# ---- Pixels ----------------------------------------------------------------------------------------


def test_image_conversion_helpers():
    deep = Image.fromarray(np.array([[100, 1100], [600, 1100]], np.uint16))
    np.testing.assert_array_equal(common.to_gray_uint8(deep), [[0, 255], [128, 255]])
    rgb = Image.fromarray(np.full((4, 6, 3), 77, np.uint8))
    np.testing.assert_array_equal(common.to_gray_uint8(rgb), np.full((4, 6), 77))
    tall = np.zeros((30, 10), np.uint8)
    tall[10:20] = 200
    np.testing.assert_array_equal(common.center_square_resize(tall, 10), np.full((10, 10), 200))
    with pytest.raises(common.BadImageError):
        common.decode_gray(b"\x89PNG\r\n\x1a\nnot really")
    assert common.parse_age("058Y") == 58.0 and common.parse_age("412") == common.UNKNOWN_AGE


def _radiograph_statistics(images):
    stack = np.stack(images).astype(np.float32)
    height, width = stack.shape[1:]
    mediastinum = stack[:, height // 4:3 * height // 4, 7 * width // 16:9 * width // 16].mean()
    lungs = np.concatenate([stack[:, height // 4:5 * height // 8, 3 * width // 16:5 * width // 16],
                            stack[:, height // 4:5 * height // 8, 11 * width // 16:13 * width // 16]], axis=2).mean()
    return stack.mean(), stack.std(axis=(1, 2)).mean(), mediastinum, lungs


def test_picture_phantom_next_to_real_nih(nih_sample_dir, artifacts_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohort = phantom.make_cohort(16, seed=0)
    fakes = [phantom.render(image, 64) for image in cohort]
    reals = [common.center_square_resize(common.decode_gray(path), 64)
             for path in sorted((nih_sample_dir / "images").iterdir())[:16]]
    figure, axes = plt.subplots(4, 8, figsize=(12, 6.5))
    for axis, pixels, title in zip(axes.flat, fakes + reals, ["phantom"] * 16 + ["NIH"] * 16):
        axis.imshow(pixels, cmap="gray", vmin=0, vmax=255)
        axis.set_title(title, fontsize=7)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(artifacts_dir / "phantom_vs_nih.png", dpi=80)
    plt.close(figure)
    for images in (fakes, reals):
        mean, spread, mediastinum, lungs = _radiograph_statistics(images)
        assert 80 < mean < 180 and spread > 30       # mid-grey, full of contrast, not washed out
        assert mediastinum > lungs + 20              # bright mediastinum/spine between dark lungs


@pytest.mark.parametrize("cell", ["abc", "2", "0.5"])
def test_chexpert_bad_label_cell_names_the_label_and_the_value(cell):
    row = {label: "" for label in chexpert.LABELS} | {"Edema": cell}
    with pytest.raises(ValueError, match=f"label 'Edema' has value '{cell}'; expected 1, 0, -1 or blank"):
        chexpert.encode_labels(row, chexpert.ChexpertConfig(name="x"))


def _png_16bit(samples: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): `samples` (H, W, channels) uint16."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _encoded(pixels: np.ndarray, mode: str, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


def test_radiographs_in_other_pixel_formats_become_the_right_8bit_gray(tmp_path):
    gray = np.array([[0, 40, 80], [120, 200, 255]], np.uint8)
    # 16-bit gray using 12 bits (as DICOM exports do), read from a file: stretched over its own range.
    deep = (gray.astype(np.uint16) * 4095 // 255) + 100
    Image.fromarray(deep).save(tmp_path / "deep.png")
    expected = np.round((deep - deep.min()) * 255.0 / (deep.max() - deep.min())).astype(np.uint8)
    np.testing.assert_array_equal(common.decode_gray(str(tmp_path / "deep.png")), expected)
    # Colour containers of a gray image: the gray values survive exactly; alpha is dropped, not blended.
    rgba = np.dstack([gray, gray, gray, np.array([[0, 255, 90], [255, 0, 255]], np.uint8)])
    la = np.dstack([gray, np.full_like(gray, 7)])
    palette = Image.fromarray(gray, mode="L").convert("P")
    for data in (_encoded(np.dstack([gray] * 3), "RGB"), _encoded(rgba, "RGBA"), _encoded(la, "LA")):
        np.testing.assert_array_equal(common.decode_gray(data), gray)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    np.testing.assert_array_equal(common.decode_gray(buffer.getvalue()), gray)
    # A JPEG saved under a .png name is still an image: read by its content, not its name.
    (tmp_path / "actually_jpeg.png").write_bytes(_encoded(np.full((16, 16), 150, np.uint8), "L", "JPEG"))
    assert abs(int(common.decode_gray(str(tmp_path / "actually_jpeg.png")).mean()) - 150) <= 1


@pytest.mark.parametrize("colour_type, name", [(2, "RGB"), (4, "gray+alpha"), (6, "RGBA")])
def test_16bit_colour_png_is_refused_instead_of_silently_darkened(colour_type, name):
    channels = {2: 3, 4: 2, 6: 4}[colour_type]
    samples = np.full((4, 4, channels), 4095, np.uint16)      # 12-bit white: Pillow alone would give 15 of 255
    with pytest.raises(common.BadImageError, match=re.escape(f"16-bit {name} PNG") + ".*save it as 16-bit grayscale"):
        common.decode_gray(_png_16bit(samples, colour_type))


def test_unreadable_files_are_bad_images_and_a_missing_one_is_missing(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    jpeg, png = _encoded(noise, "L", "JPEG"), _encoded(noise, "L")
    hostile = {"truncated.jpg": jpeg[: len(jpeg) // 2], "truncated.png": png[: len(png) // 2],
               "html.png": b"<html><body>502 Bad Gateway</body></html>", "empty.png": b""}
    convert = common.ConvertFile(16)
    for name, data in hostile.items():
        (tmp_path / name).write_bytes(data)
        _, png, why = convert(common.ImageRow(key=name, path=str(tmp_path / name), example={}))
        assert png is None and why.startswith("unreadable image ("), (name, why)
    (tmp_path / "folder.png").mkdir()
    assert convert(common.ImageRow(key="d", path=str(tmp_path / "folder.png"), example={}))[2].startswith("unreadable")
    assert convert(common.ImageRow(key="m", path=str(tmp_path / "gone.png"), example={}))[2] == "image file missing"


def _report(builder) -> dict[str, str]:
    with open(builder.data_path / builders.REPORT_FILE) as f:
        return {row["image_id"]: row["reason"] for row in csv.DictReader(f, delimiter="\t")}


def _image_ids(builder) -> set[str]:
    ids = set()
    for split in builder.info.splits:
        source = builder.as_data_source(split=split, decoders=builders.SKIP_IMAGE_DECODING)
        ids |= {r["image_id"].decode() for r in source.__getitems__(range(len(source)))}
    return ids


def test_nih_hostile_rows_are_skipped_and_counted_in_the_report(tmp_path, monkeypatch, caplog):
    manual = write_nih(tmp_path / "download", NIH_HEADER_2020)
    images = manual / "images_001" / "images"
    (images / "00000013_000.png").write_bytes(b"<html><body>Download limit exceeded</body></html>")
    (images / "00000015_000.png").write_bytes(b"")
    (images / "00000017_000.png").write_bytes(_png_16bit(np.full((24, 24, 3), 4095, np.uint16), 2))
    (images / "00000019_000.png").write_bytes(_encoded(np.full((24, 24), 90, np.uint8), "L", "JPEG"))
    table = manual / "Data_Entry_2017.csv"
    table.write_text(table.read_text().replace("00000021_000.png,No Finding,", "00000021_000.png,Cardiomegally,"))
    monkeypatch.setattr(common, "MAX_BAD_FRACTION", 0.05)   # 6 bad rows of 200: over the real 1 %
    with caplog.at_level(logging.WARNING):
        builder = _prepare(nih_chestxray14.NihChestxray14, NIH_16, tmp_path / "tfds", manual)

    reasons = _report(builder)
    assert set(reasons) == {CORRUPT, MISSING, "00000013_000.png", "00000015_000.png", "00000017_000.png",
                            "00000021_000.png"}
    assert reasons["00000013_000.png"].startswith("unreadable image (UnidentifiedImageError")
    assert reasons["00000015_000.png"].startswith("unreadable image")
    assert "16-bit RGB PNG" in reasons["00000017_000.png"]
    assert reasons["00000021_000.png"] == "unknown finding label(s) ['Cardiomegally']"
    assert reasons[MISSING] == "image file missing"
    assert sum(s["bad"] for s in builder.info.metadata["prepare_report"].values()) == 6
    kept = _image_ids(builder)
    assert not kept & set(reasons) and "00000019_000.png" in kept and len(kept) == 200 - 6
    assert "see" in caplog.text and builders.REPORT_FILE in caplog.text


def test_chexpert_hostile_rows_are_skipped_and_counted_in_the_report(tmp_path, monkeypatch):
    download = write_chexpert(tmp_path / "download")
    release = download / "CheXpert-v1.0-small"
    truncated, not_image, bad_value = (f"train/patient0000{p}/study1/view1_frontal.jpg" for p in (1, 2, 3))
    jpeg = (release / truncated).read_bytes()
    (release / truncated).write_bytes(jpeg[: len(jpeg) * 2 // 3])      # headers intact, scan data cut
    (release / not_image).write_text("this is not a JPEG")
    with open(release / "train.csv") as f:
        rows = list(csv.reader(f))
    column = rows[0].index("Cardiomegaly")
    for row in rows:
        if row[0].endswith(bad_value):
            row[column] = "2.0"
    with open(release / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    monkeypatch.setattr(common, "MAX_BAD_FRACTION", 0.1)    # 3 bad rows of 35 frontal ones
    builder = _prepare(chexpert.Chexpert, chexpert.ChexpertConfig(name="16", size=16), tmp_path / "tfds", download)

    reasons = _report(builder)
    assert set(reasons) == {truncated, not_image, bad_value}
    assert reasons[truncated].startswith("unreadable image") and "truncated" in reasons[truncated].lower()
    assert reasons[not_image].startswith("unreadable image (UnidentifiedImageError")
    assert reasons[bad_value] == "label 'Cardiomegaly' has value '2.0'; expected 1, 0, -1 or blank"
    assert not _image_ids(builder) & set(reasons)


def test_label_tables_with_a_wrong_header_are_refused_naming_the_file_and_the_column(tmp_path):
    manual = write_nih(tmp_path / "nih", NIH_HEADER_2020)
    table = manual / "Data_Entry_2017.csv"
    table.write_text(table.read_text().replace("Finding Labels,", "", 1))
    with pytest.raises(DataError) as error:
        _prepare(nih_chestxray14.NihChestxray14, NIH_16, tmp_path / "nih_tfds", manual)
    assert str(table) in str(error.value) and "'Finding Labels'" in str(error.value)
    assert "the 2017 or the 2020 NIH label table" in str(error.value)

    release = write_chexpert(tmp_path / "chexpert") / "CheXpert-v1.0-small"
    with open(release / "train.csv") as f:
        rows = list(csv.reader(f))
    drop = rows[0].index("Cardiomegaly")
    with open(release / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([row[:drop] + row[drop + 1:] for row in rows])
    with pytest.raises(DataError, match=r"train\.csv: missing column\(s\) \['Cardiomegaly'\]"):
        _prepare(chexpert.Chexpert, chexpert.ChexpertConfig(name="16", size=16), tmp_path / "chexpert_tfds",
                 release.parent)


def test_label_csv_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Spreadsheet programs re-save CSVs with a UTF-8 BOM; the header must still be recognised."""
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text("\ufeffImage Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
                    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,\n", encoding="utf-8")
    rows = nih_chestxray14.read_data_entry(epath.Path(path))
    assert rows[0]["Image Index"] == "00000001_000.png" and rows[0]["Finding Labels"] == "Cardiomegaly"
