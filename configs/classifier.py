"""The EVA-02 classifier alone (task `train_classifier`): by default the quickstart's baseline, on CPU.

Command (from the repository root):
    python -m xray_dit.main --config=configs/classifier.py --workdir=workdir/classifier
What it does: prepares the 3,000-image phantom at 64x64 (`cxr_phantom/64`, Cardiomegaly prevalence 5 %,
5 % label noise) under <workdir>/tfds, and trains a tiny EVA-02 (patch 8, 64-wide, 4 blocks) on the
labels Cardiomegaly, Effusion, Nodule with positive-weighted BCE for 200 steps at batch 64, validating
every 100 steps and keeping the best Cardiomegaly validation AUC in <workdir>/best.
It produces, from those best parameters on the test split: test_auc.md (per-class AUC), roc_test.png,
confusion_<class>.png (threshold chosen on validation), predictions_{validation,test}.csv (image id,
patient id, labels, probabilities) and results.json, which also holds the pixel logistic-regression baselines
fitted on the same training images ("baselines", `classifier.baselines`).
Expected: the quickstart's baseline, i.e. a Cardiomegaly test AUC between about 0.70 and 0.92 (learned, not
saturated); a few minutes on 2 CPU cores.

NIH ChestX-ray14 at 224 px with all 14 findings, on an accelerator, from imported timm EVA-02-S weights
(`python -m xray_dit.tools.import_weights --kind=eva02 --model=S --image_size=224 --num_classes=14 ...`):
    python -m xray_dit.main --config=configs/classifier.py:nih --workdir=gs://BUCKET/classifier \\
        --config.data.manual_dir=/data/nih --config.classifier.init_from=weights/eva02_s
(without init_from it trains EVA-02-S from scratch; see README "Data" for where NIH files go).
"""

from configs import base

VARIANTS = ("phantom", "nih")


def get_config(arg=None):
    variant = arg or "phantom"
    if variant not in VARIANTS:
        raise ValueError(f"configs/classifier.py takes one of {VARIANTS} after the colon, got {arg!r}")
    config = base.get_config(arg)
    config.task = "train_classifier"
    if variant == "phantom":
        config.data.update(name="cxr_phantom", builder_config="64", image_size=64, num_workers=0)
        config.classifier.update(model="tiny", patch_size=8, drop_path_rate=0.0, layer_decay=1.0,
                                 pos_weight="balanced", select_metric="auc/Cardiomegaly")
        config.classifier.train.update(steps=200, batch_size=64, lr=1e-3, warmup_steps=20, weight_decay=0.05,
                                       log_every=50, eval_every=100, checkpoint_every=100)
    else:
        config.compute_dtype = "bfloat16"
        config.data.update(name="nih_chestxray14", builder_config="224", image_size=224,
                           labels=base.NIH_LABELS, num_workers=8)
        config.classifier.update(model="S", patch_size=14, drop_path_rate=0.1, layer_decay=0.75,
                                 pos_weight="balanced")
        config.classifier.train.update(steps=5000, batch_size=128, lr=3e-4, warmup_steps=300,
                                       eval_every=500, checkpoint_every=500)
    return config
