"""The full-scale study on NIH ChestX-ray14, Cardiomegaly as the minority class, on one accelerator.

Command (NIH files laid out as README "Data" says; SD-VAE weights imported once, see below):
    python -m xray_dit.tools.import_weights --kind=vae --src=diffusion_pytorch_model.safetensors --out=weights/sd_vae
    python -m xray_dit.main --config=configs/study.py --workdir=gs://BUCKET/study \\
        --config.data.manual_dir=/data/nih --config.vae.init_from=weights/sd_vae

Phases as in the quickstart, at 256 px, with the whole design: EVA-02-S/16 baseline (5 seeds, checkpoints
selected on the validation AUC of Cardiomegaly, the class the study asks about), the SD VAE fine-tuned on
X-rays, two DiT-B/2 generators for 50,000 steps each (one on the Cardiomegaly latents alone, one
class-conditional on every training image, sampled for Cardiomegaly with classifier-free guidance 2.0),
three generator seeds each (1,500 images per generator and seed, so that the largest dose survives the
filters), and every arm kind: real + synthetic and real + oversampled real at 250, 500 and 1,000 images
(500 is the primary dose, fixed here before any result), and at 500 real + VAE round-trip real and
synthetic with real images round-tripped (p = 0.5); the phantom-only positive control is skipped on NIH.
The scarcity axis repeats it all with a quarter of the Cardiomegaly training patients (target fractions
1.0 and 0.25, each a sub-study in `<workdir>/fraction_<f>/`).
Expected wall time on one H200 (from measured step times, bench/RESULTS.md), per fraction: two DiTs,
50k steps × 256 at 2,880 img/s ≈ 2 × 74 min; VAE fine-tune 5k steps at ~0.19 s ≈ 16 min; generation of
6 × 1,500 images ≈ 2 min; classifier runs 5 seeds × (1 baseline + 28 arms) = 145 × 5k steps × 128 images,
not yet measured on GPU (estimated 1.5-3 min each: 3.5-7 hours). About 6-10 hours per fraction, 12-20 hours
in all; `--config.study.target_fractions='(1.0,)'` halves it, `--config.study.seeds='(0,1,2)'` saves 40 %
of the classifier time. Expected result: whatever the data say; the report states the AUC differences
with their confidence intervals. NIH's Cardiomegaly is 2.5 % of images.
EVA-02 at 256 px uses patch 16 (256 is not a multiple of 14), so it trains from scratch: timm's patch-14 weights
do not fit; the `pretrained_vit` variant below starts from them at 224 px instead.

Variants (`configs/study.py:<variant>`), each classifier starting from imported ImageNet weights; the
weights are imported once, before the run (a run whose `classifier.init_from` folder is missing stops at
once, naming the command):

`resnet50`: the same study with torchvision's ResNet-50 (IMAGENET1K_V2 weights, resnet50-11ad3fa6.pth from
download.pytorch.org/models; timm's resnet50.* safetensors import the same way), fine-tuned at 256 px:
    python -m xray_dit.tools.import_weights --kind=resnet --model=resnet50 --image_size=256 --num_classes=14 \\
        --src=resnet50-11ad3fa6.pth --out=weights/resnet50
    python -m xray_dit.main --config=configs/study.py:resnet50 --workdir=gs://BUCKET/study_resnet50 \\
        --config.data.manual_dir=/data/nih --config.vae.init_from=weights/sd_vae

`pretrained_vit`: EVA-02-S/14 at 224 px from timm's eva02_small_patch14_224.mim_in22k (model.safetensors from
the Hugging Face hub); the whole study runs at 224 px (DiT-B/2 on 28x28 latents):
    python -m xray_dit.tools.import_weights --kind=eva02 --model=S --image_size=224 --num_classes=14 \\
        --src=model.safetensors --out=weights/eva02_s
    python -m xray_dit.main --config=configs/study.py:pretrained_vit --workdir=gs://BUCKET/study_vit \\
        --config.data.manual_dir=/data/nih --config.vae.init_from=weights/sd_vae
"""

from configs import base

VARIANTS = ("eva02", "resnet50", "pretrained_vit")


def get_config(arg=None):
    variant = arg or "eva02"
    if variant not in VARIANTS:
        raise ValueError(f"configs/study.py takes one of {VARIANTS} after the colon, got {arg!r}")
    config = base.get_config(arg)
    config.task = "study"
    config.compute_dtype = "bfloat16"
    config.data.update(name="nih_chestxray14", builder_config="256", image_size=256, labels=base.NIH_LABELS,
                       target_class="Cardiomegaly", num_workers=8)
    config.classifier.update(model="S", patch_size=16, pos_weight="balanced", select_metric="auc/Cardiomegaly")
    config.classifier.train.update(steps=5000, batch_size=128, eval_every=500, checkpoint_every=500)
    config.vae.train.update(steps=5000, batch_size=32, lr=1e-5, warmup_steps=200, eval_every=1000,
                            checkpoint_every=1000)
    config.dit.update(model="DiT-B/2", class_conditional=False)
    config.dit.train.update(steps=50_000, batch_size=256, ema_decay=0.9999)
    config.study.update(
        seeds=(0, 1, 2, 3, 4),
        target_fractions=(1.0, 0.25),
        generators=("target_only", "class_conditional"),
        generator_seeds=(0, 1, 2),
        guidance_scale=2.0,
        num_synthetic=1500,
        synthetic_counts=(250, 500, 1000),
        primary_count=500,
        arms=("synthetic", "oversampled", "phantom_positive", "vae_roundtrip", "synthetic_mitigated"),
        swept_arms=("synthetic", "oversampled"),
        roundtrip_prob=0.5,
    )
    if variant == "resnet50":
        # No stochastic depth in torchvision's ResNet; layer decay over stem, four stages and head.
        config.classifier.update(model="resnet50", drop_path_rate=0.0, layer_decay=0.75, init_from="weights/resnet50")
    elif variant == "pretrained_vit":
        config.data.update(builder_config="224", image_size=224)
        config.classifier.update(model="S", patch_size=14, init_from="weights/eva02_s")
    return config
