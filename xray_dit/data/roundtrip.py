"""The round-trip store: an autoencoder reconstruction of every training image, found by image id.

Synthetic images are VAE decodes, smoother than real ones; a classifier can learn "smooth means the target
class" from them. The domain-gap mitigation takes that cue away: in the training pipeline each real
image is replaced by its stored round trip (encode, decode the posterior mean) with probability
`data.roundtrip_prob`, drawn afresh per example and epoch (`swap_mask`).

A store is a folder in the synthetic-folder format (PNGs + `manifest.csv`, see `xray_dit.data.synthetic`)
with an `image_id` column naming the real image each file reconstructs; labels are not read from it (the
real image's labels stay). `xray_dit.study.arms.write_roundtrip_store` writes one.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from etils import epath

from xray_dit.data.synthetic import MANIFEST, PngFolderSource, read_manifest

ID_COLUMN = "image_id"
# Separates the swap draws from the epoch plan's own stream, so switching the mitigation on leaves the
# order and the augmentation of every example as they were.
_SWAP_STREAM = 0x7270


class RoundtripSource(PngFolderSource):
    """`source[i]` → {"image": PNG bytes}: the stored round trip of `image_ids[i]`."""

    def __init__(self, folder: str | os.PathLike, image_ids: Sequence[str]):
        self.folder = epath.Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"no {MANIFEST} in the round-trip store {self.folder}; write it with "
                                    "xray_dit.study.arms.write_roundtrip_store")
        by_id = {row[ID_COLUMN]: row["file"] for row in read_manifest(manifest, ("file", ID_COLUMN), ValueError)}
        absent = [str(i) for i in image_ids if str(i) not in by_id]
        if absent:
            raise ValueError(f"the round-trip store {self.folder} lacks {len(absent)} of the {len(image_ids)} "
                             f"training images (e.g. {absent[:5]}); rewrite it from this dataset's train split")
        self.files = [by_id[str(i)] for i in image_ids]


def swap_mask(seed: int, epoch: int, count: int, prob: float) -> np.ndarray:
    """Which of an epoch's `count` entries read the round trip: a pure function of (seed, epoch, count, prob)."""
    if prob <= 0:
        return np.zeros(count, bool)
    return np.random.default_rng([seed, epoch, _SWAP_STREAM]).random(count) < prob
