"""K seeds of the quickstart's classifier on this machine: one run per seed against one program for all.

    python -m bench.classifier_seeds [--seeds=0,1,2]

The quickstart's classifier block (tiny EVA-02 on the 64 px phantom `cxr_phantom/64`, batch 64, 200 steps,
validated at steps 100 and 200, the test split at the end) on the default mesh (one CPU device). Each way
runs in a fresh process with its own empty persistent compilation cache, as a study starts: `separate` is
`train_classifier` once per seed, one after the other (the later seeds find the first one's compiled
programs in the cache), as the study runs with `study.seeds_in_one_program=False`; `together` is one
`train_classifier_seeds` (train/seeds.py; on CPU the seeds' updates unrolled side by side in one jitted
step), as the study runs by default. The data is prepared before either is timed. Measured: wall time and
CPU time (user + system, all threads) of each process. Appends a section with the machine, date, load
average and the numbers to bench/RESULTS.md.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "bench" / "out" / "tfds"


def _config():
    from configs import quickstart
    config = quickstart.get_config()
    config.task = "train_classifier"
    config.data.data_dir = str(DATA_DIR)
    return config


def _run_way(way: str, workdir: pathlib.Path, seeds: list[int]) -> None:
    import jax
    from xray_dit.train import classifier
    config = _config()
    jax.config.update("jax_compilation_cache_dir", str(workdir / "compilation_cache"))
    if way == "together":
        classifier.train_classifier_seeds(config, workdir, seeds)
        return
    for seed in seeds:
        seed_config = config.copy_and_resolve_references()
        seed_config.seed = seed
        classifier.train_classifier(seed_config, workdir / f"seed_{seed}")


def _timed(way: str, seeds: list[int]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one way in a fresh process."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"classifier_seeds_{way}_"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench.classifier_seeds", f"--way={way}", f"--workdir={workdir}",
                    f"--seeds={','.join(map(str, seeds))}"], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(workdir, ignore_errors=True)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _section(seeds: list[int], rows: dict, load: tuple, load_end: tuple) -> str:
    (sep_wall, sep_cpu), (tog_wall, tog_cpu) = rows["separate"], rows["together"]
    loads = [", ".join(f"{x:.1f}" for x in values) for values in (load, load_end)]
    return "\n".join([
        f"\n## CPU: {len(seeds)} classifier seeds, separately and in one program "
        f"(`python -m bench.classifier_seeds --seeds={','.join(map(str, seeds))}`, {datetime.date.today()})",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, load average "
        f"{loads[0]} at the start and {loads[1]} at the end (other work shared the cores: wall times are "
        "inflated, CPU times much less).",
        "The quickstart's classifier block (tiny EVA-02, 64 px phantom, batch 64, 200 steps, 2 validations and the "
        "test split), one CPU device, each way in a fresh process with an empty compilation cache; the one "
        "program is the unrolled form, the CPU default.",
        "",
        "| way | wall (s) | CPU (s) |",
        "|---|---:|---:|",
        f"| {len(seeds)} runs, one per seed | {sep_wall:.1f} | {sep_cpu:.1f} |",
        f"| one program, `study.seeds_in_one_program` | {tog_wall:.1f} | {tog_cpu:.1f} |",
        f"| ratio (separate / one program) | {sep_wall / tog_wall:.2f}x | {sep_cpu / tog_cpu:.2f}x |",
    ]) + "\n"


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    seeds = [int(s) for s in FLAGS.seeds]
    if FLAGS.way:
        _run_way(FLAGS.way, pathlib.Path(FLAGS.workdir), seeds)
        return
    from xray_dit.data import prepared
    prepared.ensure_prepared(_config(), DATA_DIR.parent)
    load = os.getloadavg()
    rows = {way: _timed(way, seeds) for way in ("separate", "together")}
    text = _section(seeds, rows, load, os.getloadavg())
    print(text)
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    flags.DEFINE_list("seeds", ["0", "1", "2"], "classifier seeds")
    flags.DEFINE_enum("way", None, ["separate", "together"], "internal: run one way in this process")
    flags.DEFINE_string("workdir", "", "internal: where the way's runs write")
    app.run(main)
