"""The study's training phases: they call the trainers with the study's config, one folder per run.

    01_baseline  <phase>/seed_<s>/                       the classifier on real data, per classifier seed
    02_vae       <phase>/                                the autoencoder
    03_dit       <phase>/<variant>/                      one DiT per generator variant (study.generators)
    04_generate  <phase>/<variant>_seed<g>/              study.num_synthetic images per variant x generator seed
    06_retrain   <phase>/<arm key>/seed_<s>/             the classifier per arm (`arms.plan_arms`) x seed,
                 <phase>/controls/<name>/                the controls' image folders, written once

Generator variants: `target_only`, a DiT on the target class's latents alone; `class_conditional`, one DiT
on every training image with its class (`train.dit.conditioning_labels`; label dropout lets it learn the
unconditional score too), sampled for the target class with classifier-free guidance at
study.guidance_scale. Generator seeds are independent sampling draws from the same trained DiT.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import ml_collections
from etils import epath

from xray_dit import generate as generation
from xray_dit import sharding
from xray_dit.data import builders
from xray_dit.data import synthetic as synthetic_lib
from xray_dit.data.builders import cxr_phantom
from xray_dit.study import arms as arms_lib
from xray_dit.study.context import StudyContext
from xray_dit.train import classifier as classifier_trainer
from xray_dit.train import dit as dit_trainer
from xray_dit.train import vae as vae_trainer

GENERATOR_VARIANTS = ("target_only", "class_conditional")
CONTROLS = "controls"
# Fields of a plan_arms dict that 06_retrain's result keeps per arm (the arm's name is its key there).
_ARM_FIELDS = ("key", "kind", "count", "generator", "generator_seed", "primary", "roundtrip_prob")


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(config.to_dict())


def _barrier(name: str) -> None:
    """Every process waits here until all arrive (what process 0 wrote is then there for all)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _classifier_runs(context: StudyContext, folder: epath.Path, *, data: dict | None = None, **mix) -> dict[str, Any]:
    """One classifier per seed in `folder/seed_<s>`; `data` overrides keys of config.data for these runs only.
    With `study.seeds_in_one_program` the seeds train in one program (train/seeds.py), each writing its folder
    as its own run would."""
    seeds = [int(seed) for seed in context.config.study.seeds]
    if context.config.study.seeds_in_one_program:
        config = _copy(context.config)
        config.data.update(data or {})
        results = classifier_trainer.train_classifier_seeds(config, folder, seeds, mesh=context.mesh, **mix)
        return {str(seed): {"workdir": str(folder / f"seed_{seed}"), **results[seed]} for seed in seeds}
    runs = {}
    for seed in seeds:
        workdir = folder / f"seed_{seed}"
        config = context.with_seed(seed)
        config.data.update(data or {})
        result = classifier_trainer.train_classifier(config, workdir, mesh=context.mesh, **mix)
        runs[str(seed)] = {"workdir": str(workdir), **result}
    return runs


def baseline(context: StudyContext) -> dict:
    """Phase 1: the classifier on real training data only, one run per seed."""
    return {"arm": "real only", "runs": _classifier_runs(context, context.phase_dir("01_baseline"))}


def vae(context: StudyContext) -> dict:
    """Phase 2: the autoencoder (fine-tuned when `vae.init_from` names imported weights)."""
    return vae_trainer.train_vae(context.config, context.phase_dir("02_vae"), mesh=context.mesh)


# ---- Generators -----------------------------------------------------------------------------------


def generator_variants(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    variants = tuple(config.study.generators)
    unknown = [v for v in variants if v not in GENERATOR_VARIANTS]
    if not variants or unknown or len(set(variants)) != len(variants):
        raise ValueError(f"study.generators={variants} must name distinct variants among {GENERATOR_VARIANTS}")
    return variants


def generator_name(variant: str, seed: int) -> str:
    return f"{variant}_seed{int(seed)}"


def dit(context: StudyContext) -> dict:
    """Phase 3: per generator variant, the latent cache and the DiT (in `03_dit/<variant>/`)."""
    out = {}
    for variant in generator_variants(context.config):
        config = _copy(context.config)
        config.dit.class_conditional = variant == "class_conditional"
        out[variant] = dit_trainer.train_dit(config, context.phase_dir("03_dit") / variant, mesh=context.mesh,
                                             vae_dir=context.results["02_vae"]["export"])
    return {"variants": out}


def generate(context: StudyContext) -> dict:
    """Phase 4: `study.num_synthetic` target-class images per generator variant x generator seed."""
    study = context.config.study
    seeds = [int(s) for s in study.generator_seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"study.generator_seeds={tuple(study.generator_seeds)} must be distinct, and at least one")
    entries = []
    for variant in generator_variants(context.config):
        dit_dir = context.results["03_dit"]["variants"][variant]["export"]
        for seed in seeds:
            name = generator_name(variant, seed)
            config = context.with_seed(seed)
            guided = variant == "class_conditional"
            config.sample.update(num_images=int(study.num_synthetic), class_name=config.data.target_class,
                                 guidance_scale=float(study.guidance_scale) if guided else 1.0)
            out_dir = context.phase_dir("04_generate") / name
            result = generation.sample(config, out_dir, dit_dir=dit_dir, out_dir=str(out_dir), mesh=context.mesh)
            entries.append({"name": name, "variant": variant, "seed": seed, "out_dir": result["out_dir"],
                            "count": int(result["num_images"])})
    return {"generators": entries}


# ---- Arms -----------------------------------------------------------------------------------------


def retrain(context: StudyContext) -> dict:
    """Phase 6: the classifier per arm of `arms.plan_arms`, same hyper-parameters and seeds as the baseline."""
    config, filtered = context.config, context.results["05_filter"]
    accepted = {name: int(entry["accepted"]) for name, entry in filtered["generators"].items()}
    plan = arms_lib.plan_arms(config.study, accepted_count=accepted, have_phantom=config.data.name == "cxr_phantom",
                              generators=context.generators())
    controls = write_controls(context, plan)
    results = {}
    for arm in plan:
        folder, data = _arm_inputs(arm, filtered, controls)
        runs = _classifier_runs(context, context.phase_dir("06_retrain") / arm["key"], data=data, synthetic=folder,
                                synthetic_count=arm["count"])
        results[arm["name"]] = {**{k: arm[k] for k in _ARM_FIELDS}, "folder": folder, "runs": runs}
    return {"arms": results}


def _arm_inputs(arm: dict, filtered: dict, controls: dict[str, str]) -> tuple[str, dict]:
    """(the folder the arm mixes in, its config.data overrides)."""
    kind = arm["kind"]
    if kind in ("synthetic", "synthetic_mitigated"):
        folder = filtered["generators"][arm["generator"]]["accepted_dir"]
        if kind == "synthetic_mitigated":
            return folder, {"roundtrip_dir": controls["roundtrip_store"], "roundtrip_prob": arm["roundtrip_prob"]}
        return folder, {}
    if kind == "oversampled":
        return filtered["oversampled_dir"], {}
    return controls[kind], {}


def write_controls(context: StudyContext, plan: list[dict]) -> dict[str, str]:
    """The image folders the planned control arms need, in `06_retrain/controls/<name>/`, once per study.

    phantom_positive: fresh phantom patients with the finding, drawn with the prepared dataset's spec, as
    many as the largest such arm mixes in. vae_roundtrip: every real target-class training image through the
    VAE of 02_vae. roundtrip_store (for synthetic_mitigated): every training image's round trip. A folder
    whose manifest exists is complete (the manifest is written last) and is kept on a rerun. Process 0
    writes; the others wait.
    """
    kinds = {arm["kind"] for arm in plan}
    writers: dict[str, Callable[[epath.Path], Any]] = {}
    if "phantom_positive" in kinds:
        count = max(arm["count"] for arm in plan if arm["kind"] == "phantom_positive")
        writers["phantom_positive"] = lambda folder: _write_phantom_positives(context, folder, count)
    roundtrip = functools.cache(lambda: _vae_roundtrip(context))   # loaded only if a control needs it
    if "vae_roundtrip" in kinds:
        writers["vae_roundtrip"] = lambda folder: _write_target_roundtrips(context, folder, roundtrip())
    if "synthetic_mitigated" in kinds:
        writers["roundtrip_store"] = lambda folder: _write_roundtrip_store(context, folder, roundtrip())
    folders = {}
    for name, write in writers.items():
        folder = context.phase_dir("06_retrain") / CONTROLS / name
        if jax.process_index() == 0 and not (folder / synthetic_lib.MANIFEST).exists():
            write(folder)
        folders[name] = str(folder)
    _barrier("study controls written")
    return folders


def _vae_roundtrip(context: StudyContext) -> Callable:
    # One local device: only process 0 writes the controls, so no other process may be needed to run it.
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.local_devices()[:1])
    model, params, _ = generation.load_vae(context.results["02_vae"]["export"], context.config, mesh=mesh)
    return arms_lib.vae_roundtrip_fn(model, params)


def _roundtrip_batch(config: ml_collections.ConfigDict) -> int:
    return max(1, int(config.vae.train.batch_size))


def _write_phantom_positives(context: StudyContext, folder: epath.Path, count: int) -> None:
    config = context.config
    name = config.data.builder_config or cxr_phantom.CxrPhantom.DEFAULT_CONFIG_NAME
    spec = cxr_phantom.prepared_spec(builders.load_prepared(config.data.name, name, data_dir=config.data.data_dir),
                                     name)
    arms_lib.write_phantom_positives(folder, count=count, size=int(config.data.image_size),
                                     target_class=config.data.target_class, labels=list(config.data.labels),
                                     seed=int(config.seed), spec=spec)


def _write_target_roundtrips(context: StudyContext, folder: epath.Path, roundtrip: Callable) -> None:
    labels = list(context.config.data.labels)
    train = context.real_images("train")
    target = train.subset(train.labels[:, labels.index(context.config.data.target_class)] == 1)
    arms_lib.write_vae_roundtrip(folder, target.images, target.labels, list(target.ids), roundtrip,
                                 label_names=labels, batch_size=_roundtrip_batch(context.config))


def _write_roundtrip_store(context: StudyContext, folder: epath.Path, roundtrip: Callable) -> None:
    train = context.real_images("train")
    arms_lib.write_roundtrip_store(folder, list(train.ids), train.images, roundtrip,
                                   batch_size=_roundtrip_batch(context.config))
