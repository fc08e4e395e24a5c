"""What holds a training step back: GPU kernel time by kind, and how long the GPU sat idle.

    python -m bench.profile_summary <trace dir or file> --steps=N [--json=PATH]

Images/s and MFU say *how fast* a step is, not *why*. A JAX profile of a few steps, taken with

    with jax.profiler.trace(logdir, create_perfetto_trace=True): ...

holds every kernel the GPU ran (`<logdir>/plugins/profile/<timestamp>/perfetto_trace.json.gz`, Chrome
trace-event JSON, times in microseconds). This module sorts those kernels into the few kinds that
call for different fixes, and measures the gaps between them:

  gemm        matmuls (cuBLAS/cuBLASLt `nvjet_*`/`sm90_xmma_gemm_*`, CUTLASS, XLA's Triton GEMM fusions,
              cuDNN convolutions, which run as implicit GEMMs): compute-bound, the FLOPs MFU counts
  attention   fused attention (cuDNN flash `..._sdpa_..._flash_fprop/bprop_...`, FMHA kernels)
  fusion      XLA's own element-wise / reduction / transpose / convert / copy kernels: memory-bound,
              so their time is bytes moved, not FLOPs
  memcpy      memcpy / memset transfers and fills
  collective  NCCL kernels (all-reduce, all-gather, ...)
  other       anything unmatched; a large share means the pattern table below needs a new row

Idle time is the part of the window (first kernel start to last kernel end) in which no kernel runs
on any stream: launch gaps and host stalls, which no kernel optimisation recovers.

Only the GPU's stream lines count: the trace also carries host threads and, on the device, derived
"XLA Ops"/"XLA Modules" lines that repeat the same kernels, which would double the totals. A trace
without a device (a CPU run) falls back to the ops on XLA's CPU executor threads so the script can
be checked anywhere; the summary's `source` says which was used.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

# Ordered: the first row whose pattern matches wins, so the specific rows come before the broad ones:
# `reduce_scatter`/`all-gather` would be taken for fusions, FMHA kernels are often CUTLASS-built
# (`fmha_cutlassF_*`), and XLA's Triton GEMM kernels are named `gemm_fusion_*`. Attention keys on
# `flash`/`sdpa`/`fmha`, not on `fprop`/`bprop` alone: cuDNN convolutions are `*_xmma_fprop_implicit_gemm_*`.
CATEGORY_PATTERNS: tuple[tuple[str, re.Pattern], ...] = tuple(
    (category, re.compile(pattern, re.IGNORECASE)) for category, pattern in (
        # The look-behind keeps `small_reduce`-like fusion names out.
        ("collective", r"nccl|(?<![a-z])all[-_]?(reduce|gather|to[-_]?all)|reduce[-_]scatter|collective[-_]permute"),
        ("memcpy", r"memcpy|memset"),
        ("attention", r"flash|sdpa|fmha|attention"),
        ("gemm", r"gemm|gemv|nvjet|xmma|cutlass|cublas|matmul|\bdot\b"),   # `dot.12`: an HLO dot (CPU)
        ("fusion", r"fusion|^loop_|^input_|^wrapped_|reduce|transpose|convert|copy|concatenate|slice|"
                   r"scatter|gather|broadcast"),
    )
)
CATEGORIES = tuple(category for category, _ in CATEGORY_PATTERNS) + ("other",)
# Where a kernel name says nothing (a generic CUDA kernel name), XLA's annotations name the HLO op.
ANNOTATION_KEYS = ("hlo_op", "long_name")
# HLO text carries the source scope (`metadata={op_name="jit(step)/.../attention/..."}`), which says
# where an op came from in the model, not what kind of kernel it is.
HLO_METADATA = re.compile(r"metadata=\{[^}]*\}")
TOP_KERNELS = 15
# Long CUTLASS/cuBLAS template names would make the markdown table unreadable.
TABLE_NAME_CHARS = 90


def load_trace(path) -> list[dict]:
    """The trace events of a .json / .json.gz trace file, or of the newest trace under a directory.

    A directory is searched recursively for `perfetto_trace.json.gz` (newest by modification time,
    i.e. the latest `jax.profiler.trace` run), else for TensorBoard's `*.trace.json.gz`.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        candidates = list(path.rglob("perfetto_trace.json.gz")) or list(path.rglob("*.trace.json.gz"))
        if not candidates:
            raise FileNotFoundError(f"no perfetto_trace.json.gz or *.trace.json.gz under {path}")
        path = max(candidates, key=lambda candidate: (candidate.stat().st_mtime, str(candidate)))
    elif not path.is_file():
        raise FileNotFoundError(f"no trace file or directory at {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        trace = json.load(handle)
    # The trace-event format allows a bare event array as well as {"traceEvents": [...]}.
    return trace if isinstance(trace, list) else trace["traceEvents"]


def _names(events: list[dict], metadata_name: str, key) -> dict:
    return {key(event): event.get("args", {}).get("name", "")
            for event in events if event.get("ph") == "M" and event.get("name") == metadata_name}


def _select_kernels(events: list[dict]) -> tuple[list[dict], str]:
    """The kernel events and a description of where they came from (see `device_kernels`)."""
    process_names = _names(events, "process_name", lambda event: event.get("pid"))
    thread_names = _names(events, "thread_name", lambda event: (event.get("pid"), event.get("tid")))
    complete = [event for event in events if event.get("ph") == "X"]

    device_pids = {pid for pid, name in process_names.items() if name.startswith("/device:")}
    if device_pids:
        stream_threads = {thread for thread, name in thread_names.items()
                          if thread[0] in device_pids and name.startswith("Stream")}
        pids_with_streams = {pid for pid, _ in stream_threads}

        def on_device_stream(event: dict) -> bool:
            pid = event.get("pid")
            if pid in pids_with_streams:
                return (pid, event.get("tid")) in stream_threads
            return pid in device_pids

        kernels = [event for event in complete if on_device_stream(event)]
        devices = ", ".join(sorted(process_names[pid] for pid in device_pids))
        return kernels, f"{devices} ({len(stream_threads)} stream threads)"

    xla_threads = {thread for thread, name in thread_names.items() if "XLA" in name}
    # Only events naming an HLO op are op executions; the executor's own markers around them
    # ("ThunkExecutor::Execute", thread-pool regions) would otherwise count as kernels.
    kernels = [event for event in complete
               if (event.get("pid"), event.get("tid")) in xla_threads and "hlo_op" in event.get("args", {})]
    return kernels, "CPU: no device in the trace, HLO ops on XLA's CPU executor threads (host thread time)"


def device_kernels(events: list[dict]) -> list[dict]:
    """The "X" events of kernels that ran on a device, each counted once.

    On device processes (named "/device:..."), only the "Stream ..." threads where such threads exist;
    the derived "XLA Ops"/"XLA Modules" lines repeat the same work. Without any device process (a CPU
    trace), the HLO-op events of XLA's CPU executor threads (names containing "XLA").
    """
    return _select_kernels(events)[0]


def categorise(event: dict) -> str:
    """The kind of kernel `event` is: one of CATEGORIES.

    The kernel name is tried against every pattern first, then the HLO op annotations, so that a
    plainly named fusion is not re-labelled by an operand that its HLO text happens to mention.
    """
    args = event.get("args", {})
    texts = [event.get("name", "")] + [HLO_METADATA.sub("", str(args[key])) for key in ANNOTATION_KEYS if key in args]
    for text in texts:
        for category, pattern in CATEGORY_PATTERNS:
            if pattern.search(text):
                return category
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals: concurrent streams count once."""
    total = 0.0
    covered_until = float("-inf")
    for start, end in sorted(intervals):
        if end > covered_until:
            total += end - max(start, covered_until)
            covered_until = end
    return total


def summarise(events: list[dict], steps: int) -> dict:
    """Kernel time per step by category, the idle part of the window, and the top kernels.

    `events` is the whole trace (as `load_trace` returns it); `steps` the number of training steps
    it covers, to turn totals into per-step times.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    kernels, source = _select_kernels(events)
    if not kernels:
        raise ValueError(f"the trace holds no kernel events (looked at: {source})")

    intervals = [(float(kernel["ts"]), float(kernel["ts"]) + float(kernel.get("dur", 0.0))) for kernel in kernels]
    window_us = max(end for _, end in intervals) - min(start for start, _ in intervals)
    busy_us = _union_us(intervals)

    category_us = dict.fromkeys(CATEGORIES, 0.0)
    by_name: dict[str, dict] = collections.defaultdict(lambda: {"calls": 0, "total_us": 0.0})
    for kernel in kernels:
        duration_us = float(kernel.get("dur", 0.0))
        category = categorise(kernel)
        category_us[category] += duration_us
        entry = by_name[kernel.get("name", "")]
        entry["category"] = category
        entry["calls"] += 1
        entry["total_us"] += duration_us
    kernel_us = sum(category_us.values())

    top = sorted(by_name.items(), key=lambda item: (-item[1]["total_us"], item[0]))[:TOP_KERNELS]
    return {
        "source": source,
        "steps": steps,
        "window_ms": window_us / 1e3,
        "busy_ms": busy_us / 1e3,
        "idle_ms": (window_us - busy_us) / 1e3,
        "idle_fraction": (window_us - busy_us) / window_us if window_us > 0 else 0.0,
        "categories": {
            category: {
                "ms_per_step": total_us / 1e3 / steps,
                "share_of_kernel_time": total_us / kernel_us if kernel_us > 0 else 0.0,
            }
            for category, total_us in category_us.items()
        },
        "top_kernels": [
            {"name": name, "category": entry["category"], "calls": entry["calls"],
             "total_ms": entry["total_us"] / 1e3, "ms_per_step": entry["total_us"] / 1e3 / steps}
            for name, entry in top
        ],
    }


def _table_name(name: str) -> str:
    if len(name) > TABLE_NAME_CHARS:
        name = name[:TABLE_NAME_CHARS - 1] + "…"
    return name.replace("|", "\\|")


def format_table(summary: dict) -> str:
    """Markdown for bench/RESULTS.md: time by category, the idle line, and the top kernels."""
    steps = summary["steps"]
    lines = [
        f"Kernel time by category, {steps} steps ({summary['source']}):",
        "",
        "| category | ms/step | share of kernel time |",
        "| --- | ---: | ---: |",
    ]
    by_time = sorted(summary["categories"].items(), key=lambda item: -item[1]["ms_per_step"])
    for category, entry in by_time:
        lines.append(f"| {category} | {entry['ms_per_step']:.3f} | {entry['share_of_kernel_time']:.1%} |")
    lines += [
        "",
        f"Window {summary['window_ms'] / steps:.3f} ms/step: busy {summary['busy_ms'] / steps:.3f} ms/step, "
        f"idle {summary['idle_ms'] / steps:.3f} ms/step ({summary['idle_fraction']:.1%} of the window with no "
        "kernel running: launch gaps, host stalls).",
        "",
        "| kernel | category | calls | total ms | ms/step |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for kernel in summary["top_kernels"]:
        lines.append(f"| {_table_name(kernel['name'])} | {kernel['category']} | {kernel['calls']} | "
                     f"{kernel['total_ms']:.3f} | {kernel['ms_per_step']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="trace file (.json / .json.gz) or a jax.profiler.trace log directory")
    parser.add_argument("--steps", type=int, required=True, help="training steps the trace covers")
    parser.add_argument("--json", dest="json_path", help="also write the summary as JSON to this path")
    args = parser.parse_args(argv)

    summary = summarise(load_trace(args.trace), args.steps)
    print(format_table(summary))
    if args.json_path:
        pathlib.Path(args.json_path).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
