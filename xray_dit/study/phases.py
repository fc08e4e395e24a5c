"""Task `study`: the nine phases, each in `<workdir>/<nn_phase>/` with a completion marker.

    01_baseline  classifier on real data only, K seeds
    02_vae       the autoencoder (trained, or fine-tuned from imported weights)
    03_dit       latent cache + DiT on the minority class
    04_generate  N minority-class images
    05_filter    label fidelity, realism, privacy, duplicates → accepted set; the oversampling control set
    06_retrain   the classifier per arm (real + synthetic, real + oversampled real, ...) × K seeds
    07_compare   AUCs with patient-bootstrap CIs, DeLong tests, mean ± sd over seeds
    08_privacy   nearest-neighbour distances, memorisation, membership inference, synthesis quality
    09_report    report.md + report.html

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
    _resolve_rerun(workdir, config.study.rerun_from)
    mesh = sharding.make_mesh(config.mesh.shape)
    prepared.ensure_prepared(config, workdir)
    context = StudyContext(config=config, workdir=workdir, mesh=mesh, results={})
    functions = _phase_functions()
    for phase in PHASES:
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
    print(f"study complete: {workdir / 'report.md'}")
    return context.results


def _json_default(value):
    import numpy as np
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return repr(value)
