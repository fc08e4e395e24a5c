"""Quickstart: the whole study, tiny, on the embedded phantom data, on 2 CPU cores.

Command (from the repository root):
    python -m xray_dit.main --config=configs/quickstart.py --workdir=workdir/quickstart

What it does: prepares 3,000 procedural chest radiographs at 64x64 (the `cxr_phantom` dataset,
Cardiomegaly prevalence 5 %), trains a tiny ResNet baseline (3 seeds), a small f8 VAE (64 px → 8x8x4
latents), a tiny DiT on the Cardiomegaly latents, generates 500 Cardiomegaly images, filters them and
retrains the classifier (3 seeds) on three arms at one dose of 200 images: real + synthetic, real +
oversampled real (the primary contrast, synthetic − oversampled) and real + fresh phantom patients with the
finding (the positive control: what perfect synthetic data would do). Writes `workdir/quickstart/report.md`
and `report.html`.
Expected: the baseline's Cardiomegaly test AUC lands between 0.70 and 0.92 (learned, not saturated; measured
0.765 [0.683, 0.855]); at least 80 % of the generated images have an enlarged heart by the CTR oracle
(measured 95 % of the measurable ones). Time on 2 idle CPU cores, estimated from the measured per-phase
times in bench/RESULTS.md (the two-arm version took 11 min 10 s): preparation 14 s, baseline 94 s, VAE
110 s, DiT 235 s, generation 14 s, filters 6 s, retraining 9 runs at ~32 s = 290 s (+ ~3 s to render the
200 control images), comparison and report ~10 s: about 13 minutes (not yet measured with three arms).
The report says whether each arm differs significantly.
"""

from configs import base


def get_config(arg=None):
    config = base.get_config(arg)
    config.task = "study"
    config.data.update(name="cxr_phantom", builder_config="64", image_size=64, num_workers=0)

    # Model selection on the target class's validation AUC: the study's question is about that class.
    # A tiny ResNet: on real NIH images (bench/RESULTS.md, 5-fold CV at 64 px) it matches or beats a logistic
    # regression on 16 px pixels, where the tiny EVA-02 stayed 0.1 AUC below it.
    config.classifier.update(model="resnet_tiny", drop_path_rate=0.0, layer_decay=1.0,
                             pos_weight="balanced", select_metric="auc/Cardiomegaly")
    config.classifier.train.update(steps=200, batch_size=64, lr=1e-3, warmup_steps=20, weight_decay=0.05,
                                   log_every=50, eval_every=100, checkpoint_every=100)

    # Narrow on purpose: on 2 CPU cores the 64 px full-resolution convolutions dominate the VAE's cost.
    config.vae.update(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
    config.vae.train.update(steps=400, batch_size=16, lr=2e-3, warmup_steps=40, log_every=100,
                            eval_every=200, checkpoint_every=200)

    config.dit.update(model="DiT-S/2", hidden_size=128, depth=4, num_heads=4, diffusion_steps=1000)
    config.dit.train.update(steps=4000, batch_size=32, lr=1e-3, warmup_steps=100, schedule="cosine",
                            ema_decay=0.999, log_every=500, eval_every=2000, checkpoint_every=1000)

    # Ancestral DDPM on 100 respaced steps: with this small, briefly trained DiT, deterministic DDIM turns the
    # model's error at high noise into blotches (seen: 0 of 16 DDIM-50 samples had a measurable heart vs 59 of
    # 64 with DDPM-100).
    config.sample.update(num_images=500, sampler="ddpm", num_steps=100, batch_size=250)
    config.study.update(seeds=(0, 1, 2), num_synthetic=500, synthetic_counts=(200,), primary_count=200,
                        arms=("synthetic", "oversampled", "phantom_positive"), generators=("target_only",),
                        generator_seeds=(0,), bootstrap_samples=500)
    return config
