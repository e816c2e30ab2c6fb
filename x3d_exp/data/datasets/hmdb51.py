"""HMDB51 as published (`data.format: hmdb51`): ROOT/<class>/<video>.avi and the three official splits,
<class>_test_split<N>.txt (lines `<video>.avi <0|1|2>`). Class ids: the class names in alphabetical order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from x3d_exp.data.datasets.base import (Layout, PathTable, VideoList, check_class_count, check_fold, read_lines,
                                        register_layout, where)
from x3d_exp.errors import DataError

# The official split files mark each video of a class: 1 train, 2 test, 0 in neither.
_HMDB_MARKS = {"train": "1", "val": "2", "test": "2"}


@register_layout("hmdb51")
class HMDB51(Layout):
    """ROOT/<class>/<video>.avi (data.video_dir) and <class>_test_splitN.txt (data.annotation_dir), N = data.split."""

    def read(self, data_cfg, root: Path, split: str) -> VideoList:
        fold, num_classes = int(data_cfg.split), data_cfg.num_classes
        annotation_dir, video_dir = data_cfg.annotation_dir, data_cfg.video_dir
        check_fold(fold, "HMDB51")
        suffix = f"_test_split{fold}.txt"
        folders = [root / annotation_dir, root] if annotation_dir else [root]
        split_files = next((files for files in (sorted(f.glob(f"*{suffix}")) for f in folders) if files), [])
        if not split_files:
            raise DataError(f"{folders[0] / ('<class>' + suffix)}: no HMDB51 split files found"
                            f"{' (nor in ' + str(root) + ')' if annotation_dir else ''}; check data.root and "
                            f"data.annotation_dir")
        pattern = split_files[0].parent / f"*{suffix}"
        # Class ids: alphabetical class names, as MMAction2 numbers them.
        by_class = {f.name[:-len(suffix)]: f for f in split_files}
        class_names = sorted(by_class)
        check_class_count(class_names, num_classes, pattern)
        videos = root / video_dir if video_dir else root
        # HMDB51 has no validation split: validation reads the test videos of the same split.
        wanted = _HMDB_MARKS[split]
        paths, labels = [], []
        for label, name in enumerate(class_names):
            split_file = by_class[name]
            for line_no, line in enumerate(read_lines(split_file), start=1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                    raise DataError(f"{where(split_file, line_no)}: malformed line {line.strip()!r}: expected "
                                    f"`<video>.avi <0|1|2>` (0 unused, 1 train, 2 test)")
                if parts[1] == wanted:
                    paths.append(str(videos / name / parts[0]))
                    labels.append(label)
        return VideoList(PathTable(paths), np.asarray(labels, np.int32), class_names, str(pattern))
