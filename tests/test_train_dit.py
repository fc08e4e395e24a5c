"""The DiT trainer on tiny configs: the loss going down on one batch, the task end to end on an FSDP mesh (the
session's tiny DiT, trained once in conftest), the same loss on one device, class-conditional labels, and the
latent cache: reused when unchanged, rebuilt when the VAE or the scarcity axis changes.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.events import train_losses
from tests.helpers.training import fit, one_device_mesh, read_png
from xray_dit import checkpoint, sharding
from xray_dit.data import pipeline
from xray_dit.diffusion import schedules
from xray_dit.models import dit as dit_lib
from xray_dit.models import factory
from xray_dit.train import dit


TINY_DIT_STEPS = 20
FIRST_STEPS_COMPARED = 5


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
    first, last = fit(lambda p: loss_fn(p, batch, key, jnp.asarray(0))[0], params, steps=40, lr=1e-3)
    assert last < 0.2 * first, (first, last)


def test_dit_end_to_end_writes_latent_cache_grids_and_export(trained_dit, trained_vae):
    workdir, config, result = trained_dit
    vae_info = checkpoint.load_export_info(trained_vae[0] / "export")
    positives = pipeline.metadata_table(config.data, "train", data_dir=config.data.data_dir).positives("Cardiomegaly")
    cache = json.loads((workdir / "latents" / dit.CACHE_INFO).read_text())
    assert cache["count"] == len(positives) == result["latents"] > 0   # the target class only
    assert cache["latent_shape"] == [8, 8, 4] and cache["scaling_factor"] == vae_info["scaling_factor"]

    grids = sorted((workdir / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000010.png", "step_0000020.png"]
    assert read_png(grids[-1]).shape == (4 * 66 + 2, 4 * 66 + 2)

    model, params, info = factory.load_export(workdir / "export", kind="dit")
    assert info["kind"] == "dit" and info["weights"] == "ema" and info["trained_steps"] == TINY_DIT_STEPS
    assert info["class_names"] == [] and info["target_class"] == "Cardiomegaly" and model.num_classes == 0
    assert info["scaling_factor"] == vae_info["scaling_factor"]
    assert info["vae_dir"] == str(trained_vae[0] / "export")
    losses = train_losses(workdir, "dit")
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
    dit.train_dit(config, tmp_path, vae_dir=vae_dir, mesh=one_device_mesh())
    assert not (tmp_path / "latents").exists()   # the cache was reused, so both runs saw the same latents
    single, sharded = train_losses(tmp_path, "dit"), train_losses(workdir, "dit")
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
