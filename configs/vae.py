"""The KL autoencoder alone (task `train_vae`): by default a small f8 VAE on the phantom at 64 px, on CPU.

Command (from the repository root):
    python -m xray_dit.main --config=configs/vae.py --workdir=workdir/vae
What it does: prepares the 3,000-image phantom at 64x64 (`cxr_phantom/64`, under <workdir>/tfds), trains a
VAE with 8-16-32-32 channels (64 px → 8x8x4 latents) for 400 steps at batch 16 with L1 + 0.2·(1 − SSIM)
+ 1e-6·KL, and every 200 steps writes a reconstruction grid (originals above, reconstructions below) to
<workdir>/reconstructions/ and PSNR/SSIM/CTR-preservation to TensorBoard.
It produces <workdir>/export (params + model.json with the latent `scaling_factor`, ready for
`--config.dit.vae_dir=<workdir>/export`) and <workdir>/vae_eval.json (validation PSNR, SSIM, share of
reconstructions whose cardiothoracic ratio stays within 0.03 of the original's).
Expected: the same VAE as the quickstart's; the heart and lung borders stay sharp in the reconstructions,
rib detail blurs. On 2 CPU cores, several minutes.

NIH ChestX-ray14 at 256 px (32x32x4 latents, the size configs/dit_base.py trains on), on an accelerator,
fine-tuning the imported Stable Diffusion VAE (`python -m xray_dit.tools.import_weights --kind=vae ...`):
    python -m xray_dit.main --config=configs/vae.py:nih --workdir=gs://BUCKET/vae \\
        --config.data.manual_dir=/data/nih --config.vae.init_from=weights/sd_vae
(leave init_from empty to train the SD-sized VAE from scratch; see README "Data" for where NIH files go).
"""

from configs import base

VARIANTS = ("phantom", "nih")


def get_config(arg=None):
    variant = arg or "phantom"
    if variant not in VARIANTS:
        raise ValueError(f"configs/vae.py takes one of {VARIANTS} after the colon, got {arg!r}")
    config = base.get_config(arg)
    config.task = "train_vae"
    if variant == "phantom":
        config.data.update(name="cxr_phantom", builder_config="64", image_size=64, num_workers=0)
        # The quickstart's VAE: narrow, because on 2 CPU cores the full-resolution convolutions dominate.
        config.vae.update(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
        config.vae.train.update(steps=400, batch_size=16, lr=2e-3, warmup_steps=40, log_every=100,
                                eval_every=200, checkpoint_every=200)
    else:
        config.compute_dtype = "bfloat16"
        config.data.update(name="nih_chestxray14", builder_config="256", image_size=256,
                           labels=base.NIH_LABELS, num_workers=8)
        # The SD-VAE architecture (base defaults), so imported SD weights fit when init_from is set.
        config.vae.train.update(steps=20_000, batch_size=32, lr=1e-4, eval_every=2000, checkpoint_every=2000)
    return config
