"""Video data: Kinetics-400/600, UCF101, HMDB51 and Something-Something v2 in their published layouts, a folder of
one's own videos per class, and a generated synthetic default.

    from x3d_exp.data import build_loader, load_video_views, DataError, ensure_synthetic

See `build_loader` for the columns of each split, `load_video_views` for single files (task=infer).
"""

from x3d_exp.errors import DataError
from x3d_exp.data.loader import (Loader, build_loader, load_video_views, pipeline_errors, resolve_num_classes,
                                 resolve_num_workers)
from x3d_exp.data.synthetic import ensure_synthetic

__all__ = ["DataError", "Loader", "build_loader", "ensure_synthetic", "load_video_views", "pipeline_errors",
           "resolve_num_classes", "resolve_num_workers"]
