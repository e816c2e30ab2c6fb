"""Readers for the annotation files exactly as Kinetics, PySlowFast and UCF101 publish them.

Each reader returns a `VideoList`: absolute video paths, int32 labels and the class names (index = class id).
Every problem with an annotation fails here, before any worker starts, as a `DataError` naming file and line.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from x3d_exp.errors import DataError

SPLITS = ("train", "val", "test")
# Kinetics releases name their validation split `val` or `validate`, in file names, in the csv `split`
# column and in the folders people extract the videos to.
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "validate", "valid"), "test": ("test",)}
_KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


class PathTable:
    """Many paths in two numpy arrays instead of a list of str.

    Forked loader workers touch every Python object they read, which un-shares its memory page
    (reference counts); a few numpy buffers stay shared however long the list is.
    """

    def __init__(self, paths: Sequence[str]):
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return self._blob[start:int(self._ends[i])].tobytes().decode("utf-8", "surrogateescape")

    def subset(self, indices: Sequence[int]) -> "PathTable":
        return PathTable([self[int(i)] for i in indices])


@dataclass
class VideoList:
    paths: PathTable
    labels: np.ndarray
    class_names: List[str]
    annotation: str  # the file the list came from, for messages

    def __len__(self) -> int:
        return len(self.paths)


def _where(path: Path, line: Optional[int] = None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def _read_lines(path: Path) -> List[str]:
    """Lines without their CRLF/LF ending (UCF101 ships CRLF)."""
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    with open(path, encoding="utf-8", newline=None) as f:
        return [line.rstrip("\n").rstrip("\r") for line in f]


def _first_existing(root: Path, names: Sequence[str]) -> Optional[Path]:
    for name in names:
        if (root / name).is_file():
            return root / name
    return None


def _check_class_count(class_names: Sequence[str], num_classes: int, source: Path) -> None:
    if len(class_names) != num_classes:
        raise DataError(f"{source}: defines {len(class_names)} classes but data.num_classes={num_classes} "
                        f"(set data.num_classes={len(class_names)} or fix the annotation)")


# --- Kinetics, official csv -------------------------------------------------------------------------------


def _read_kinetics_csv(path: Path):
    """Rows of an official Kinetics csv as (line, label, youtube_id, start, end, split_column)."""
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{_where(path, 1)}: empty file, expected the header "
                            f"label,youtube_id,time_start,time_end,split")
        header = [h.strip() for h in header]
        missing = [c for c in _KINETICS_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{_where(path, 1)}: header {','.join(header)!r} lacks column(s) {', '.join(missing)} "
                            f"(expected label,youtube_id,time_start,time_end,split)")
        col = {name: header.index(name) for name in header}
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{_where(path, line)}: malformed line: {len(row)} fields, the header has "
                                f"{len(header)}")
            label = row[col["label"]].strip()
            youtube_id = row[col["youtube_id"]].strip()
            if not label or not youtube_id:
                raise DataError(f"{_where(path, line)}: malformed line: empty label or youtube_id")
            try:
                start, end = (int(float(row[col[k]])) for k in ("time_start", "time_end"))
            except ValueError:
                raise DataError(f"{_where(path, line)}: malformed line: time_start/time_end "
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


def _kinetics_official(root: Path, prefix: str, split: str, csv_path: Path, num_classes: int) -> VideoList:
    rows = _read_kinetics_csv(csv_path)
    train_csv = _first_existing(root, [f"{prefix}_train.csv"])
    # Alphabetical order of the training labels, as PySlowFast / PyTorchVideo / MMAction2 number them. A split
    # read without its train csv (an evaluation-only copy) uses its own labels: the count check below catches
    # a split that misses some classes.
    class_source = train_csv or csv_path
    class_rows = rows if class_source == csv_path else _read_kinetics_csv(class_source)
    class_names = sorted({r[1] for r in class_rows})
    _check_class_count(class_names, num_classes, class_source)
    class_id = {name: i for i, name in enumerate(class_names)}
    paths, labels, folders = [], [], {}
    for line, label, youtube_id, start, end, split_value in rows:
        if label not in class_id:
            raise DataError(f"{_where(csv_path, line)}: unknown class {label!r} (not in {class_source.name})")
        folder = _video_folder(root, split_value, split, folders)
        paths.append(str(folder / f"{youtube_id}_{start:06d}_{end:06d}.mp4"))
        labels.append(class_id[label])
    return VideoList(PathTable(paths), np.asarray(labels, np.int32), class_names, str(csv_path))


# --- PySlowFast `path label` lists ------------------------------------------------------------------------


def _read_path_label_list(root: Path, path: Path):
    items = []
    for line_no, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{_where(path, line_no)}: malformed line {line.strip()!r}: expected `path label`")
        try:
            label = int(parts[1])
        except ValueError:
            raise DataError(f"{_where(path, line_no)}: malformed line {line.strip()!r}: label "
                            f"{parts[1]!r} is not an integer") from None
        if label < 0:
            raise DataError(f"{_where(path, line_no)}: negative label {label}")
        video = parts[0]
        items.append((line_no, video if os.path.isabs(video) else str(root / video), label))
    return items


def _slowfast_lists(root: Path, list_path: Path, num_classes: int) -> VideoList:
    items = _read_path_label_list(root, list_path)
    train_list = _first_existing(root, ["train.csv"])
    class_source = train_list or list_path
    class_items = items if class_source == list_path else _read_path_label_list(root, class_source)
    # The lists carry class ids only; the train list's largest id fixes how many classes there are.
    count = max((label for _, _, label in class_items), default=-1) + 1
    class_names = [str(i) for i in range(count)]
    _check_class_count(class_names, num_classes, class_source)
    for line_no, _, label in items:
        if label >= count:
            raise DataError(f"{_where(list_path, line_no)}: unknown class {label} (the ids in "
                            f"{class_source.name} go up to {count - 1})")
    return VideoList(PathTable([p for _, p, _ in items]), np.asarray([lab for _, _, lab in items], np.int32),
                     class_names, str(list_path))


def kinetics(root: Path, prefix: str, split: str, num_classes: int) -> VideoList:
    aliases = _SPLIT_ALIASES[split]
    official = _first_existing(root, [f"{prefix}_{s}.csv" for s in aliases])
    if official is not None:
        return _kinetics_official(root, prefix, split, official, num_classes)
    lists = _first_existing(root, [f"{s}.csv" for s in aliases])
    if lists is not None:
        return _slowfast_lists(root, lists, num_classes)
    raise DataError(f"{root / f'{prefix}_{split}.csv'}: annotation file not found (nor the PySlowFast list "
                    f"{root / f'{split}.csv'}); check data.root and data.annotation_prefix")


# --- UCF101 -----------------------------------------------------------------------------------------------


def _ucf_classes(path: Path) -> List[str]:
    names = {}
    for line_no, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{_where(path, line_no)}: malformed line {line.strip()!r}: expected `id ClassName`")
        class_id = int(parts[0])
        if class_id in names:
            raise DataError(f"{_where(path, line_no)}: class id {class_id} appears twice")
        names[class_id] = parts[1]
    if sorted(names) != list(range(1, len(names) + 1)):
        raise DataError(f"{path}: class ids must be 1..{len(names)} (classInd is 1-based)")
    return [names[i] for i in range(1, len(names) + 1)]


def ucf101(root: Path, split: str, fold: int, num_classes: int) -> VideoList:
    if fold not in (1, 2, 3):
        raise DataError(f"data.split={fold}: UCF101 has train/test splits 1, 2 and 3")
    lists = root / "ucfTrainTestlist"
    class_file = lists / "classInd.txt"
    class_names = _ucf_classes(class_file)
    _check_class_count(class_names, num_classes, class_file)
    by_folder = {name: i for i, name in enumerate(class_names)}
    # The published file names disagree in case with classInd in places (HandStandPushups vs HandstandPushups).
    by_folder_lower = {name.lower(): i for i, name in enumerate(class_names)}
    # UCF101 has no validation split: validation reads the test list of the same fold.
    list_path = lists / (f"trainlist0{fold}.txt" if split == "train" else f"testlist0{fold}.txt")
    paths, labels = [], []
    for line_no, line in enumerate(_read_lines(list_path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise DataError(f"{_where(list_path, line_no)}: malformed line {line.strip()!r}: expected "
                            f"`Class/v_Class_gXX_cYY.avi [label]`")
        video = parts[0]
        folder = video.split("/")[0] if "/" in video else ""
        label = by_folder.get(folder, by_folder_lower.get(folder.lower()))
        if label is None:
            raise DataError(f"{_where(list_path, line_no)}: unknown class folder {folder!r} (not in {class_file.name})")
        if len(parts) == 2:
            if not parts[1].isdigit():
                raise DataError(f"{_where(list_path, line_no)}: malformed line {line.strip()!r}: label "
                                f"{parts[1]!r} is not an integer")
            if int(parts[1]) - 1 != label:
                raise DataError(f"{_where(list_path, line_no)}: label {parts[1]} disagrees with the class folder "
                                f"{folder!r} (id {label + 1} in {class_file.name})")
        paths.append(str(root / "UCF-101" / video))
        labels.append(label)
    return VideoList(PathTable(paths), np.asarray(labels, np.int32), class_names, str(list_path))


def load_split(fmt: str, root: Path, split: str, *, annotation_prefix: str, num_classes: int,
               fold: int) -> VideoList:
    """The video list of one split. Raises DataError for a missing root or any broken annotation."""
    if split not in SPLITS:
        raise DataError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise DataError(f"data.root={root}: directory not found")
    if fmt == "kinetics":
        videos = kinetics(root, annotation_prefix, split, num_classes)
    elif fmt == "ucf101":
        videos = ucf101(root, split, fold, num_classes)
    else:
        raise DataError(f"data.format={fmt!r}: must be kinetics or ucf101")
    if len(videos) == 0:
        raise DataError(f"{videos.annotation}: no videos listed for split {split}")
    return videos
