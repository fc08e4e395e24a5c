"""The whole accelerator benchmark in one go (fits well inside 10 minutes on one H100/H200).

    python -m bench.gpu_suite --out=bench/out/gpu.json [--only=dit,sample,vae,eva] [--tiny]

Measures, each with the project's real code paths (models, diffusion, loop.make_update_fn, optimiser, EMA):
  dit     training images/s, MFU, peak memory and compile time for DiT-S/B/L/XL at batch 256 on 32x32x4
  sample  500 images: DDIM 50 steps with CFG + VAE decode to 256 px; time per network evaluation of a
          1,000-row batch (DiT-B/2)
  vae     SD-size VAE encode images/s at 256 px (the latent cache's speed)
  eva     EVA-02-S training images/s at 224 and 256 px
`--tiny` shrinks everything so the script itself can be checked on a CPU. Results go to JSON; `bench.report`
turns them into the RESULTS.md table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xray_dit import sharding

# bf16 dense peak used for MFU: measured 8192^3 bf16 matmul on the H200 (issue #7) / H100 (device notes).
PEAK_TFLOPS = {"H200": 783.0, "H100": 790.0}
DIT_B2_GFLOP_PER_IMAGE = 138.0   # 23 GMAC forward x 2 x 3 (issue #7), the published-convention count
TINY_VAE = dict(in_channels=1, out_channels=1, block_out_channels=(32, 32), layers_per_block=1)
TINY_DIT = dict(hidden_size=64, depth=2, num_heads=4)


def _device_name() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", d.platform)


def _peak() -> float:
    kind = _device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in kind:
            return value
    return float("nan")


def _peak_memory_gib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def _time(fn, *args, steps: int, donate_first: bool = False):
    """Compile time, then seconds per call over `steps` calls (the first result fed back if donating)."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=(0,) if donate_first else ()).lower(*args).compile()
    compile_s = time.perf_counter() - start
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan")) if hasattr(compiled, "cost_analysis") else float("nan")
    if isinstance(flops, list):
        flops = flops[0].get("flops", float("nan"))
    state = args[0]
    out = None
    for i in range(steps + 2):  # two warm-up calls
        if i == 2:
            jax.block_until_ready(out)
            start = time.perf_counter()
        out = compiled(state, *args[1:])
        if donate_first:
            state = out[0]
    jax.block_until_ready(out)
    return compile_s, (time.perf_counter() - start) / steps, flops


# --------------------------------------------------------------------------------------------------
def bench_dit(name: str, batch: int, latent: int, attention: str, steps: int, dtype, tiny: bool = False) -> dict:
    from configs import base
    from xray_dit.diffusion import schedules
    from xray_dit.models import dit as dit_lib
    from xray_dit.train import dit as dit_trainer
    from xray_dit.train import loop

    model = dit_lib.make_dit(name, input_size=latent, in_channels=4, num_classes=0, learn_sigma=True,
                             dtype=dtype, attention_impl=attention, **(TINY_DIT if tiny else {}))
    train = base.get_config().dit.train
    tx = loop.make_optimizer(train)
    update = loop.make_update_fn(dit_trainer.make_loss_fn(model, schedules.make_schedule(), 0.18215), tx,
                                 train.ema_decay)
    params = jax.jit(lambda r: dit_lib.init_params(model, r))(jax.random.PRNGKey(0))
    params = sharding.unbox(params["params"])
    state = {"params": params, "ema_params": jax.tree.map(jnp.copy, params), "opt_state": jax.jit(tx.init)(params),
             "step": jnp.asarray(0, jnp.int32), "rng": jax.random.PRNGKey(1)}
    rng = np.random.default_rng(0)
    shape = (batch, latent, latent, 4)
    batch_data = {"mean": jnp.asarray(rng.normal(size=shape), jnp.float32),
                  "std": jnp.asarray(np.full(shape, 0.1), jnp.float32), "label": jnp.zeros((batch,), jnp.int32)}
    compile_s, step_s, flops = _time(update, state, batch_data, steps=steps, donate_first=True)
    images_per_s = batch / step_s
    n_params = sum(x.size for x in jax.tree.leaves(params))
    mfu = flops / step_s / 1e12 / _peak() if np.isfinite(flops) else float("nan")
    out = {"model": name, "attention": attention, "batch": batch, "latent": latent, "params_M": n_params / 1e6,
           "images_per_s": images_per_s, "step_ms": 1e3 * step_s, "compile_s": compile_s,
           "xla_gflop_per_image": flops / batch / 1e9, "mfu_xla_flops": mfu,
           "peak_memory_gib": _peak_memory_gib()}
    if name == "DiT-B/2" and latent == 32:
        out["mfu_138gflop"] = images_per_s * DIT_B2_GFLOP_PER_IMAGE / 1e3 / _peak()
    return out


def bench_sample(num_images: int, steps: int, latent: int, tiny: bool, attention: str, dtype) -> dict:
    from xray_dit.diffusion import schedules
    from xray_dit.models import dit as dit_lib
    from xray_dit.models import vae as vae_lib
    from xray_dit.train import dit as dit_trainer

    model = dit_lib.make_dit("DiT-B/2" if not tiny else "DiT-S/2", input_size=latent, num_classes=1,
                             dtype=dtype, attention_impl=attention, **(TINY_DIT if tiny else {}))
    vae = vae_lib.make_vae("sd-vae-gray" if not tiny else TINY_VAE, dtype=dtype, attention_impl="xla")
    dit_params = sharding.unbox(jax.jit(lambda r: dit_lib.init_params(model, r))(jax.random.PRNGKey(0)))["params"]
    size = latent * vae.downsample_factor
    vae_params = sharding.unbox(jax.jit(lambda r: vae.init(r, jnp.zeros((1, size, size, 1)), sample_posterior=False))(
        jax.random.PRNGKey(1)))["params"]
    sampler = dit_trainer.make_sampler(model, vae, schedules.make_schedule(), sampler="ddim", num_steps=steps,
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
    params = sharding.unbox(jax.jit(lambda r: vae.init(r, jnp.zeros((1, size, size, 1)), sample_posterior=False))(
        jax.random.PRNGKey(0)))["params"]
    x = jax.random.uniform(jax.random.PRNGKey(1), (batch, size, size, 1), minval=-1, maxval=1)
    _, seconds, _ = _time(lambda p, x: vae.apply({"params": p}, x, method=vae.encode), params, x, steps=5)
    latent_bytes = 2 * 4 * (size // vae.downsample_factor) ** 2 * 4 + 4  # mean + std float32 + label
    return {"batch": batch, "px": size, "images_per_s": batch / seconds, "cache_bytes_per_image": latent_bytes}


def bench_eva(size: int, batch: int, steps: int, tiny: bool, attention: str, dtype) -> dict:
    from configs import base
    from xray_dit.models import eva02 as eva02_lib
    from xray_dit.train import classifier, loop
    model = eva02_lib.make_eva02("S" if not tiny else "tiny", img_size=size, num_classes=14, in_channels=1,
                                 patch_size=14 if not tiny else 8, dtype=dtype, attention_impl=attention,
                                 drop_path_rate=0.1)
    params = sharding.unbox(jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 1))))(jax.random.PRNGKey(0)))["params"]
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
    compile_s, step_s, flops = _time(update, state, data, steps=steps, donate_first=True)
    return {"model": "EVA-02-S/14" if not tiny else "EVA-02-tiny", "px": size, "batch": batch,
            "images_per_s": batch / step_s, "compile_s": compile_s, "xla_gflop_per_image": flops / batch / 1e9,
            "mfu_xla_flops": flops / step_s / 1e12 / _peak() if np.isfinite(flops) else float("nan"),
            "peak_memory_gib": _peak_memory_gib()}


# --------------------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/out/gpu.json")
    parser.add_argument("--only", default="dit,sample,vae,eva")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--budget_s", type=float, default=480.0, help="skip what would start after this")
    parser.add_argument("--dit_models", default="DiT-B/2,DiT-S/2,DiT-L/2,DiT-XL/2")
    parser.add_argument("--single", default="", help=argparse.SUPPRESS)  # one DiT run, JSON to stdout
    args = parser.parse_args()
    tiny = args.tiny
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    attention = "cudnn" if on_gpu else "xla"
    batch, latent, steps = (256, 32, 20) if not tiny else (8, 8, 2)
    if args.single:
        name, attn = args.single.split(":")
        print("RESULT " + json.dumps(bench_dit(name, batch, latent, attn, steps, dtype, tiny)))
        return
    start = time.perf_counter()
    results = {"device": _device_name(), "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
               "dtype": jnp.dtype(dtype).name, "peak_tflops": _peak(), "dit": [], "notes": []}

    def left() -> bool:
        ok = time.perf_counter() - start < args.budget_s
        if not ok:
            results["notes"].append("skipped the rest: time budget")
        return ok

    def save():
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=float)

    only = set(args.only.split(","))
    if "dit" in only:
        runs = [(m, attention) for m in args.dit_models.split(",")]
        if on_gpu and "DiT-B/2" in args.dit_models.split(","):
            runs.insert(1, ("DiT-B/2", "xla"))  # the attention-implementation comparison
        for name, attn in runs:
            if not left():
                break
            # Each model in its own process: peak memory and compile caches do not leak between rows.
            cmd = [sys.executable, "-m", "bench.gpu_suite", "--single", f"{name}:{attn}"] + (["--tiny"] if tiny else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if line:
                results["dit"].append(json.loads(line[0][7:]))
                print(results["dit"][-1], flush=True)
            else:
                results["notes"].append(f"{name}/{attn} failed: {proc.stderr[-800:]}")
                print(proc.stderr[-2000:], flush=True)
            save()
    if "sample" in only and left():
        results["sample"] = bench_sample(500 if not tiny else 4, 50 if not tiny else 3, latent, tiny, attention, dtype)
        print(results["sample"], flush=True)
        save()
    if "vae" in only and left():
        results["vae_encode"] = bench_vae_encode(64 if not tiny else 2, 256 if not tiny else 32, tiny, dtype)
        print(results["vae_encode"], flush=True)
        save()
    if "eva" in only:
        results["eva"] = []
        for size in ((224, 256) if not tiny else (32,)):
            if not left():
                break
            results["eva"].append(bench_eva(size, 256 if not tiny else 4, 10 if not tiny else 2, tiny, attention, dtype))
            print(results["eva"][-1], flush=True)
            save()
    results["wall_s"] = time.perf_counter() - start
    save()
    print(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
