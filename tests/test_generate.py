"""Generation: the `sample` task on the session's tiny trained DiT (conftest), and its class checks; killed
half-way through a PNG (a real SIGKILL of a child process, tests/helpers/crash_child.py) or out of disk space,
a rerun completes to exactly the uninterrupted samples (on random-weight exports)."""

from __future__ import annotations

import csv
import errno
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.helpers.crash_child import (PNG_WRITES_BEFORE_KILL, SAMPLE_BATCH, SAMPLE_COUNT, png_write_hook, run_child,
                                      sample_config)
from xray_dit import checkpoint, generate, sharding
from xray_dit.data import synthetic as synthetic_lib
from xray_dit.models import factory


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def test_a_class_the_dit_did_not_learn_is_refused():
    conditional = {"class_names": ["Cardiomegaly", "Effusion"], "target_class": "Cardiomegaly"}
    assert generate._class_label(conditional, "Effusion") == 1
    with pytest.raises(ValueError, match="'Nodule' is not one the DiT was trained on"):
        generate._class_label(conditional, "Nodule")
    unconditional = {"class_names": [], "target_class": "Cardiomegaly"}
    assert generate._class_label(unconditional, "Cardiomegaly") == 0
    with pytest.raises(ValueError, match="unconditional and learned only 'Cardiomegaly'"):
        generate._class_label(unconditional, "Effusion")


def test_sample_is_reproducible_resumable_and_readable_as_a_synthetic_source(trained_dit, tmp_path):
    dit_workdir, config, _ = trained_dit
    config = config.copy_and_resolve_references()
    config.mesh.shape = (-1, 1, 1)
    out = tmp_path / "samples"
    result = generate.sample(config, tmp_path, dit_dir=str(dit_workdir / "export"), out_dir=str(out))
    count = config.sample.num_images
    assert result["num_images"] == result["generated_now"] == count
    files = [f"Cardiomegaly_{i:06d}.png" for i in range(count)]
    assert sorted(p.name for p in out.glob("*.png")) == files
    original = {f: (out / f).read_bytes() for f in files}
    pixels = np.stack([_png(out / f) for f in files])
    assert pixels.shape == (count, 64, 64) and pixels.dtype == np.uint8
    assert len({p.tobytes() for p in pixels}) == count   # every image from its own noise

    source = synthetic_lib.SyntheticSource(out, config.data.labels)
    assert source.files == files and len(source) == count
    np.testing.assert_array_equal(source.labels, np.tile([1.0, 0.0, 0.0], (count, 1)))
    with (out / synthetic_lib.MANIFEST).open() as f:
        assert {row["seed"] for row in csv.DictReader(f)} == {str(config.seed)}

    # Batches are 16 images (a multiple of the 8 devices): delete two of the second batch and rerun.
    batch_size = 16
    untouched = {f: (out / f).stat().st_mtime_ns for f in files[:batch_size]}
    for f in (files[17], files[19]):
        (out / f).unlink()
    rerun = generate.sample(config, tmp_path, dit_dir=str(dit_workdir / "export"), out_dir=str(out))
    assert rerun["generated_now"] == count - batch_size and rerun["num_images"] == count
    assert {f: (out / f).read_bytes() for f in files} == original       # the same seed: the same bytes
    assert {f: (out / f).stat().st_mtime_ns for f in files[:batch_size]} == untouched
    assert not list(out.glob("*.partial"))

    config.seed = 1
    config.sample.num_images = 4
    other = tmp_path / "other_seed"
    generate.sample(config, tmp_path, dit_dir=str(dit_workdir / "export"), out_dir=str(other))
    assert all((other / f).read_bytes() != original[f] for f in files[:4])


def test_sample_with_guidance_from_an_unconditional_dit_is_a_clear_error(trained_dit, tmp_path):
    dit_workdir, config, _ = trained_dit
    config = config.copy_and_resolve_references()
    config.sample.guidance_scale = 3.0
    with pytest.raises(ValueError, match="unconditional.*guidance_scale=1"):
        generate.sample(config, tmp_path, dit_dir=str(dit_workdir / "export"))
    assert not (tmp_path / "samples").exists()


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
    config = sample_config()
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
    generate.sample(sample_config(), out.parent, dit_dir=dit_export, out_dir=str(out))
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
    killed = run_child("sample", dit_export, out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # Killed in batch 1: the manifest lists batch 0 only, and whatever it lists is loadable meanwhile.
    assert _manifest_files(out) == _sample_files()[:SAMPLE_BATCH]
    assert len(list(out.glob("*.png"))) == PNG_WRITES_BEFORE_KILL and len(list(out.glob("*.partial"))) == 1
    assert len(synthetic_lib.SyntheticSource(out, ("Cardiomegaly",))) == SAMPLE_BATCH

    rerun = generate.sample(sample_config(), tmp_path, dit_dir=dit_export, out_dir=str(out))
    assert rerun["generated_now"] == SAMPLE_COUNT - SAMPLE_BATCH and rerun["num_images"] == SAMPLE_COUNT
    _assert_complete(out, reference_samples)


def test_full_disk_while_sampling_names_the_folder_and_a_rerun_completes(dit_export, reference_samples, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "samples"

    def no_space():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(*png_write_hook(after=SAMPLE_BATCH + 2, fail=no_space))
    with pytest.raises(generate.OutOfSpaceError) as error:
        generate.sample(sample_config(), tmp_path, dit_dir=dit_export, out_dir=str(out))
    message = str(error.value)
    assert error.value.errno == errno.ENOSPC
    assert f"no space left to write samples in {out}" in message and "Free space on that disk" in message
    assert f"the {SAMPLE_BATCH} images listed in manifest.csv are kept" in message and "batch 1" in message
    assert not list(out.glob("*.partial"))           # the half-written file is gone
    assert _manifest_files(out) == _sample_files()[:SAMPLE_BATCH]

    monkeypatch.undo()   # space freed
    rerun = generate.sample(sample_config(), tmp_path, dit_dir=dit_export, out_dir=str(out))
    assert rerun["generated_now"] == SAMPLE_COUNT - SAMPLE_BATCH
    _assert_complete(out, reference_samples)


def test_other_write_errors_are_not_mistaken_for_a_full_disk(dit_export, tmp_path, monkeypatch):
    def read_only():
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(*png_write_hook(after=0, fail=read_only))
    with pytest.raises(PermissionError) as error:
        generate.sample(sample_config(), tmp_path, dit_dir=dit_export, out_dir=str(tmp_path / "samples"))
    assert not isinstance(error.value, generate.OutOfSpaceError)
