"""UCF101 as published (`data.format: ucf101`): the videos ROOT/UCF-101/<Class>/v_*.avi and the lists
ROOT/ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt (CRLF). Class ids: classInd's, minus one.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

from x3d_exp.data.datasets.base import (Layout, PathTable, VideoList, check_class_count, check_fold, read_lines,
                                        register_layout, where)
from x3d_exp.errors import DataError


def _ucf_classes(path: Path) -> List[str]:
    names = {}
    for line_no, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{where(path, line_no)}: malformed line {line.strip()!r}: expected `id ClassName`")
        class_id = int(parts[0])
        if class_id in names:
            raise DataError(f"{where(path, line_no)}: class id {class_id} appears twice")
        names[class_id] = parts[1]
    if sorted(names) != list(range(1, len(names) + 1)):
        raise DataError(f"{path}: class ids must be 1..{len(names)} (classInd is 1-based)")
    return [names[i] for i in range(1, len(names) + 1)]


@register_layout("ucf101")
class UCF101(Layout):
    """ROOT/UCF-101/<Class>/<video>.avi and ROOT/ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt,
    N = data.split; val and test both read testlist0N (UCF101 has no validation list)."""

    def read(self, data_cfg, root: Path, split: str) -> VideoList:
        fold, num_classes = int(data_cfg.split), data_cfg.num_classes
        check_fold(fold, "UCF101")
        lists = root / "ucfTrainTestlist"
        class_file = lists / "classInd.txt"
        class_names = _ucf_classes(class_file)
        check_class_count(class_names, num_classes, class_file)
        by_folder = {name: i for i, name in enumerate(class_names)}
        # The published file names disagree in case with classInd in places (HandStandPushups vs HandstandPushups).
        by_folder_lower = {name.lower(): i for i, name in enumerate(class_names)}
        # UCF101 has no validation split: validation reads the test list of the same fold.
        list_path = lists / (f"trainlist0{fold}.txt" if split == "train" else f"testlist0{fold}.txt")
        paths, labels = [], []
        for line_no, line in enumerate(read_lines(list_path), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 2:
                raise DataError(f"{where(list_path, line_no)}: malformed line {line.strip()!r}: expected "
                                f"`Class/v_Class_gXX_cYY.avi [label]`")
            video = parts[0]
            folder = video.split("/")[0] if "/" in video else ""
            label = by_folder.get(folder, by_folder_lower.get(folder.lower()))
            if label is None:
                raise DataError(f"{where(list_path, line_no)}: unknown class folder {folder!r} (not in "
                                f"{class_file.name})")
            if len(parts) == 2:
                if not parts[1].isdigit():
                    raise DataError(f"{where(list_path, line_no)}: malformed line {line.strip()!r}: label "
                                    f"{parts[1]!r} is not an integer")
                if int(parts[1]) - 1 != label:
                    raise DataError(f"{where(list_path, line_no)}: label {parts[1]} disagrees with the class folder "
                                    f"{folder!r} (id {label + 1} in {class_file.name})")
            paths.append(str(root / "UCF-101" / video))
            labels.append(label)
        return VideoList(PathTable(paths), np.asarray(labels, np.int32), class_names, str(list_path))
