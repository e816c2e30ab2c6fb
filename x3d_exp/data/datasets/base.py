"""What every dataset layout shares: the registry, the `VideoList` a reader returns, the helpers for reading
annotation files, and PySlowFast's `path label` lists (read by the Kinetics and folder layouts).

A layout is a `Layout` subclass in its own module of this package, registered under its `data.format` name with
`@register_layout`. `load_split` picks the layout the `data` group names and checks what holds for every layout.
Every problem with an annotation fails here, before any worker starts, as a `DataError` naming file and line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from x3d_exp.errors import DataError

SPLITS = ("train", "val", "test")
# The file extensions taken for videos: a class folder's videos (data=folder), the files task=prepare re-encodes.
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp",
                    ".ogv", ".ts")

log = logging.getLogger("x3d_exp.data")
# Warnings about a dataset as a whole (a folder split's thin classes, a test split read from val) are given once per
# process, however many loaders read it.
_warned = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def is_video(name) -> bool:
    return os.path.splitext(str(name))[1].lower() in VIDEO_EXTENSIONS


class AnnotationNotFound(DataError):
    """A split's annotation file is not there (the one case where the test split may fall back to val)."""

    def __init__(self, path: Path, detail: str = ""):
        super().__init__(f"{path}: annotation file not found{detail}")
        self.path = path


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
    """A split as a reader returns it: absolute video paths, int32 labels, class names (index = class id)."""

    paths: PathTable
    labels: np.ndarray
    class_names: List[str]
    annotation: str  # the file the list came from, for messages

    def __len__(self) -> int:
        return len(self.paths)


def where(path: Path, line: Optional[int] = None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def read_lines(path: Path) -> List[str]:
    """Lines without their CRLF/LF ending (UCF101 ships CRLF)."""
    if not path.is_file():
        raise AnnotationNotFound(path)
    with open(path, encoding="utf-8", newline=None) as f:
        return [line.rstrip("\n").rstrip("\r") for line in f]


def first_existing(root: Path, names: Sequence[str]) -> Optional[Path]:
    for name in names:
        if (root / name).is_file():
            return root / name
    return None


def check_class_count(class_names: Sequence[str], num_classes: Optional[int], source: Path) -> None:
    """A given data.num_classes must be the annotation's; null takes the annotation's."""
    if num_classes is not None and len(class_names) != num_classes:
        raise DataError(f"{source}: defines {len(class_names)} classes but data.num_classes={num_classes} "
                        f"(set data.num_classes={len(class_names)} or fix the annotation)")


def check_fold(fold: int, dataset: str) -> None:
    if fold not in (1, 2, 3):
        raise DataError(f"data.split={fold}: {dataset} has train/test splits 1, 2 and 3")


# --- PySlowFast `path label` lists ------------------------------------------------------------------------


def _read_path_label_list(root: Path, path: Path):
    items = []
    for line_no, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{where(path, line_no)}: malformed line {line.strip()!r}: expected `path label`")
        try:
            label = int(parts[1])
        except ValueError:
            raise DataError(f"{where(path, line_no)}: malformed line {line.strip()!r}: label "
                            f"{parts[1]!r} is not an integer") from None
        if label < 0:
            raise DataError(f"{where(path, line_no)}: negative label {label}")
        video = parts[0]
        items.append((line_no, video if os.path.isabs(video) else str(root / video), label))
    return items


def _labelled_list(items, list_path: Path, class_names: Sequence[str], class_source: Path) -> VideoList:
    """The VideoList of `path label` items whose ids must name one of `class_names` (defined by `class_source`)."""
    for line_no, _, label in items:
        if label >= len(class_names):
            raise DataError(f"{where(list_path, line_no)}: unknown class {label} (the ids in "
                            f"{class_source.name} go up to {len(class_names) - 1})")
    return VideoList(PathTable([p for _, p, _ in items]), np.asarray([lab for _, _, lab in items], np.int32),
                     list(class_names), str(list_path))


def slowfast_lists(root: Path, list_path: Path, num_classes: Optional[int], lists_dir: Optional[Path] = None,
                   class_names: Optional[List[str]] = None) -> VideoList:
    """PySlowFast lists in `lists_dir` (default ROOT), paths relative to ROOT. Without `class_names` the classes
    are the ids: the train list's largest id fixes how many there are."""
    items = _read_path_label_list(root, list_path)
    train_list = first_existing(lists_dir or root, ["train.csv"])
    class_source = train_list or list_path
    if class_names is None:
        class_items = items if class_source == list_path else _read_path_label_list(root, class_source)
        class_names = [str(i) for i in range(max((label for _, _, label in class_items), default=-1) + 1)]
    check_class_count(class_names, num_classes, class_source)
    return _labelled_list(items, list_path, class_names, class_source)


# --- The registry -------------------------------------------------------------------------------------------


class Layout:
    """How one `data.format` lays out a dataset on disk. A subclass reads a split; the folder it reads is data.root
    unless it says otherwise."""

    name = ""  # the `data.format` value, set by register_layout

    def read(self, data_cfg, root: Path, split: str) -> VideoList:
        """The videos of `split` (train, val or test) under `root`, as `data_cfg` (the `data` group) describes them.
        Raises DataError (AnnotationNotFound for a split whose annotation file is not there)."""
        raise NotImplementedError

    def root(self, data_cfg, min_size: int = 0) -> Path:
        """The folder `read` is given; a generated layout makes its videos here, at a short side >= `min_size`."""
        if not data_cfg.root:
            raise DataError(f"data.root is not set: point it at your {data_cfg.name} copy (data.root=/path)")
        return Path(str(data_cfg.root)).expanduser()

    def annotation_roots(self, root: Path) -> List[Path]:
        """The folders under the data.root `root` whose annotations may name the classes, found without reading or
        generating anything (task=infer's class names)."""
        return [root]


LAYOUTS: Dict[str, Layout] = {}


def register_layout(name: str):
    """Class decorator: the layout read for `data.format: <name>`."""

    def register(cls):
        if name in LAYOUTS:
            raise ValueError(f"two dataset layouts named {name}")
        cls.name = name
        LAYOUTS[name] = cls()
        return cls

    return register


def dataset_layout(data_cfg) -> Layout:
    """The layout `data.format` names."""
    layout = LAYOUTS.get(data_cfg.format)
    if layout is None:
        raise DataError(f"data.format={data_cfg.format!r}: must be one of {', '.join(LAYOUTS)}")
    return layout


def _test_videos(layout: Layout, data_cfg, root: Path) -> VideoList:
    """The split `data.test_split` names; by default `test`, or `val` when the copy has no test annotation (most
    Kinetics downloads: the X3D paper and the published Kinetics results are on val), with one warning."""
    chosen = data_cfg.test_split
    if chosen not in SPLITS:
        raise DataError(f"data.test_split={chosen!r}: must be one of {', '.join(SPLITS)}")
    try:
        return layout.read(data_cfg, root, chosen)
    except AnnotationNotFound as missing:
        if chosen != "test":
            raise
        try:
            videos = layout.read(data_cfg, root, "val")
        except AnnotationNotFound:
            raise missing from None
        warn_once(f"{missing.path}: not found, so the test runs on the val split ({videos.annotation}), as the X3D "
                  f"paper reports Kinetics; data.test_split=val chooses that without this warning")
        return videos


def load_split(data_cfg, root: Path, split: str) -> VideoList:
    """The video list of one split, as `data_cfg` (the `data` group) describes the dataset; the test split reads
    `data.test_split`. Raises DataError for a missing root or any broken annotation. `data.num_classes` null skips
    the class-count check."""
    if split not in SPLITS:
        raise DataError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise DataError(f"data.root={root}: directory not found")
    layout = dataset_layout(data_cfg)
    videos = _test_videos(layout, data_cfg, root) if split == "test" else layout.read(data_cfg, root, split)
    if len(videos) == 0:
        raise DataError(f"{videos.annotation}: no videos listed for split {split}")
    return videos
