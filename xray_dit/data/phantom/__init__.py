"""Procedural frontal chest radiographs with a known cardiothoracic ratio: the project's embedded dataset.

Deterministic from a seed, needs no files. A *cohort* (`cohort.make_cohort`) is a list of `PhantomImage`
records (metadata only, cheap); `radiograph.render` draws one at any size. The anatomy and the CTR's
definition are in `anatomy`; `xray_dit.evaluation.ctr_oracle` reads the CTR back from pixels alone.

The names below are the phantom's public surface: `phantom.make_cohort(...)`, `phantom.render(...)`.
"""

from xray_dit.data.phantom.anatomy import Anatomy
from xray_dit.data.phantom.cohort import LABELS, SPLITS, VIEWS, PhantomImage, PhantomSpec, make_cohort
from xray_dit.data.phantom.radiograph import render

__all__ = ["LABELS", "SPLITS", "VIEWS", "Anatomy", "PhantomImage", "PhantomSpec", "make_cohort", "render"]
