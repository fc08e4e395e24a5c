"""Training-pipeline throughput (images/s) from array_record at 64, 128 and 256 px on this machine.

    python -m bench.data_pipeline [--workers=0] [--seconds=5] [--phantom_prepare]

Data: the real NIH sample (../shared/data/nih_sample, 1,000 radiographs) prepared at each size
under bench/out/tfds; without it, phantom images. Measured: `pipeline.make_dataset(train=True)`
with the default augmentation, global batch 64, after a warm-up, for `--seconds` per size.
`--phantom_prepare` also times preparing the 10,000-image phantom at 64 px (`cxr_phantom/64_10k`).
Appends a section with machine, date, load average and the numbers to bench/RESULTS.md.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import resource
import shutil
import time

from absl import app, flags

from xray_dit.data import builders, pipeline
from xray_dit.data.builders import cxr_phantom

_WORKERS = flags.DEFINE_integer("workers", 0, "Grain worker processes (0 = in the main process)")
_SECONDS = flags.DEFINE_float("seconds", 5.0, "measuring time per size")
_BATCH = flags.DEFINE_integer("batch_size", 64, "global batch size")
_PHANTOM_PREPARE = flags.DEFINE_bool("phantom_prepare", False, "also time preparing cxr_phantom/64_10k")

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
NIH_SAMPLE = ROOT.parent / "shared" / "data" / "nih_sample"
SIZES = (64, 128, 224, 256)
# Without the NIH sample: phantom counts that render in reasonable time (256 px takes ~0.15 s each).
PHANTOM_IMAGES = {64: 3000, 128: 1000, 224: 300, 256: 300}


def _prepare(size: int) -> tuple[dict, str]:
    data_dir = OUT / "tfds"
    if NIH_SAMPLE.is_dir():
        builders.prepare("nih_chestxray14", str(size), data_dir=data_dir, manual_dir=NIH_SAMPLE)
        return {"name": "nih_chestxray14", "builder_config": str(size), "data_dir": str(data_dir)}, "NIH sample"
    config = cxr_phantom.PhantomConfig(name=f"{size}_bench", size=size, num_images=PHANTOM_IMAGES[size])
    builders.prepare("cxr_phantom", config, data_dir=data_dir)
    return {"name": "cxr_phantom", "builder_config": config.name, "data_dir": str(data_dir)}, "phantom"


def images_per_second(size: int, *, workers: int, batch_size: int, seconds: float) -> tuple[float, str]:
    """Training-pipeline images/s at `size` px, and which data it read."""
    config, source = _prepare(size)
    iterator = iter(pipeline.make_dataset(config, "train", train=True, seed=0, batch_size=batch_size,
                                          num_workers=workers))
    for _ in range(5):  # warm-up: thread pools, worker start, first reads
        next(iterator)
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        images += len(next(iterator)["image"])
    rate = images / (time.perf_counter() - start)
    if hasattr(iterator, "close"):
        iterator.close()
    return rate, source


def _phantom_prepare_seconds() -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process and its workers) of preparing cxr_phantom/64_10k.

    CPU seconds / cores is what the wall time would be on an otherwise idle machine.
    """
    data_dir = OUT / "phantom_prepare"
    shutil.rmtree(data_dir, ignore_errors=True)
    def cpu() -> float:
        usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return sum(u.ru_utime + u.ru_stime for u in usages)

    start, start_cpu = time.perf_counter(), cpu()
    builders.prepare("cxr_phantom", "64_10k", data_dir=data_dir)
    return time.perf_counter() - start, cpu() - start_cpu


def _machine() -> str:
    model = platform.processor() or platform.machine()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} CPU cores visible, load average at start {load}"


def main(argv):
    del argv
    machine = _machine()
    rows = []
    for size in SIZES:
        rate, source = images_per_second(size, workers=_WORKERS.value, batch_size=_BATCH.value,
                                         seconds=_SECONDS.value)
        rows.append(f"| {size} | {source} | {_BATCH.value} | {_WORKERS.value} | {rate:,.0f} |")
        print(rows[-1], flush=True)
    lines = [
        f"\n## Data pipeline: `python -m bench.data_pipeline --workers={_WORKERS.value}` "
        f"({datetime.date.today().isoformat()})",
        f"Machine: {machine}. Training pipeline (decode PNG, augment, batch) from array_record; "
        "target >= 1,000 img/s at 64 px on 2 cores.\n",
        "| size (px) | data | global batch | workers | images/s |",
        "|---|---|---|---|---|",
        *rows,
    ]
    if _PHANTOM_PREPARE.value:
        seconds, cpu_seconds = _phantom_prepare_seconds()
        lines.append(f"\nPreparing `cxr_phantom/64_10k` (10,000 images at 64 px, one worker per core): "
                     f"{seconds:.0f} s wall, {cpu_seconds:.0f} CPU-s in all processes.")
        print(lines[-1])
    results = ROOT / "bench" / "RESULTS.md"
    if not results.exists():
        results.write_text("# Measured results\n\nOne section per run of a `bench/` script, newest last.\n")
    with results.open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
