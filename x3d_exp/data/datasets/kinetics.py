"""Kinetics-400/600 (`data.format: kinetics`): the official csvs as published, or PySlowFast's `path label` lists.

Official: ROOT/{prefix}_{split}.csv with the header label,youtube_id,time_start,time_end,split, and the videos
ROOT/<split column>/<youtube_id>_<start:06d>_<end:06d>.mp4. Class ids: the train csv's labels in alphabetical order.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from x3d_exp.data.datasets.base import (AnnotationNotFound, Layout, PathTable, VideoList, check_class_count,
                                        first_existing, register_layout, slowfast_lists, where)
from x3d_exp.errors import DataError

# Kinetics releases name their validation split `val` or `validate`, in file names, in the csv `split`
# column and in the folders people extract the videos to.
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "validate", "valid"), "test": ("test",)}
_KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


def _read_kinetics_csv(path: Path):
    """Rows of an official Kinetics csv as (line, label, youtube_id, start, end, split_column)."""
    if not path.is_file():
        raise AnnotationNotFound(path)
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{where(path, 1)}: empty file, expected the header "
                            f"label,youtube_id,time_start,time_end,split")
        header = [h.strip() for h in header]
        missing = [c for c in _KINETICS_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{where(path, 1)}: header {','.join(header)!r} lacks column(s) {', '.join(missing)} "
                            f"(expected label,youtube_id,time_start,time_end,split)")
        col = {name: header.index(name) for name in header}
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{where(path, line)}: malformed line: {len(row)} fields, the header has "
                                f"{len(header)}")
            label = row[col["label"]].strip()
            youtube_id = row[col["youtube_id"]].strip()
            if not label or not youtube_id:
                raise DataError(f"{where(path, line)}: malformed line: empty label or youtube_id")
            try:
                start, end = (int(float(row[col[k]])) for k in ("time_start", "time_end"))
            except ValueError:
                raise DataError(f"{where(path, line)}: malformed line: time_start/time_end "
                                f"{row[col['time_start']]!r}/{row[col['time_end']]!r} are not numbers") from None
            split_value = row[col["split"]].strip() if "split" in col else ""
            rows.append((line, label, youtube_id, start, end, split_value))
    return rows


def _video_folder(root: Path, split_value: str, csv_split: str, cache: dict) -> Path:
    """Folder of a Kinetics csv row: the `split` column's value, or the folder name its aliases use on disk."""
    key = split_value or csv_split
    if key not in cache:
        canonical = next((s for s, names in _SPLIT_ALIASES.items() if key in names), key)
        candidates = [key, canonical, *_SPLIT_ALIASES.get(canonical, ())]
        cache[key] = next((root / c for c in candidates if (root / c).is_dir()), root / canonical)
    return cache[key]


def _kinetics_official(root: Path, prefix: str, split: str, csv_path: Path,
                       num_classes: Optional[int]) -> VideoList:
    rows = _read_kinetics_csv(csv_path)
    train_csv = first_existing(root, [f"{prefix}_train.csv"])
    # Alphabetical order of the training labels, as PySlowFast / PyTorchVideo / MMAction2 number them. A split
    # read without its train csv (an evaluation-only copy) uses its own labels: the count check below catches
    # a split that misses some classes.
    class_source = train_csv or csv_path
    class_rows = rows if class_source == csv_path else _read_kinetics_csv(class_source)
    class_names = sorted({r[1] for r in class_rows})
    check_class_count(class_names, num_classes, class_source)
    class_id = {name: i for i, name in enumerate(class_names)}
    paths, labels, folders = [], [], {}
    for line, label, youtube_id, start, end, split_value in rows:
        if label not in class_id:
            raise DataError(f"{where(csv_path, line)}: unknown class {label!r} (not in {class_source.name})")
        folder = _video_folder(root, split_value, split, folders)
        paths.append(str(folder / f"{youtube_id}_{start:06d}_{end:06d}.mp4"))
        labels.append(class_id[label])
    return VideoList(PathTable(paths), np.asarray(labels, np.int32), class_names, str(csv_path))


@register_layout("kinetics")
class Kinetics(Layout):
    """The official csvs `{data.annotation_prefix}_{train,val,test}.csv`, else PySlowFast's `{split}.csv` lists."""

    def read(self, data_cfg, root: Path, split: str) -> VideoList:
        prefix, num_classes = data_cfg.annotation_prefix, data_cfg.num_classes
        aliases = _SPLIT_ALIASES[split]
        official = first_existing(root, [f"{prefix}_{s}.csv" for s in aliases])
        if official is not None:
            return _kinetics_official(root, prefix, split, official, num_classes)
        lists = first_existing(root, [f"{s}.csv" for s in aliases])
        if lists is not None:
            return slowfast_lists(root, lists, num_classes)
        raise AnnotationNotFound(root / f"{prefix}_{split}.csv", f" (nor the PySlowFast list {root / f'{split}.csv'});"
                                                                 f" check data.root and data.annotation_prefix")
