"""The generated default (`data.format: synthetic`, the synthetic and synthetic_hard groups): Kinetics csvs and
videos that x3d_exp.data.synthetic makes on first use, one set per size and parameters under data.root."""

from __future__ import annotations

from pathlib import Path
from typing import List

from x3d_exp.data.datasets.base import register_layout
from x3d_exp.data.datasets.kinetics import Kinetics
from x3d_exp.data.synthetic import MANIFEST, ensure_synthetic


@register_layout("synthetic")
class Synthetic(Kinetics):
    """Read as Kinetics from the generated set that fits the clip."""

    def root(self, data_cfg, min_size: int = 0) -> Path:
        return ensure_synthetic(data_cfg, min_size)

    def annotation_roots(self, root: Path) -> List[Path]:
        # data.root holds one generated set per clip size (or is one): any of them names the classes.
        return [root, *sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))]
