"""The whole accelerator benchmark (an estimated 11 minutes on one H200, so `--budget_s` stops it before a
10-minute device command limit; bench/NOTES.md gives the two-command split for a 15-minute device session).

    python -m bench.gpu_suite --out=bench/out/gpu.json [--only=dit,loop,eva,pipeline,sample,vae] [--tiny]
    python -m bench.gpu_suite --render=bench/out/gpu.json     # append its tables to bench/RESULTS.md

Measures, each with the project's real code paths (models, diffusion, loop.make_update_fn, optimiser, EMA):
  dit      training images/s, MFU, memory and compile time for DiT-B/2 (cuDNN; also with remat "dots" and at
           batch 512), DiT-L/2, DiT-XL/2 (remat "dots" if it does not fit), DiT-S/2; XLA's FLOP and byte
           counts of the compiled step give its compute- and bandwidth-bound times. The first row also
           traces 5 more steps, summarised by kernel category and idle time (bench.profile_summary)
  loop     the real `loop.train` (array_record latents → Grain → device prefetch → step → metrics) against
           the bare step: what the host side costs per step, with 2 batches prefetched to the device and none
  eva      EVA-02-S training images/s at 224 and 256 px
  pipeline the classifier's Grain input pipeline at 224 and 256 px with a worker per core (is it the bottleneck?)
  sample   500 images: DDIM 50 steps with CFG + VAE decode to 256 px; one network evaluation of 1,000 rows
  vae      SD-size VAE encode images/s at 256 px (the latent cache's speed)
Parts run in the order given by --only, most important first, so that a budget cut loses the least. All
processes share one persistent compilation cache in a temporary folder, so the loop part's runs and bare step
do not compile DiT-B/2 again (compile times in the table are first compiles).
`--tiny` shrinks everything so the script itself can be checked on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from xray_dit import sharding
from xray_dit.models import factory

# bf16 dense peak used for MFU: measured 8192^3 bf16 matmul on the H200 / H100 (device notes).
PEAK_TFLOPS = {"H200": 783.0, "H100": 790.0}
# HBM bandwidth from NVIDIA's data sheets (H100 SXM5 80 GB HBM3, H200 141 GB HBM3e), TB/s.
PEAK_TBPS = {"H200": 4.8, "H100": 3.35}
PROFILE_STEPS = 5   # steps traced after the timed ones
TINY_VAE = dict(in_channels=1, out_channels=1, block_out_channels=(32, 32), layers_per_block=1)
TINY_DIT = dict(hidden_size=64, depth=2, num_heads=4)


def _device_name() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", d.platform)


def _card_value(table: dict[str, float]) -> float:
    kind = _device_name()
    for key, value in table.items():
        if key in kind:
            return value
    return float("nan")


def _peak() -> float:
    return _card_value(PEAK_TFLOPS)


def _peak_memory_gib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def _fresh_params(model, seed: int = 0):
    """The model's initial parameters (unboxed), computed in one compiled program."""
    return sharding.unbox(jax.jit(lambda r: factory.init_params(model, r))(jax.random.PRNGKey(seed)))


def dit_train_gflop_per_image(model) -> float:
    """Matmul FLOPs of one training image (forward ×3 for the backward):
    per block, tokens × 12·D² MACs (qkv, proj, 4× MLP) + 2·tokens²·D (scores, weighted sum) + 6·D² (adaLN);
    plus the patch embedding and final layer. DiT-B/2 on 32×32 latents: 23.0 GMAC → 138 GFLOP."""
    tokens, width = model.grid_size ** 2, model.hidden_size
    patch_in = model.patch_size ** 2 * model.in_channels
    block = tokens * 12 * width ** 2 + 2 * tokens ** 2 * width + 6 * width ** 2
    edges = tokens * patch_in * width + tokens * width * model.patch_size ** 2 * model.out_channels + 2 * width ** 2
    return 2 * 3 * (model.depth * block + edges) / 1e9


def _costs(compiled) -> dict:
    """XLA's own counts for the compiled program: FLOPs, bytes accessed, and its memory plan (GiB)."""
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    out = {"flops": float(cost.get("flops", float("nan"))), "bytes": float(cost.get("bytes accessed", float("nan")))}
    memory = compiled.memory_analysis()
    if memory is not None:
        out["plan_gib"] = (memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
                           - memory.alias_size_in_bytes) / 2**30
    return out


def _time(fn, *args, steps: int, donate_first: bool = False, profile_dir: str = ""):
    """Compile time, seconds per call over `steps` calls (the first result fed back if donating), XLA's costs.

    With `profile_dir`, PROFILE_STEPS more calls run under the profiler after the timed ones.
    """
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=(0,) if donate_first else ()).lower(*args).compile()
    compile_s = time.perf_counter() - start
    costs = _costs(compiled)
    state, out = args[0], None

    def call():
        nonlocal state, out
        out = compiled(state, *args[1:])
        if donate_first:
            state = out[0]
    for _ in range(2):  # warm-up
        call()
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        call()
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / steps
    if profile_dir:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(PROFILE_STEPS):
                call()
            jax.block_until_ready(out)
    return compile_s, seconds, costs


# --------------------------------------------------------------------------------------------------
def _dit_update(model):
    from configs import base
    from xray_dit.diffusion import schedules
    from xray_dit.train import dit as dit_trainer
    from xray_dit.train import loop
    train = base.get_config().dit.train
    tx = loop.make_optimizer(train)
    loss_fn = dit_trainer.make_loss_fn(model, schedules.make_schedule(), 0.18215)
    return loss_fn, tx, loop.make_update_fn(loss_fn, tx, train.ema_decay)


def _dit_model(name: str, latent: int, attention: str, remat: str, dtype, tiny: bool):
    from xray_dit.models import dit as dit_lib
    return dit_lib.make_dit(name, input_size=latent, in_channels=4, num_classes=0, learn_sigma=True, dtype=dtype,
                            attention_impl=attention, remat_policy=remat, **(TINY_DIT if tiny else {}))


def bench_dit(name: str, batch: int, latent: int, attention: str, remat: str, steps: int, dtype,
              tiny: bool = False, profile_dir: str = "") -> dict:
    model = _dit_model(name, latent, attention, remat, dtype, tiny)
    _, tx, update = _dit_update(model)
    params = _fresh_params(model)
    state = {"params": params, "ema_params": jax.tree.map(jnp.copy, params), "opt_state": jax.jit(tx.init)(params),
             "step": jnp.asarray(0, jnp.int32), "rng": jax.random.PRNGKey(1)}
    rng = np.random.default_rng(0)
    shape = (batch, latent, latent, 4)
    batch_data = {"mean": jnp.asarray(rng.normal(size=shape), jnp.float32),
                  "std": jnp.asarray(np.full(shape, 0.1), jnp.float32), "label": jnp.zeros((batch,), jnp.int32)}
    compile_s, step_s, costs = _time(update, state, batch_data, steps=steps, donate_first=True,
                                     profile_dir=profile_dir)
    images_per_s = batch / step_s
    gflop = dit_train_gflop_per_image(model)
    return {"model": name, "attention": attention, "remat": remat, "batch": batch, "latent": latent,
            "params_M": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
            "images_per_s": images_per_s, "step_ms": 1e3 * step_s, "compile_s": compile_s,
            "gflop_per_image": gflop, "mfu": images_per_s * gflop / 1e3 / _peak(),
            "xla_gflop_per_image": costs["flops"] / batch / 1e9,
            # The two floors a step cannot beat: its FLOPs at the peak rate, its bytes at the HBM bandwidth.
            "compute_bound_ms": costs["flops"] / _peak() / 1e9, "xla_gbytes": costs["bytes"] / 1e9,
            "bandwidth_bound_ms": costs["bytes"] / _card_value(PEAK_TBPS) / 1e9,
            "plan_gib": costs.get("plan_gib", float("nan")), "peak_memory_gib": _peak_memory_gib()}


def bench_sample(num_images: int, steps: int, latent: int, tiny: bool, attention: str, dtype) -> dict:
    from xray_dit import generate
    from xray_dit.diffusion import schedules
    from xray_dit.models import dit as dit_lib
    from xray_dit.models import vae as vae_lib

    model = dit_lib.make_dit("DiT-B/2" if not tiny else "DiT-S/2", input_size=latent, num_classes=1,
                             dtype=dtype, attention_impl=attention, **(TINY_DIT if tiny else {}))
    vae = vae_lib.make_vae("sd-vae-gray" if not tiny else TINY_VAE, dtype=dtype, attention_impl="xla")
    dit_params = _fresh_params(model)
    size = latent * vae.downsample_factor
    vae_params = _fresh_params(vae, seed=1)
    sampler = generate.make_sampler(model, vae, schedules.make_schedule(), sampler="ddim", num_steps=steps,
                                    guidance_scale=4.0, scale=0.18215)
    noise = jax.random.normal(jax.random.PRNGKey(2), (num_images, latent, latent, 4))
    labels = jnp.zeros((num_images,), jnp.int32)
    fn = lambda dp, vp, n, y: sampler(dp, vp, n, y, jax.random.PRNGKey(3))  # noqa: E731
    compile_s, seconds, _ = _time(fn, dit_params, vae_params, noise, labels, steps=1)
    # One network evaluation of a 1,000-row batch (500 images x cond/uncond), forward only.
    rows = 2 * num_images
    x = jax.random.normal(jax.random.PRNGKey(4), (rows, latent, latent, 4))
    t = jnp.full((rows,), 500, jnp.int32)
    y = jnp.zeros((rows,), jnp.int32)
    _, nfe_s, _ = _time(lambda p, x, t, y: model.apply({"params": p}, x, t, y), dit_params, x, t, y, steps=5)
    decode_only = lambda vp, z: vae.apply({"params": vp}, z, method=vae.decode)  # noqa: E731
    _, decode_s, _ = _time(decode_only, vae_params, noise, steps=2)
    return {"num_images": num_images, "ddim_steps": steps, "guidance": 4.0, "image_px": size,
            "seconds_total": seconds, "compile_s": compile_s, "nfe_rows": rows, "nfe_ms": 1e3 * nfe_s,
            "vae_decode_s": decode_s, "images_per_s": num_images / seconds}


def bench_vae_encode(batch: int, size: int, tiny: bool, dtype) -> dict:
    from xray_dit.models import vae as vae_lib
    vae = vae_lib.make_vae("sd-vae-gray" if not tiny else TINY_VAE, dtype=dtype, attention_impl="xla")
    params = _fresh_params(vae)
    x = jax.random.uniform(jax.random.PRNGKey(1), (batch, size, size, 1), minval=-1, maxval=1)
    _, seconds, _ = _time(lambda p, x: vae.apply({"params": p}, x, method=vae.encode), params, x, steps=5)
    latent_bytes = 2 * 4 * (size // vae.downsample_factor) ** 2 * 4 + 4  # mean + std float32 + label
    return {"batch": batch, "px": size, "images_per_s": batch / seconds, "cache_bytes_per_image": latent_bytes}


def _eva_model(size: int, tiny: bool, attention: str, dtype):
    from xray_dit.models import eva02 as eva02_lib
    # Patch 14 (timm's EVA-02) where the size allows, else 16 as configs/study.py uses at 256 px.
    patch = 8 if tiny else (14 if size % 14 == 0 else 16)
    return eva02_lib.make_eva02("S" if not tiny else "tiny", img_size=size, num_classes=14, in_channels=1,
                                patch_size=patch, dtype=dtype, attention_impl=attention, drop_path_rate=0.1)


def bench_eva(size: int, batch: int, steps: int, tiny: bool, attention: str, dtype) -> dict:
    from configs import base
    from xray_dit.train import classifier, loop
    model = _eva_model(size, tiny, attention, dtype)
    patch = model.patch_size
    params = _fresh_params(model)
    train = base.get_config().classifier.train

    def loss_fn(p, b, rng, step):
        logits = model.apply({"params": p}, b["image"], train=True, rngs={"dropout": rng})
        loss = classifier.bce_loss(logits, b["labels"], b["label_mask"])
        return loss, {}
    tx = loop.make_optimizer(train)
    update = loop.make_update_fn(loss_fn, tx, 0.0)
    state = {"params": params, "opt_state": jax.jit(tx.init)(params), "step": jnp.asarray(0, jnp.int32),
             "rng": jax.random.PRNGKey(1)}
    data = {"image": jax.random.uniform(jax.random.PRNGKey(2), (batch, size, size, 1), minval=-1, maxval=1),
            "labels": jnp.zeros((batch, 14)), "label_mask": jnp.ones((batch, 14))}
    compile_s, step_s, costs = _time(update, state, data, steps=steps, donate_first=True)
    return {"model": f"EVA-02-S/{patch}" if not tiny else "EVA-02-tiny", "px": size, "batch": batch,
            "images_per_s": batch / step_s, "step_ms": 1e3 * step_s, "compile_s": compile_s,
            "xla_gflop_per_image": costs["flops"] / batch / 1e9,
            "mfu_xla_flops": costs["flops"] / step_s / 1e12 / _peak(),
            # Not the device's peak: this runs in the suite's process, after other parts.
            "plan_gib": costs.get("plan_gib", float("nan"))}


def bench_loop(name: str, batch: int, latent: int, attention: str, dtype, tiny: bool, workdir: str) -> dict:
    """Seconds per step of the real `loop.train` (Grain over an array_record latent cache, device prefetch,
    metrics fetched every 50 steps, the preemption and checkpoint checks) against the bare compiled step.

    The task's `evaluate` hook, called every 10 steps, only reads the clock: the loop's rate between steps
    10 and 60 is free of compilation and start-up, and includes one metrics fetch, as training does.
    """
    import pathlib
    import shutil
    from array_record.python.array_record_module import ArrayRecordWriter
    from configs import base
    from xray_dit.train import dit as dit_trainer
    from xray_dit.train import loop

    root = pathlib.Path(workdir)
    shutil.rmtree(root, ignore_errors=True)
    (root / "latents").mkdir(parents=True)
    rng = np.random.default_rng(0)
    shape = (latent, latent, 4)
    writer = ArrayRecordWriter(str(root / "latents" / dit_trainer.CACHE_FILE), "group_size:1")
    for _ in range(8 * batch):
        writer.write(dit_trainer.latent_record(0, rng.normal(size=shape), np.full(shape, 0.1)))
    writer.close()
    model = _dit_model(name, latent, attention, "none", dtype, tiny)
    loss_fn, _, _ = _dit_update(model)
    first, last = 10, 60

    def loop_step_seconds(prefetch: int) -> float:
        config = base.get_config()
        config.dit.train.update(steps=last + 10, batch_size=batch, log_every=50, eval_every=first,
                                checkpoint_every=0, prefetch_batches=prefetch)
        clock = {}

        def read_clock(state, step, writer):
            del state, writer
            clock[step] = time.perf_counter()
            return {}
        data = iter(dit_trainer.latent_dataset(root / "latents", {"latent_shape": list(shape)}, batch_size=batch,
                                               seed=0))
        task = loop.TrainTask(name="dit", init_params=lambda r: factory.init_params(model, r),
                              loss_fn=loss_fn, train=config.dit.train, data=data, evaluate=read_clock)
        loop.train(config, root / f"run_prefetch_{prefetch}", task)
        return (clock[last] - clock[first]) / (last - first)

    bare_ms = bench_dit(name, batch, latent, attention, "none", steps=20 if not tiny else 5, dtype=dtype,
                        tiny=tiny)["step_ms"]
    out = {"model": name, "batch": batch, "bare_step_ms": bare_ms}
    for prefetch in (2, 0):   # the default first; the second run's compile is a cache hit
        step_ms = 1e3 * loop_step_seconds(prefetch)
        out[f"prefetch_{prefetch}"] = {"loop_step_ms": step_ms, "loop_images_per_s": 1e3 * batch / step_ms,
                                       "overhead": step_ms / bare_ms - 1}
    return out


# --------------------------------------------------------------------------------------------------
# The DiT rows: (model, attention, remat, batch); attention "auto" = cuDNN on GPUs, XLA elsewhere.
DIT_ROWS = (("DiT-B/2", "auto", "none", 256), ("DiT-L/2", "auto", "none", 256), ("DiT-XL/2", "auto", "none", 256),
            ("DiT-S/2", "auto", "none", 256), ("DiT-B/2", "auto", "dots", 256), ("DiT-B/2", "auto", "none", 512))


def _run_dit_row(spec: str, tiny: bool, profile_dir: str = "") -> dict | str:
    """One DiT row in its own process (peak memory and compile caches do not leak between rows, and an
    out-of-memory row cannot take the suite down): the result, or the error text."""
    cmd = [sys.executable, "-m", "bench.gpu_suite", "--single", spec] + (["--tiny"] if tiny else [])
    if profile_dir:
        cmd.append(f"--profile_dir={profile_dir}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "timed out after 300 s"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[0][7:]) if line else proc.stderr[-1500:]


@dataclasses.dataclass
class _Suite:
    """What every part needs: the settings of this run, its results so far, and the clock against the budget."""
    args: argparse.Namespace
    dtype: Any
    attention: str
    latent: int
    big: int          # the batch of the EVA-02, loop and pipeline parts
    out_dir: str
    work_dir: str     # bulky working files, outside out_dir
    results: dict
    start: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def tiny(self) -> bool:
        return self.args.tiny

    def left(self, what: str) -> bool:
        """Whether the budget allows starting `what`; if not, a note says it was skipped."""
        if time.perf_counter() - self.start < self.args.budget_s:
            return True
        self.results["notes"].append(f"skipped {what}: the time budget ({self.args.budget_s:.0f} s) was spent")
        return False

    def save(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        self.results["wall_s"] = time.perf_counter() - self.start
        with open(self.args.out, "w") as f:
            json.dump(self.results, f, indent=2, default=float)


def _part_dit(suite: _Suite) -> None:
    """The DiT rows, each in its own process; a row without remat that fails is retried with remat "dots"."""
    from bench import profile_summary
    args, results = suite.args, suite.results
    rows = [tuple(r.split(":")) for r in args.dit_rows.split(",")] if args.dit_rows else DIT_ROWS
    trace_dir = os.path.join(suite.work_dir, "trace")
    for i, (name, attn, remat, batch) in enumerate(rows):
        if not suite.left(f"{name} {attn} {remat} {batch}"):
            break
        profile = trace_dir if i == 0 else ""
        result = _run_dit_row(f"{name}:{attn}:{remat}:{batch}", suite.tiny, profile)
        if isinstance(result, str) and remat == "none":   # most likely out of memory: recompute instead
            results["notes"].append(f"{name} batch {batch} without remat failed: {result[-300:]}")
            remat = "dots"
            result = _run_dit_row(f"{name}:{attn}:{remat}:{batch}", suite.tiny, profile)
        if isinstance(result, str):
            results["notes"].append(f"{name} {attn} {remat} {batch} failed: {result[-600:]}")
        else:
            results["dit"].append(result)
            if profile:
                summary = profile_summary.summarise(profile_summary.load_trace(trace_dir), steps=PROFILE_STEPS)
                _keep_small_trace(trace_dir, suite.out_dir)
                results["profile"] = {"run": result, "summary": summary}
                print(profile_summary.format_table(summary), flush=True)
        print(result, flush=True)
        suite.save()


def _part_loop(suite: _Suite) -> None:
    suite.results["loop"] = bench_loop("DiT-B/2", suite.big, suite.latent, suite.attention, suite.dtype, suite.tiny,
                                       os.path.join(suite.work_dir, "loop_work"))
    print(suite.results["loop"], flush=True)


def _part_eva(suite: _Suite) -> None:
    suite.results["eva"] = []
    for size in ((224, 256) if not suite.tiny else (32,)):
        if suite.left(f"EVA-02 at {size} px"):
            suite.results["eva"].append(bench_eva(size, suite.big, 10 if not suite.tiny else 2, suite.tiny,
                                                  suite.attention, suite.dtype))
            print(suite.results["eva"][-1], flush=True)


def _part_pipeline(suite: _Suite) -> None:
    """The classifier's input pipeline with one Grain worker per core but the one running this process."""
    from absl import flags
    from bench import data_pipeline
    flags.FLAGS.mark_as_parsed()   # Grain's worker processes read absl flags
    workers = max(1, (os.cpu_count() or 2) - 1)
    suite.results["pipeline"] = []
    for size in ((224, 256) if not suite.tiny else (64,)):
        rate, source = data_pipeline.images_per_second(size, workers=workers, batch_size=suite.big,
                                                       seconds=8.0 if not suite.tiny else 1.0)
        suite.results["pipeline"].append({"px": size, "workers": workers, "cores": os.cpu_count(),
                                          "data": source, "images_per_s": rate})
        print(suite.results["pipeline"][-1], flush=True)


def _part_sample(suite: _Suite) -> None:
    suite.results["sample"] = bench_sample(500 if not suite.tiny else 4, 50 if not suite.tiny else 3, suite.latent,
                                           suite.tiny, suite.attention, suite.dtype)
    print(suite.results["sample"], flush=True)


def _part_vae(suite: _Suite) -> None:
    suite.results["vae_encode"] = bench_vae_encode(64 if not suite.tiny else 2, 256 if not suite.tiny else 32,
                                                   suite.tiny, suite.dtype)
    print(suite.results["vae_encode"], flush=True)


PARTS: dict[str, Callable[[_Suite], None]] = {"dit": _part_dit, "loop": _part_loop, "eva": _part_eva,
                                              "pipeline": _part_pipeline, "sample": _part_sample, "vae": _part_vae}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/out/gpu.json")
    parser.add_argument("--only", default=",".join(PARTS))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--budget_s", type=float, default=540.0, help="start nothing new after this many seconds")
    parser.add_argument("--dit_rows", default="", help="model:attention:remat:batch,... instead of DIT_ROWS")
    parser.add_argument("--render", default="", help="append the tables of this results JSON to bench/RESULTS.md")
    parser.add_argument("--single", default="", help=argparse.SUPPRESS)  # one DiT row, JSON to stdout
    parser.add_argument("--profile_dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = [part for part in args.only.split(",") if part not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r} in --only; choose from {','.join(PARTS)}")
    return args


def _render(path: str) -> None:
    with open(path) as f:
        results = json.load(f)
    with open(RESULTS_MD, "a") as f:
        f.write("\n" + render_markdown(results))
    print(render_markdown(results))


def _new_suite(args: argparse.Namespace, dtype, attention: str, latent: int) -> _Suite:
    """The suite's folders and results header; every process shares one persistent compilation cache."""
    out_dir = os.path.dirname(args.out) or "."
    os.makedirs(out_dir, exist_ok=True)
    # Bulky working files (compiled programs, the loop part's checkpoints, the raw trace) stay out of out_dir,
    # which a device run sends back whole; a fixed folder lets a second command on the same machine reuse them.
    work_dir = os.path.join(tempfile.gettempdir(), "xray_dit_gpu_suite")
    os.makedirs(work_dir, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(work_dir, "jax_cache")  # also for the row processes
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    results = {"device": _device_name(), "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
               "dtype": jnp.dtype(dtype).name, "peak_tflops": _peak(), "hbm_tbps": _card_value(PEAK_TBPS),
               "command": " ".join(["python -m bench.gpu_suite"] + sys.argv[1:]), "dit": [], "notes": []}
    return _Suite(args=args, dtype=dtype, attention=attention, latent=latent,
                  big=256 if not args.tiny else 8, out_dir=out_dir, work_dir=work_dir, results=results)


def main():
    args = _parse_args()
    if args.render:
        _render(args.render)
        return
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    attention = "cudnn" if on_gpu else "xla"
    latent, steps = (32, 20) if not args.tiny else (8, 2)
    if args.single:   # one DiT row, in the process `_run_dit_row` started
        name, attn, remat, batch = args.single.split(":")
        attn = attention if attn == "auto" else attn
        batch = int(batch) if not args.tiny else 8
        print("RESULT " + json.dumps(bench_dit(name, batch, latent, attn, remat, steps, dtype, args.tiny,
                                               profile_dir=args.profile_dir)))
        return
    suite = _new_suite(args, dtype, attention, latent)
    for part in args.only.split(","):
        if suite.left(part):
            PARTS[part](suite)
            suite.save()
    suite.save()
    markdown = render_markdown(suite.results)
    with open(os.path.join(suite.out_dir, "results.md"), "w") as f:
        f.write(markdown)
    print(markdown)


def _keep_small_trace(trace_dir: str, out_dir: str, max_mib: float = 20.0) -> None:
    """Copies the perfetto trace into out_dir (to open in ui.perfetto.dev later) unless it is large."""
    import glob
    import shutil
    traces = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    newest = max(traces, key=os.path.getmtime, default=None)
    if newest and os.path.getsize(newest) <= max_mib * 2**20:
        shutil.copy(newest, os.path.join(out_dir, "dit_trace.json.gz"))


RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def _num(value, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def render_markdown(results: dict) -> str:
    """The RESULTS.md section for one suite run: card, date, versions, command, then one table per part."""
    lines = [f"## GPU suite: `{results.get('command', 'python -m bench.gpu_suite')}` ({results['date']}, "
             f"{results['device']}, jax {results['jax']}, {results['dtype']} compute, float32 params)",
             f"MFU counts each model's matmul FLOPs (DiT-B/2: 138 GFLOP per training image) against "
             f"{_num(results['peak_tflops'])} TFLOP/s; the compute- and bandwidth-bound times are XLA's FLOP and "
             f"byte counts of the compiled step at the peak rate and at {_num(results.get('hbm_tbps'), 2)} TB/s.", ""]
    if results.get("dit"):
        lines += ["| model | attention | remat | batch | images/s | step (ms) | MFU | compute-bound (ms) | "
                  "bandwidth-bound (ms) | memory plan (GiB) | compile (s) |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["dit"]:
            lines.append(f"| {r['model']} ({r['params_M']:.1f} M) | {r['attention']} | {r['remat']} | {r['batch']} | "
                         f"{_num(r['images_per_s'])} | {_num(r['step_ms'], 1)} | {_num(100 * r['mfu'], 1, ' %')} | "
                         f"{_num(r['compute_bound_ms'], 1)} | {_num(r['bandwidth_bound_ms'], 1)} | "
                         f"{_num(r['plan_gib'], 1)} | {_num(r['compile_s'], 1)} |")
        lines.append("")
    if results.get("profile"):
        from bench import profile_summary
        run = results["profile"]["run"]
        lines += [f"Profile of {PROFILE_STEPS} {run['model']} steps ({run['attention']}, remat {run['remat']}, "
                  f"batch {run['batch']}):", "",
                  profile_summary.format_table(results["profile"]["summary"]), ""]
    if results.get("loop"):
        r = results["loop"]
        lines += [f"The real training loop (`loop.train`: Grain over an array_record latent cache, metrics fetched every "
                  f"50 steps) against the bare step, {r['model']} at batch {r['batch']}:", "",
                  "| batches prefetched to the device | loop step (ms) | bare step (ms) | host overhead | images/s |",
                  "|---:|---:|---:|---:|---:|"]
        for prefetch in (2, 0):
            p = r[f"prefetch_{prefetch}"]
            lines.append(f"| {prefetch} | {_num(p['loop_step_ms'], 1)} | {_num(r['bare_step_ms'], 1)} | "
                         f"{_num(100 * p['overhead'], 1, ' %')} | {_num(p['loop_images_per_s'])} |")
        lines.append("")
    if results.get("eva"):
        lines += ["| classifier | px | batch | images/s | step (ms) | MFU (XLA FLOPs) | memory plan (GiB) | compile (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["eva"]:
            lines.append(f"| {r['model']} | {r['px']} | {r['batch']} | {_num(r['images_per_s'])} | "
                         f"{_num(r['step_ms'], 1)} | {_num(100 * r['mfu_xla_flops'], 1, ' %')} | "
                         f"{_num(r['plan_gib'], 1)} | {_num(r['compile_s'], 1)} |")
        lines.append("")
    if results.get("pipeline"):
        lines += ["| input pipeline (decode PNG, augment, batch) | px | Grain workers | cores | images/s |",
                  "|---|---:|---:|---:|---:|"]
        for r in results["pipeline"]:
            lines.append(f"| {r['data']} | {r['px']} | {r['workers']} | {r['cores']} | {_num(r['images_per_s'])} |")
        lines.append("")
    if results.get("sample"):
        r = results["sample"]
        lines += [f"Generation: {r['num_images']} images with DDIM {r['ddim_steps']} + CFG {r['guidance']} + VAE decode "
                  f"to {r['image_px']} px in **{_num(r['seconds_total'], 2)} s** (compile {_num(r['compile_s'], 1)} s); "
                  f"one network evaluation of {r['nfe_rows']} rows: {_num(r['nfe_ms'], 1)} ms; VAE decode "
                  f"{_num(r['vae_decode_s'], 2)} s.", ""]
    if results.get("vae_encode"):
        r = results["vae_encode"]
        lines += [f"Latent cache: VAE encode at {r['px']} px, batch {r['batch']}: {_num(r['images_per_s'])} images/s; "
                  f"{r['cache_bytes_per_image']:,} bytes per cached image.", ""]
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
