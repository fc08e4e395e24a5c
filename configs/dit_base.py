"""DiT-B/2 on 256x256 chest X-rays (32x32x4 latents), minority class only, 50,000 steps, batch 256.

The study's generative model at full scale, on an accelerator, with NIH ChestX-ray14 prepared once:
    python -m xray_dit.main --config=configs/dit_base.py --workdir=gs://BUCKET/dit_base \\
        --config.data.manual_dir=/data/nih --config.dit.vae_dir=gs://BUCKET/vae
(see README "Data" for where NIH files go; the VAE comes from a `train_vae` run or from imported SD-VAE
weights via `python -m xray_dit.tools.import_weights --kind=vae`). It first caches the VAE latents of every
Cardiomegaly training image (array_record under the workdir), then trains an unconditional DiT-B/2 on them
with EMA 0.9999, writing a DDIM sample grid from the EMA weights every 5,000 steps.
Expected: a smoothly falling epsilon-MSE; recognisable radiographs with enlarged hearts in the grids by
~20k steps. Throughput: bench/RESULTS.md has the measured img/s per card.
"""

from configs import base


def get_config(arg=None):
    config = base.get_config(arg)
    config.task = "train_dit"
    config.compute_dtype = "bfloat16"
    config.data.update(name="nih_chestxray14", builder_config="256", image_size=256,
                       labels=base.NIH_LABELS, target_class="Cardiomegaly", num_workers=8)
    config.dit.update(model="DiT-B/2", class_conditional=False)
    config.dit.train.update(steps=50_000, batch_size=256, lr=1e-4, ema_decay=0.9999)
    return config
