"""A folder of the user's own videos (`data.format: folder`): ROOT/<class name>/<video>, class ids in alphabetical
folder order. The split is written once, as PySlowFast lists, and read from then on (docs/data.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from x3d_exp.data.datasets.base import (SPLITS, VIDEO_EXTENSIONS, Layout, VideoList, is_video, log, register_layout,
                                        slowfast_lists, warn_once)
from x3d_exp.errors import DataError

# Written next to the lists; it marks them as this program's split (lists without it are the user's own).
SPLIT_RECORD = "split.json"


def _class_folders(root: Path, splits_dir: Path) -> Dict[str, List[str]]:
    """{class name: its video file names}, both sorted; hidden folders and the splits folder are not classes."""
    classes, empty = {}, []
    skip = splits_dir.resolve()
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir() or Path(entry.path).resolve() == skip:
            continue
        files = sorted(f.name for f in os.scandir(entry.path)
                       if f.is_file() and is_video(f.name))
        if files:
            classes[entry.name] = files
        else:
            empty.append(entry.name)
    if empty:
        warn_once(f"{root}: folder(s) without videos ({', '.join(VIDEO_EXTENSIONS)}) are not classes: "
                  f"{', '.join(empty)}")
    return classes


def _content_digest(classes: Dict[str, List[str]]) -> str:
    listing = "\n".join(f"{name}/{video}" for name, videos in classes.items() for video in videos)
    return hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _check_split_fractions(fractions) -> List[float]:
    values = [float(f) for f in fractions]
    if len(values) != 3 or min(values) <= 0 or abs(sum(values) - 1) > 1e-6:
        raise DataError(f"data.split_fractions={values}: must be three fractions > 0 (train, val, test) "
                        f"summing to 1")
    return values


def _split_sizes(count: int, fractions: Sequence[float]) -> Optional[List[int]]:
    """Videos of a class per split: at least one in each, the rest by the fractions; None when it has fewer
    videos than splits."""
    if count < len(SPLITS):
        return None
    val, test = (max(1, int(count * f + 0.5)) for f in fractions[1:])
    while count - val - test < 1:
        if val >= test:
            val -= 1
        else:
            test -= 1
    return [count - val - test, val, test]


def _write_folder_split(root: Path, splits_dir: Path, fractions: List[float]) -> None:
    """Split each class's videos by `fractions`, with a shuffle seeded by the class name only (a class's split
    does not depend on the other classes), and write the lists and the record into `splits_dir` in one rename."""
    classes = _class_folders(root, splits_dir)
    if not classes:
        raise DataError(f"data.root={root}: no class folders with videos (expected ROOT/<class name>/<video> with "
                        f"extensions {', '.join(VIDEO_EXTENSIONS)})")
    lines = {split: [] for split in SPLITS}
    train_only = {}
    for label, (name, videos) in enumerate(classes.items()):
        sizes = _split_sizes(len(videos), fractions)
        if sizes is None:
            train_only[name] = len(videos)
            sizes = [len(videos), 0, 0]
        order = np.random.default_rng(zlib.crc32(name.encode("utf-8", "surrogateescape"))).permutation(len(videos))
        start = 0
        for split, size in zip(SPLITS, sizes):
            lines[split] += [f"{name}/{videos[i]} {label}" for i in sorted(order[start:start + size])]
            start += size
    record = {"written_by": "x3d_exp data=folder", "fractions": fractions, "classes": list(classes),
              "train_only": train_only, "videos": sum(len(v) for v in classes.values()),
              "digest": _content_digest(classes)}
    try:
        splits_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{splits_dir.name}-", dir=splits_dir.parent))
        for split in SPLITS:
            (staging / f"{split}.csv").write_text("".join(line + "\n" for line in lines[split]), encoding="utf-8")
        (staging / SPLIT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        try:
            # Atomic: a killed run leaves no half split, and of concurrent ranks the first one's stays.
            os.rename(staging, splits_dir)
        except OSError:
            for child in staging.iterdir():
                child.unlink()
            staging.rmdir()
            if not (splits_dir / "train.csv").is_file():
                raise DataError(f"{splits_dir}: exists and holds no train.csv: point data.splits_dir at a new or "
                                f"empty folder") from None
    except OSError as err:  # a read-only dataset folder, typically
        raise DataError(f"{splits_dir}: cannot write the split lists ({err.strerror or err}): set data.splits_dir "
                        f"to a writable folder") from None
    log.info("data=folder: wrote the split of %d videos to %s", record["videos"], splits_dir)


def _read_split_record(path: Path, fractions: List[float], root: Path, splits_dir: Path) -> List[str]:
    """The class names of a split this program wrote; warns (once) about its thin classes and changed content."""
    try:
        record = json.loads(path.read_text())
        class_names, train_only = list(record["classes"]), dict(record["train_only"])
        written_fractions, digest, count = record["fractions"], record["digest"], int(record["videos"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a split record this program wrote ({err}); delete {splits_dir} to split "
                        f"again") from None
    if [round(f, 6) for f in written_fractions] != [round(f, 6) for f in fractions]:
        raise DataError(f"data.split_fractions={fractions}: {splits_dir} was split with {written_fractions}; set "
                        f"those, or delete {splits_dir} to split again")
    if train_only:
        warn_once(f"{root}: class(es) with fewer videos than the {len(SPLITS)} splits train on all of them and are "
                  f"neither validated nor tested: "
                  + ", ".join(f"{name} ({n} video{'s' if n != 1 else ''})" for name, n in train_only.items()))
    now = _class_folders(root, splits_dir)
    if _content_digest(now) != digest:
        warn_once(f"{root}: the videos changed since {splits_dir} was written ({count} then, "
                  f"{sum(len(v) for v in now.values())} now in {len(now)} class folders): the written split is "
                  f"kept (listed videos that are gone count as bad files); delete {splits_dir} to split again")
    return class_names


@register_layout("folder")
class Folder(Layout):
    """ROOT/<class name>/<video>, class ids in alphabetical order. The split lists (PySlowFast `path label`, paths
    relative to ROOT) are written once to `splits_dir` (ROOT/splits) and read from then on; lists the user put
    there instead (without the record file) are read as PySlowFast lists."""

    def read(self, data_cfg, root: Path, split: str) -> VideoList:
        num_classes, fractions, splits_dir = data_cfg.num_classes, data_cfg.split_fractions, data_cfg.splits_dir
        fractions = _check_split_fractions(fractions)
        lists_dir = Path(splits_dir).expanduser() if splits_dir else root / "splits"
        if not any((lists_dir / f"{s}.csv").is_file() for s in SPLITS):
            _write_folder_split(root, lists_dir, fractions)
        list_path = lists_dir / f"{split}.csv"
        record = lists_dir / SPLIT_RECORD
        if not record.is_file():
            # The user's own lists, read as data=k400 reads PySlowFast lists: the classes are the ids.
            return slowfast_lists(root, list_path, num_classes, lists_dir)
        class_names = _read_split_record(record, fractions, root, lists_dir)
        if num_classes is not None and len(class_names) != num_classes:
            raise DataError(f"data.root={root}: {len(class_names)} classes (class folders) but data.num_classes="
                            f"{num_classes}: leave data.num_classes null to take the folders' count")
        return slowfast_lists(root, list_path, num_classes, lists_dir, class_names)
