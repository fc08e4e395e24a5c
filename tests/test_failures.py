"""Crash safety and hostile input: every failure ends in one clear message, and a rerun loses
nothing but the work since the last checkpoint.

Kills are real SIGKILLs of a child process (this file run as `python -m tests.test_failures MODE ...`, see
`_child_main`), placed at the worst moment: while Orbax commits a checkpoint, or half-way through a PNG.
Already covered elsewhere and not repeated here: NaN loss/input stop, unreadable latest checkpoint,
SIGTERM save, SIGKILL between steps (test_loop, test_foundation); a truncated PNG row, a missing image and
the 1 % limit (test_builders); an empty class and a too-small split (test_pipeline); sample rerun after
deleted files (test_trainers).
"""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.helpers import tiny_configs, toy_task
from xray_dit import checkpoint, generate, main, sharding
from xray_dit.data import DataError, builders, phantom, pipeline
from xray_dit.data import synthetic as synthetic_lib
from xray_dit.data.builders import chexpert, common, cxr_phantom, nih_chestxray14
from xray_dit.models import factory
from xray_dit.study import phases
from xray_dit.train import loop

# ---- Child processes -------------------------------------------------------------------------------

TOY_STEPS, TOY_EVERY, KILLED_SAVE = 20, 5, 10
SAMPLE_COUNT, SAMPLE_BATCH = 20, 8          # three batches on the 8 fake devices: 8, 8, 4 images
PNG_WRITES_BEFORE_KILL = 11                 # batch 0 whole and listed, 3 of batch 1, the 4th half-written


def _run_child(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.test_failures", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def _png_write_hook(after: int, fail):
    """(class, name, replacement) for `setattr`: the first `after` PNG writes succeed; the next one writes half
    its bytes (what a dying process or a full disk leaves) and then calls `fail`."""
    path_class = type(epath.Path("/"))
    original = path_class.write_bytes
    count = [0]

    def write_bytes(self, data):
        if self.name.endswith(".png.partial"):
            count[0] += 1
            if count[0] > after:
                original(self, data[: len(data) // 2])
                fail()
        return original(self, data)
    return path_class, "write_bytes", write_bytes


def _kill_me():
    os.kill(os.getpid(), signal.SIGKILL)


def _child_checkpoint(workdir: str) -> None:
    """The toy run, SIGKILLed by Orbax's background thread just before it commits (renames) step 10."""
    # Orbax's private commit step: the only place where "written but not yet complete" is certain.
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_then_die(self, *args, **kwargs):
        if self.get_final().name == str(KILLED_SAVE):
            _kill_me()
        return await finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize_then_die
    config = toy_task.toy_config(steps=TOY_STEPS, checkpoint_every=TOY_EVERY)
    loop.train(config, workdir, toy_task.toy_task(config))


def _child_sample(dit_dir: str, out: str) -> None:
    path_class, name, hook = _png_write_hook(PNG_WRITES_BEFORE_KILL, _kill_me)
    setattr(path_class, name, hook)
    generate.sample(_sample_config(), epath.Path(out).parent, dit_dir=dit_dir, out_dir=out)


def _child_main(argv):
    # tests.conftest, imported above, has set the 8 fake devices and marked absl's flags parsed.
    {"checkpoint": _child_checkpoint, "sample": _child_sample}[argv[0]](*argv[1:])
    raise SystemExit("the child was meant to be killed, but it finished")


# ---- 1. SIGKILL while a checkpoint is written ---------------------------------------------------------


def test_sigkill_while_a_checkpoint_commits_resumes_from_the_last_complete_one(tmp_path, caplog):
    workdir = tmp_path / "killed"
    killed = _run_child("checkpoint", workdir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert "5" in left and str(KILLED_SAVE) not in left
    assert any(name.startswith(f"{KILLED_SAVE}.") for name in left), left   # the uncommitted write

    config = toy_task.toy_config(steps=TOY_STEPS, checkpoint_every=TOY_EVERY)
    with caplog.at_level(logging.INFO):
        resumed = loop.train(config, workdir, toy_task.toy_task(config))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    interrupted = [w for w in warnings if f"[{KILLED_SAVE}]" in w]
    assert len(interrupted) == 1, warnings
    assert "incomplete" in interrupted[0] and "last complete checkpoint, step 5" in interrupted[0]
    assert "resumed from step 5" in caplog.text

    # Only steps 6..10 were lost and redone: the result is the uninterrupted run's, bit for bit.
    reference = loop.train(config, tmp_path / "reference", toy_task.toy_task(config))
    for a, b in zip(jax.tree.leaves(reference["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "15", "20"]
    # Once cleaned up, the next start has nothing to warn about.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        reader = checkpoint.Checkpointer(workdir / "checkpoints", every_steps=TOY_EVERY)
    assert reader.interrupted_steps == [] and reader.latest_step == TOY_STEPS
    assert "still being written" not in caplog.text
    reader.close()


# ---- 2. SIGKILL and a full disk while samples are written ----------------------------------------------


def _sample_config() -> ml_collections.ConfigDict:
    config = tiny_configs.tiny_config()
    config.data.image_size = 32       # the f8 VAE → 4x4 latents, DiT patch 2
    config.mesh.shape = (-1, 1, 1)
    config.sample.update(num_images=SAMPLE_COUNT, batch_size=SAMPLE_BATCH, num_steps=2)
    return config


def _sample_files() -> list[str]:
    return [f"Cardiomegaly_{i:06d}.png" for i in range(SAMPLE_COUNT)]


def _random_params(model, seed: int):
    """Small random weights of the model's shapes, without compiling its init (seconds per model here)."""
    abstract = sharding.unbox(factory.abstract_params(model))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), abstract)


@pytest.fixture(scope="module")
def dit_export(tmp_path_factory) -> str:
    """Untrained tiny VAE and DiT exports (random weights): the sample task's file handling is under test."""
    root = tmp_path_factory.mktemp("exports")
    config = _sample_config()
    vae = factory.vae_from_config(config)
    size = config.data.image_size
    vae_params = _random_params(vae, seed=0)
    checkpoint.save_export(root / "vae", vae_params, {"kind": "vae", "model": factory.model_fields(vae),
                                                      "scaling_factor": 1.0})
    latent = size // vae.downsample_factor
    dit = factory.dit_from_config(config, latent_size=latent, latent_channels=vae.latent_channels,
                                  num_classes=0)
    dit_params = _random_params(dit, seed=1)
    checkpoint.save_export(root / "dit", dit_params, {
        "kind": "dit", "model": factory.model_fields(dit), "vae_dir": str(root / "vae"), "scaling_factor": 1.0,
        "noise_schedule": "linear", "diffusion_steps": 1000, "class_names": [], "target_class": "Cardiomegaly"})
    return str(root / "dit")


@pytest.fixture(scope="module")
def reference_samples(dit_export, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "samples"
    generate.sample(_sample_config(), out.parent, dit_dir=dit_export, out_dir=str(out))
    return {f: (out / f).read_bytes() for f in _sample_files()}


def _manifest_files(out) -> list[str]:
    with open(out / synthetic_lib.MANIFEST) as f:
        return [row["file"] for row in csv.DictReader(f)]


def _assert_complete(out, reference: dict[str, bytes]) -> None:
    """Every image once, the manifest listing exactly the files present, no leftovers, the reference's bytes."""
    assert _manifest_files(out) == sorted(p.name for p in out.glob("*.png")) == _sample_files()
    assert not list(out.glob("*.partial"))
    assert {f: (out / f).read_bytes() for f in _sample_files()} == reference


def test_sigkill_in_the_middle_of_a_png_reruns_to_exactly_the_uninterrupted_samples(dit_export, reference_samples,
                                                                                    tmp_path):
    out = tmp_path / "samples"
    killed = _run_child("sample", dit_export, out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # Killed in batch 1: the manifest lists batch 0 only, and whatever it lists is loadable meanwhile.
    assert _manifest_files(out) == _sample_files()[:SAMPLE_BATCH]
    assert len(list(out.glob("*.png"))) == PNG_WRITES_BEFORE_KILL and len(list(out.glob("*.partial"))) == 1
    assert len(synthetic_lib.SyntheticSource(out, ("Cardiomegaly",))) == SAMPLE_BATCH

    rerun = generate.sample(_sample_config(), tmp_path, dit_dir=dit_export, out_dir=str(out))
    assert rerun["generated_now"] == SAMPLE_COUNT - SAMPLE_BATCH and rerun["num_images"] == SAMPLE_COUNT
    _assert_complete(out, reference_samples)


def test_full_disk_while_sampling_names_the_folder_and_a_rerun_completes(dit_export, reference_samples, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "samples"

    def no_space():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(*_png_write_hook(after=SAMPLE_BATCH + 2, fail=no_space))
    with pytest.raises(generate.OutOfSpaceError) as error:
        generate.sample(_sample_config(), tmp_path, dit_dir=dit_export, out_dir=str(out))
    message = str(error.value)
    assert error.value.errno == errno.ENOSPC
    assert f"no space left to write samples in {out}" in message and "Free space on that disk" in message
    assert f"the {SAMPLE_BATCH} images listed in manifest.csv are kept" in message and "batch 1" in message
    assert not list(out.glob("*.partial"))           # the half-written file is gone
    assert _manifest_files(out) == _sample_files()[:SAMPLE_BATCH]

    monkeypatch.undo()   # space freed
    rerun = generate.sample(_sample_config(), tmp_path, dit_dir=dit_export, out_dir=str(out))
    assert rerun["generated_now"] == SAMPLE_COUNT - SAMPLE_BATCH
    _assert_complete(out, reference_samples)


def test_other_write_errors_are_not_mistaken_for_a_full_disk(dit_export, tmp_path, monkeypatch):
    def read_only():
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(*_png_write_hook(after=0, fail=read_only))
    with pytest.raises(PermissionError) as error:
        generate.sample(_sample_config(), tmp_path, dit_dir=dit_export, out_dir=str(tmp_path / "samples"))
    assert not isinstance(error.value, generate.OutOfSpaceError)


# ---- 3. Killed in the study's report phase --------------------------------------------------------------


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` on the way can swallow it."""


def test_study_killed_in_the_report_phase_redoes_only_that_phase(tmp_path, monkeypatch, caplog):
    calls, kill = [], {"in_report": True, "at_marker": False}

    def fake(phase):
        def run(context):
            calls.append(phase)
            if phase == "09_report":
                assert set(context.results) == set(phases.PHASES[:-1])   # read back from the markers on a rerun
                (context.workdir / "report.md").write_text("# Repo")
                if kill["in_report"]:
                    raise _Killed
                (context.workdir / "report.md").write_text("# Report\n")
            return {"phase": phase}
        return run
    monkeypatch.setattr(phases, "_phase_functions", lambda: {p: fake(p) for p in phases.PHASES})
    monkeypatch.setattr(phases.prepared, "ensure_prepared", lambda config, workdir: workdir / "tfds")
    path_class = type(epath.Path("/"))
    rename = path_class.rename

    def rename_or_die(self, target):
        if kill["at_marker"] and self.name == phases.MARKER + ".partial" and self.parent.name == "09_report":
            raise _Killed
        return rename(self, target)
    monkeypatch.setattr(path_class, "rename", rename_or_die)
    from configs import base
    config = base.get_config()

    with pytest.raises(_Killed):
        phases.run(config, tmp_path)
    assert calls == list(phases.PHASES)
    assert [p for p in phases.PHASES if (tmp_path / p / phases.MARKER).exists()] == list(phases.PHASES[:-1])

    calls.clear()
    kill.update(in_report=False, at_marker=True)      # this time killed while committing the report's marker
    with pytest.raises(_Killed):
        phases.run(config, tmp_path)
    assert calls == ["09_report"] and not (tmp_path / "09_report" / phases.MARKER).exists()

    calls.clear()
    caplog.clear()
    kill["at_marker"] = False
    with caplog.at_level(logging.INFO):
        results = phases.run(config, tmp_path)
    assert calls == ["09_report"] and results["09_report"] == {"phase": "09_report"}
    assert (tmp_path / "report.md").read_text() == "# Report\n"
    assert (tmp_path / "09_report" / phases.MARKER).exists()
    assert not list((tmp_path / "09_report").glob("*.partial"))
    assert sum("already done, skipping" in r.getMessage() for r in caplog.records) == len(phases.PHASES) - 1


# ---- 4. Hostile inputs: image files -------------------------------------------------------------------------


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
    from tests.test_builders import CORRUPT, MISSING, NIH_16, NIH_HEADER_2020, _prepare, write_nih
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
    from tests.test_builders import _prepare, write_chexpert
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
    from tests.test_builders import NIH_16, NIH_HEADER_2020, _prepare, write_chexpert, write_nih
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


# ---- 4. Hostile inputs: synthetic folders, too little data, sizes ----------------------------------------------

PHANTOM_NAME = "32_failures"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """60 phantom images at 32 px, a quarter of them Cardiomegaly."""
    directory = tmp_path_factory.mktemp("tfds")
    builders.prepare("cxr_phantom", cxr_phantom.PhantomConfig(
        name=PHANTOM_NAME, size=32, num_images=60, spec=phantom.PhantomSpec(cardiomegaly_prevalence=0.25)),
        data_dir=directory, prepare_workers=0)
    return directory


def _data_config(data_dir):
    return {"name": "cxr_phantom", "builder_config": PHANTOM_NAME, "data_dir": str(data_dir),
            "labels": ("Cardiomegaly", "Effusion", "Nodule")}


def test_a_synthetic_folder_can_be_written_again_by_a_rerun(tmp_path):
    # A study phase killed after writing its folder but before its marker writes the folder again.
    folder = tmp_path / "accepted"
    synthetic_lib.write_synthetic(folder, np.zeros((3, 8, 8), np.uint8), ["Cardiomegaly"] * 3)
    synthetic_lib.write_synthetic(folder, np.full((2, 8, 8), 9, np.uint8), ["Effusion"] * 2)
    source = synthetic_lib.SyntheticSource(folder, ("Cardiomegaly", "Effusion"))
    assert source.files == ["synthetic_000000.png", "synthetic_000001.png"]
    np.testing.assert_array_equal(source.labels, [[0, 1], [0, 1]])
    assert not (folder / (synthetic_lib.MANIFEST + ".partial")).exists()


def test_synthetic_manifest_errors_say_what_is_wrong_and_what_to_do(tmp_path):
    folder = tmp_path / "synthetic"
    synthetic_lib.write_synthetic(folder, np.zeros((3, 8, 8), np.uint8), ["Cardiomegaly", "Effusion", "Cardiomegaly"])
    labels = ("Cardiomegaly", "Effusion")
    (folder / "synthetic_000001.png").unlink()
    with pytest.raises(DataError) as error:
        synthetic_lib.SyntheticSource(folder, labels)
    assert "1 file(s) listed in" in str(error.value) and "['synthetic_000001.png']" in str(error.value)
    assert "remove their rows from the manifest" in str(error.value)

    synthetic_lib.write_synthetic(tmp_path / "typo", np.zeros((2, 8, 8), np.uint8),
                                  ["Cardiomegaly", "Cardiomegally|Effusion"])
    with pytest.raises(DataError) as error:
        synthetic_lib.SyntheticSource(tmp_path / "typo", labels)
    assert "['Cardiomegally']" in str(error.value) and "Correct the manifest's label column" in str(error.value)


def test_an_undecodable_synthetic_image_is_named_when_it_is_read(data_dir, tmp_path):
    folder = tmp_path / "synthetic"
    synthetic_lib.write_synthetic(folder, np.zeros((4, 32, 32), np.uint8), ["Cardiomegaly"] * 4)
    broken = folder / "synthetic_000002.png"
    broken.write_bytes(broken.read_bytes()[:40])
    dataset = pipeline.make_dataset(_data_config(data_dir), "validation", train=False, seed=0, batch_size=8,
                                    synthetic=folder)
    with pytest.raises(common.BadImageError) as error:
        list(dataset)
    assert f"synthetic image {broken} cannot be decoded" in str(error.value)
    assert "remove its row from" in str(error.value) and str(folder / synthetic_lib.MANIFEST) in str(error.value)


def test_a_class_filter_that_leaves_less_than_one_batch_is_a_clear_error(data_dir):
    config = _data_config(data_dir)
    train = len(pipeline.metadata_table(config, "train"))
    positives = len(pipeline.metadata_table(config, "train").positives("Cardiomegaly"))
    assert 0 < positives < 16 <= train          # the whole split fills a batch; its Cardiomegaly images do not
    next(iter(pipeline.make_dataset(config, "train", train=True, seed=0, batch_size=16)))
    with pytest.raises(DataError) as error:
        pipeline.make_dataset(config, "train", train=True, seed=0, batch_size=16, only_class="Cardiomegaly")
    assert f"has {positives} images after filtering/mixing, fewer than one global batch of 16" in str(error.value)
    assert "lower the batch size or add data" in str(error.value)


@pytest.mark.parametrize("change, message", [
    (dict(image_size=60), "image size 60 is not divisible by the classifier's patch size 8; change data.image_size "
                          "(e.g. 56 or 64) or classifier.patch_size"),
    (dict(image_size=72), "latent size 9 (image 72 / VAE factor 8) is not divisible by the DiT patch size 2 of "
                          "DiT-S/2: the image size must be a multiple of 16; change data.image_size (e.g. 64 or 80)"),
    (dict(image_size=68, patch_size=4), "image size 68 is not divisible by the VAE's downsampling factor 8; change "
                                        "data.image_size (e.g. 64 or 72) or vae.block_out_channels"),
])
def test_inconsistent_sizes_stop_the_study_before_anything_runs(tmp_path, change, message):
    from configs import quickstart
    config = quickstart.get_config()
    config.data.image_size = change["image_size"]
    config.classifier.patch_size = change.get("patch_size", config.classifier.patch_size)
    with pytest.raises(ValueError) as direct:
        factory.check_sizes(config)
    assert message in str(direct.value)
    workdir = tmp_path / "study"
    with pytest.raises(main.UsageError, match="the config's sizes do not fit together") as usage:
        main.run(config, str(workdir))
    assert message in str(usage.value) and not workdir.exists()
    assert factory.check_sizes(quickstart.get_config()) is None


def test_the_models_from_config_refuse_the_same_sizes():
    config = tiny_configs.tiny_config()
    config.data.image_size = 68
    with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 8"):
        factory.vae_from_config(config)
    config.data.image_size = 72
    with pytest.raises(ValueError, match="latent size 9 .* multiple of 16"):
        factory.dit_from_config(config, latent_size=9, latent_channels=4, num_classes=0)
    config.data.image_size = 60
    with pytest.raises(ValueError, match="classifier's patch size 8"):
        factory.classifier_from_config(config, num_classes=3)


# ---- 5. Data and config mistakes reach the user as one line ---------------------------------------------------


def test_a_missing_nih_download_is_one_line_naming_the_config_key_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "xray_dit.main", "--config=configs/quickstart.py", f"--workdir={tmp_path / 'run'}",
         "--config.task=train_classifier", "--config.data.name=nih_chestxray14", "--config.compilation_cache_dir=",
         f"--config.data.manual_dir={tmp_path / 'nowhere'}"], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"looked at: {tmp_path / 'nowhere'}" in errors[0] and "--config.data.manual_dir=<folder>" in errors[0]


@pytest.mark.parametrize("task", ["study", "train_dit"])
def test_a_target_class_outside_the_labels_is_refused_before_any_data_is_prepared(tmp_path, task):
    from configs import quickstart
    config = quickstart.get_config()
    config.task = task
    config.dit.class_conditional = True
    config.data.target_class = "Hernia"
    with pytest.raises(main.UsageError, match=r"data.target_class 'Hernia' is not one of data.labels \('Cardiomegaly', "
                                              r"'Effusion', 'Nodule'\); set --config.data.target_class"):
        main.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value, message", [
    ("shape", (3, 1, 1), r"config.mesh.shape \(3, 1, 1\) uses 3 devices but 8 are available"),
    ("rules", (("embed", "model"),), r"config.mesh.rules maps 'embed' to \['model'\], which are not mesh axes"),
])
def test_mesh_mistakes_are_refused_before_anything_runs(tmp_path, key, value, message):
    from configs import quickstart
    config = quickstart.get_config()
    config.task = "check"
    config.mesh[key] = value
    with pytest.raises(main.UsageError, match=message):
        main.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":
    _child_main(sys.argv[1:])


def test_label_csv_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Spreadsheet programs re-save CSVs with a UTF-8 BOM; the header must still be recognised."""
    from xray_dit.data.builders import nih_chestxray14
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text("\ufeffImage Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
                    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,\n", encoding="utf-8")
    from etils import epath
    rows = nih_chestxray14.read_data_entry(epath.Path(path))
    assert rows[0]["Image Index"] == "00000001_000.png" and rows[0]["Finding Labels"] == "Cardiomegaly"
