"""The whole study design on the phantom data, on 2 CPU cores, in under an hour.

Command (from the repository root):
    python -m xray_dit.main --config=configs/phantom_full.py --workdir=workdir/phantom_full

Not run yet: the sizes below come from per-run timings, not from a run of this config.

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
        bootstrap_samples=500,
    )
    return config
