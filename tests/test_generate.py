"""Generation: the `sample` task on the session's tiny trained DiT (conftest), and its class checks.

The task's behaviour when killed or out of disk space is tested in test_failures.py.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from xray_dit import generate
from xray_dit.data import synthetic as synthetic_lib


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
