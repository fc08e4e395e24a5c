"""Tiny configs and prepared phantom data for the trainer tests (each task runs in seconds on CPU).

The phantom is prepared here, in this process (`prepare_workers=0`), into a data dir shared by all the
tests of a session, so no trainer ever spends time (or worker processes) preparing it again.
"""

from __future__ import annotations

import os

import ml_collections

from configs import quickstart
from xray_dit.data import builders, phantom
from xray_dit.data.builders import cxr_phantom

# The 300-image phantom at 64 px, by a name the phantom builder knows (`<size>_n<count>`).
PHANTOM_NAME = "64_n300"
PHANTOM_SIZE = 64

# Balanced Cardiomegaly, clean labels, hearts far from the 0.5 threshold: an easy task a tiny ViT can
# solve in a few hundred CPU steps, so an AUC well below 1 there means the classifier trainer is broken.
EASY_NAME = "64_easy"
EASY_SPEC = phantom.PhantomSpec(cardiomegaly_prevalence=0.5, label_noise=0.0, ctr_normal_mean=0.40,
                                ctr_enlarged_mean=0.62, ctr_std=0.02, pose_jitter=0.5, exposure_jitter=0.05)
EASY_COUNT = 800


def prepare_phantom(data_dir: str | os.PathLike) -> None:
    """The `64_n300` phantom, exactly as a trainer would prepare it, without workers."""
    builders.prepare("cxr_phantom", PHANTOM_NAME, data_dir=data_dir, prepare_workers=0)


def prepare_easy_phantom(data_dir: str | os.PathLike) -> None:
    config = cxr_phantom.PhantomConfig(name=EASY_NAME, size=PHANTOM_SIZE, num_images=EASY_COUNT, spec=EASY_SPEC,
                                       description="balanced, noise-free Cardiomegaly phantom")
    builders.prepare("cxr_phantom", config, data_dir=data_dir, prepare_workers=0)


def tiny_config(data_dir: str | os.PathLike | None = None) -> ml_collections.ConfigDict:
    """All four tasks at toy size on the 300-image phantom; 20 steps each, evaluated every 10."""
    config = quickstart.get_config()
    config.data.update(builder_config=PHANTOM_NAME, data_dir=os.fspath(data_dir) if data_dir else "")
    # The tiny EVA-02 (patch 8): the trainer tests exercise the ViT; the micro study runs the quickstart's ResNet.
    config.classifier.update(model="tiny", patch_size=8)
    every = dict(steps=20, batch_size=16, log_every=10, eval_every=10, checkpoint_every=10)
    config.vae.update(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)
    config.vae.train.update(**every)
    config.classifier.train.update(**every)
    config.dit.update(hidden_size=64, depth=2, num_heads=4)
    config.dit.train.update(**every)
    config.sample.update(num_images=20, batch_size=16, num_steps=5)
    return config


def easy_classifier_config(data_dir: str | os.PathLike, *, steps: int) -> ml_collections.ConfigDict:
    """The tiny EVA-02 on the easy phantom, validated (and its best parameters kept) every 50 steps."""
    config = tiny_config(data_dir)
    config.data.builder_config = EASY_NAME
    config.classifier.update(pos_weight="", select_metric="auc/Cardiomegaly")
    config.classifier.train.update(steps=steps, batch_size=32, lr=1e-3, warmup_steps=20, log_every=50,
                                   eval_every=50, checkpoint_every=steps)
    return config
