"""What the study's phases share: the phase list, the completion markers, and a `StudyContext`.

A `StudyContext` carries the config, the workdir, the mesh and every finished phase's result. It also
keeps what more than one phase measures with or on, computed on first use and held for the rest of the
run: the probe (the baseline classifier as a measuring instrument) and the real and synthetic image
sets, which 05_filter and 08_privacy would otherwise each read and decode again. Held in host memory:
the training split as float32 images (N x H x W x 4 bytes).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import ml_collections
from etils import epath

from xray_dit.study import probe as probe_lib

PHASES = ("01_baseline", "02_vae", "03_dit", "04_generate", "05_filter", "06_retrain", "07_compare",
          "08_privacy", "09_report")
MARKER = "DONE.json"


@dataclasses.dataclass
class StudyContext:
    config: ml_collections.ConfigDict     # with data.data_dir pinned to the study's prepared data
    workdir: epath.Path
    mesh: Any
    results: dict[str, Any]               # phase name → its result (from its marker)
    _cache: dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False)

    def phase_dir(self, phase: str) -> epath.Path:
        return self.workdir / phase

    def with_seed(self, seed: int) -> ml_collections.ConfigDict:
        config = ml_collections.ConfigDict(self.config.to_dict())
        config.seed = int(seed)
        return config

    def probe(self) -> probe_lib.ClassifierProbe:
        """The first baseline seed's selected classifier (needs 01_baseline's result)."""
        return self._cached("probe", lambda: probe_lib.ClassifierProbe(self.results))

    def real_images(self, split: str, *, only_class: str | None = None) -> probe_lib.ImageSet:
        """Every image of `split` (or only those of `only_class`) with labels, ids and patients."""
        return self._cached(("real", split, only_class), lambda: probe_lib.real_images(
            self.config, self.mesh, split, only_class=only_class))

    def generators(self) -> list[dict]:
        """04_generate's entries, one per generator variant x generator seed: name, variant, seed, out_dir, count."""
        return list(self.results["04_generate"]["generators"])

    def synthetic_images(self, generator_name: str | None = None) -> probe_lib.ImageSet:
        """Every image the named generator wrote in 04_generate (None: the first one), before any filter."""
        entries = self.generators()
        if generator_name is None:
            entry = entries[0]
        else:
            matches = [e for e in entries if e["name"] == generator_name]
            if not matches:
                raise KeyError(f"no generator {generator_name!r}; 04_generate made {[e['name'] for e in entries]}")
            entry = matches[0]
        folder = entry["out_dir"]
        return self._cached(("synthetic", folder), lambda: probe_lib.synthetic_images(
            folder, list(self.config.data.labels)))

    def _cached(self, key, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


def phase_seconds(workdir: epath.Path) -> dict[str, float]:
    """Wall seconds of every finished phase, from its marker."""
    out = {}
    for phase in PHASES:
        marker = epath.Path(workdir) / phase / MARKER
        if marker.exists():
            out[phase] = float(json.loads(marker.read_text())["seconds"])
    return out
