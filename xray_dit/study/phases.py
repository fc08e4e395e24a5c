"""Task `study`: the nine phases, each in `<workdir>/<nn_phase>/` with a completion marker.

    01_baseline  classifier on real data only, K seeds
    02_vae       the autoencoder (trained, or fine-tuned from imported weights)
    03_dit       latent cache + DiT per generator variant (target class only | class-conditional)
    04_generate  N minority-class images per generator variant × generator seed
    05_filter    label fidelity, realism, privacy, duplicates → accepted set per generator; the oversampling set
    06_retrain   the classifier per arm (arms.plan_arms: synthetic, oversampled real, controls) × K seeds
    07_compare   the pre-specified plan; synthetic − oversampled at the primary dose; every arm vs real only (Holm)
    08_privacy   nearest-neighbour distances, memorisation, membership inference, synthesis quality
    09_report    report.md + report.html, in the analysis plan's order

Scarcity: with several `study.target_fractions`, phases 01-08 run once per fraction as a complete sub-study
in `<workdir>/fraction_<f>/` (`data.target_fraction=f`: every reader of the train split, the DiT's latent
cache included, sees that fraction), largest first; then 09_report runs once in `<workdir>` with
`results["fractions"] = {str(f): {phase: result}}` beside the largest fraction's results.

A rerun of the same command skips phases whose marker exists and resumes an interrupted one from its
checkpoints; `--config.study.rerun_from=<phase>` deletes that phase's folder and every later one first.
The test split is used only by 01/06 (final test predictions), 07 and the quality metrics of 08; no
filter, threshold or model selection ever reads it.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import jax
import ml_collections
from absl import logging
from etils import epath

from xray_dit import sharding
from xray_dit.data import prepared
from xray_dit.study import analysis, filters, privacy, report, training
from xray_dit.study.context import MARKER, PHASES, StudyContext


def _phase_functions() -> dict[str, Callable[[StudyContext], dict]]:
    return {"01_baseline": training.baseline, "02_vae": training.vae, "03_dit": training.dit,
            "04_generate": training.generate, "05_filter": filters.run_filters, "06_retrain": training.retrain,
            "07_compare": analysis.compare, "08_privacy": privacy.privacy_and_quality, "09_report": report.write_report}


def _resolve_rerun(workdir: epath.Path, rerun_from: str) -> None:
    if not rerun_from:
        return
    matches = [p for p in PHASES if p == rerun_from or p.split("_", 1)[1] == rerun_from]
    if not matches:
        raise ValueError(f"study.rerun_from={rerun_from!r} is not a phase; choose one of "
                         f"{', '.join(PHASES)} (or the name without its number, e.g. 'filter')")
    first = PHASES.index(matches[0])
    for phase in PHASES[first:]:
        directory = workdir / phase
        if directory.exists() and jax.process_index() == 0:
            logging.warning("study: re-running %s: removing %s", phase, directory)
            directory.rmtree()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("rerun cleanup")


def run(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    workdir = epath.Path(workdir)
    config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
    if not config.data.data_dir:
        config.data.data_dir = str(workdir / "tfds")
    fractions = target_fractions(config)
    folders = [workdir] if len(fractions) == 1 else [workdir / fraction_dir(f) for f in fractions] + [workdir]
    for folder in folders:
        _resolve_rerun(folder, config.study.rerun_from)
    mesh = sharding.make_mesh(config.mesh.shape)
    prepared.ensure_prepared(config, workdir)
    config.data.target_fraction = fractions[0]
    if len(fractions) == 1:
        results = _run_phases(config, workdir, mesh, PHASES, {})
    else:
        by_fraction = {}
        for fraction in fractions:
            logging.info("study: ==== target fraction %g ====", fraction)
            sub_config = ml_collections.ConfigDict(config.to_dict())
            sub_config.data.target_fraction = fraction
            by_fraction[str(fraction)] = _run_phases(sub_config, workdir / fraction_dir(fraction), mesh, PHASES[:-1],
                                                     {})
        # The report's single-fraction sections read the largest fraction's results at the top level.
        top = {**by_fraction[str(fractions[0])], "fractions": by_fraction}
        results = _run_phases(config, workdir, mesh, PHASES[-1:], top)
    print(f"study complete: {workdir / 'report.md'}")
    return results


def target_fractions(config: ml_collections.ConfigDict) -> list[float]:
    """The study's scarcity fractions, largest first: study.target_fractions, or data.target_fraction when
    the study keeps its default single fraction (1.0,)."""
    fractions = [float(f) for f in config.study.target_fractions]
    data_fraction = float(config.data.target_fraction)
    if fractions == [1.0]:
        fractions = [data_fraction]
    elif data_fraction != 1.0:
        raise ValueError(f"data.target_fraction={data_fraction} and study.target_fractions={tuple(fractions)} "
                         "disagree; set only study.target_fractions (the study sets data.target_fraction per fraction)")
    if not fractions or len(set(fractions)) != len(fractions) or not all(0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"study.target_fractions={tuple(fractions)} must be distinct fractions in (0, 1]")
    return sorted(fractions, reverse=True)


def fraction_dir(fraction: float) -> str:
    """The sub-study folder of one scarcity fraction (its name uses the same text as the results' key)."""
    return f"fraction_{float(fraction)}"


def _run_phases(config: ml_collections.ConfigDict, workdir: epath.Path, mesh, phases: tuple[str, ...],
                results: dict) -> dict:
    """Runs `phases` in `workdir`, skipping those whose marker exists; returns every phase's result."""
    context = StudyContext(config=config, workdir=workdir, mesh=mesh, results=results)
    functions = _phase_functions()
    for phase in phases:
        marker = workdir / phase / MARKER
        if marker.exists():
            context.results[phase] = json.loads(marker.read_text())["result"]
            logging.info("study: %s already done, skipping", phase)
            continue
        logging.info("study: ---- %s ----", phase)
        (workdir / phase).mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        result = functions[phase](context)
        seconds = time.perf_counter() - start
        context.results[phase] = result
        if jax.process_index() == 0:
            partial = workdir / phase / (MARKER + ".partial")
            partial.write_text(json.dumps({"result": result, "seconds": seconds,
                                           "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2,
                                          default=_json_default))
            partial.rename(marker)
        logging.info("study: %s done in %.1fs", phase, seconds)
    return context.results


def _json_default(value):
    import numpy as np
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return repr(value)
