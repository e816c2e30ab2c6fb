"""Dataset layouts, one module each, registered under their `data.format` name (x3d_exp.data.datasets.base):
kinetics (also PySlowFast's lists), ucf101, hmdb51, ssv2, folder (one's own videos) and synthetic (generated).

Adding a layout is one module here that registers a `Layout` subclass, imported below, and one conf/data/*.yaml
that names it in `format` (docs/data.md, "Adding a dataset layout").
"""

from x3d_exp.data.datasets.base import (LAYOUTS, SPLITS, VIDEO_EXTENSIONS, AnnotationNotFound, Layout, PathTable,
                                        VideoList, check_class_count, dataset_layout, is_video, load_split, read_lines,
                                        register_layout)
# Imported for their registration; the order is the one error messages list them in.
from x3d_exp.data.datasets import kinetics, ucf101, hmdb51, ssv2, folder, synthetic  # noqa: F401

__all__ = ["LAYOUTS", "SPLITS", "VIDEO_EXTENSIONS", "AnnotationNotFound", "Layout", "PathTable", "VideoList",
           "check_class_count", "dataset_layout", "is_video", "load_split", "read_lines", "register_layout"]
