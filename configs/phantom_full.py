"""The whole study design on the phantom data, on 2 CPU cores, in under an hour.

Command (from the repository root):
    python -m xray_dit.main --config=configs/phantom_full.py --workdir=workdir/phantom_full

Run once (2026-12-01, tiny ResNet classifier; bench/RESULTS.md): baseline Cardiomegaly AUC 0.943, above the
phantom's intended 0.70-0.92 (the report flags it). The class-conditional DiTs had 11-17 of 500 images accepted,
too few for any dose, so only target_only arms ran (doses 100 and 155 at fraction 1.0, 100 and 180 at 0.25).
Primary contrast synthetic − oversampled: +0.002 [-0.011, +0.016] at fraction 1.0; -0.020 [-0.046, -0.001]
(Holm p 0.036, synthetic worse) at fraction 0.25. The positive control was NOT significant (+0.007 [-0.004,
+0.020] and +0.033 [-0.014, +0.080], Holm p 0.98 in a family of 7): near a saturated baseline, with 37 test
positives and 3 seeds, this design cannot yet show a true gain. Time: 55 min 37 s wall for the run that did
fraction 1.0's retraining onwards and all of fraction 0.25, on 2 cores shared with other jobs; the phases' own
times add up to 76 minutes under that load.

What it does, on the quickstart's 3,000 phantom radiographs at 64 px and its tiny models: the scarcity axis
(the target class's training patients at fractions 1.0 and 0.25, each a complete sub-study in
`workdir/phantom_full/fraction_<f>/`), both generator variants (a DiT on the Cardiomegaly latents alone, and
one class-conditional DiT on every training image sampled for Cardiomegaly with classifier-free guidance
2.0), two generator seeds each (4 sets of 500 images per fraction), and every arm kind: real + synthetic and
real + oversampled real at doses 100, 200 and 400 (dose-response), and at the primary dose 200 the phantom
positive control, real + VAE round-trip real, and synthetic with the real images round-tripped (p = 0.5)
against the VAE's smoothness cue. One report (`report.md`) covers all of it.

Time on 2 idle cores, estimated per fraction from bench/RESULTS.md (a quickstart classifier run of 200
steps takes ~32 s, of which ~7 s are evaluation and start-up; the DiT trains at ~18 steps/s; the VAE 400
steps in 110 s): baseline 3 runs × ~18 s = 55 s; VAE 300 steps 85 s; two DiTs × 2,000 steps 225 s;
generation 4 × 500 images ~75 s (class-conditional sampling runs the batch twice for guidance); filters
and control folders ~35 s; retraining 21 arms × 3 seeds = 63 runs × ~18 s = 1,135 s; comparison and
privacy ~60 s. About 28 minutes per fraction, 56 minutes in all.

Trade-offs made to fit the hour:
  - 3 classifier seeds, not 5: 5 would need ~105 more classifier runs (~30 more minutes). The seed-level
    spread in the report is therefore estimated from 3 runs per arm.
  - classifier 100 steps (the quickstart's 200): a weaker baseline (expect an AUC a few points below the
    quickstart's 0.765), the same for every arm, so the contrasts stay fair.
  - DiTs 2,000 steps (the quickstart's 4,000) and the VAE 300 steps (400): fewer generated images will
    pass the filters and fewer will show an enlarged heart; the doses are capped at what the best-supplied
    generator variant accepted, and a variant with fewer is left out at the doses it cannot supply
    (`arms.plan_arms`; 05_filter's counts say which).
"""

from configs import quickstart


def get_config(arg=None):
    config = quickstart.get_config(arg)
    # 6,000 images, 60 % of the patients in test (cxr_phantom's "64_study"): the quickstart's training and
    # validation sizes, five times its test positives, so that a true gain of a few AUC points can show.
    config.data.builder_config = "64_study"
    config.classifier.train.update(steps=100, warmup_steps=10, eval_every=50, checkpoint_every=50, log_every=50)
    config.vae.train.update(steps=300, eval_every=150, checkpoint_every=150)
    config.dit.train.update(steps=2000, eval_every=1000, checkpoint_every=1000)
    config.study.update(
        seeds=(0, 1, 2),
        target_fractions=(1.0, 0.25),
        generators=("target_only", "class_conditional"),
        generator_seeds=(0, 1),
        guidance_scale=2.0,
        num_synthetic=500,
        synthetic_counts=(100, 200, 400),
        primary_count=200,
        arms=("synthetic", "oversampled", "phantom_positive", "vae_roundtrip", "synthetic_mitigated"),
        swept_arms=("synthetic", "oversampled"),
        roundtrip_prob=0.5,
        # 13 comparisons in the Holm family: 500 resamples cannot reach Holm p ≤ 0.05 (13 × 2 / 501 > 0.05).
        bootstrap_samples=2000,
    )
    return config
