"""Readers for the annotation files exactly as Kinetics, PySlowFast, UCF101, HMDB51 and Something-Something v2
publish them, and for a folder of the user's own videos (one subfolder per class).

Each reader returns a `VideoList`: absolute video paths, int32 labels and the class names (index = class id).
Every problem with an annotation fails here, before any worker starts, as a `DataError` naming file and line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from x3d_exp.errors import DataError

SPLITS = ("train", "val", "test")
# Kinetics releases name their validation split `val` or `validate`, in file names, in the csv `split`
# column and in the folders people extract the videos to.
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "validate", "valid"), "test": ("test",)}
_KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
FORMATS = ("kinetics", "ucf101", "hmdb51", "ssv2", "folder")

log = logging.getLogger("x3d_exp.data")
# Warnings about a dataset as a whole (a folder split's thin classes, its changed content) are given once per
# process, however many loaders read it.
_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


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


def _check_class_count(class_names: Sequence[str], num_classes: Optional[int], source: Path) -> None:
    """A given data.num_classes must be the annotation's; null takes the annotation's."""
    if num_classes is not None and len(class_names) != num_classes:
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


def _labelled_list(items, list_path: Path, class_names: Sequence[str], class_source: Path) -> VideoList:
    """The VideoList of `path label` items whose ids must name one of `class_names` (defined by `class_source`)."""
    for line_no, _, label in items:
        if label >= len(class_names):
            raise DataError(f"{_where(list_path, line_no)}: unknown class {label} (the ids in "
                            f"{class_source.name} go up to {len(class_names) - 1})")
    return VideoList(PathTable([p for _, p, _ in items]), np.asarray([lab for _, _, lab in items], np.int32),
                     list(class_names), str(list_path))


def _slowfast_lists(root: Path, list_path: Path, num_classes: Optional[int], lists_dir: Optional[Path] = None,
                    class_names: Optional[List[str]] = None) -> VideoList:
    """PySlowFast lists in `lists_dir` (default ROOT), paths relative to ROOT. Without `class_names` the classes
    are the ids: the train list's largest id fixes how many there are."""
    items = _read_path_label_list(root, list_path)
    train_list = _first_existing(lists_dir or root, ["train.csv"])
    class_source = train_list or list_path
    if class_names is None:
        class_items = items if class_source == list_path else _read_path_label_list(root, class_source)
        class_names = [str(i) for i in range(max((label for _, _, label in class_items), default=-1) + 1)]
    _check_class_count(class_names, num_classes, class_source)
    return _labelled_list(items, list_path, class_names, class_source)


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


def _check_fold(fold: int, dataset: str) -> None:
    if fold not in (1, 2, 3):
        raise DataError(f"data.split={fold}: {dataset} has train/test splits 1, 2 and 3")


def ucf101(root: Path, split: str, fold: int, num_classes: Optional[int]) -> VideoList:
    _check_fold(fold, "UCF101")
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


# --- HMDB51 -----------------------------------------------------------------------------------------------

# The official split files mark each video of a class: 1 train, 2 test, 0 in neither.
_HMDB_MARKS = {"train": "1", "val": "2", "test": "2"}


def hmdb51(root: Path, split: str, fold: int, num_classes: Optional[int], annotation_dir: Optional[str],
           video_dir: Optional[str]) -> VideoList:
    _check_fold(fold, "HMDB51")
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
    _check_class_count(class_names, num_classes, pattern)
    videos = root / video_dir if video_dir else root
    # HMDB51 has no validation split: validation reads the test videos of the same split.
    wanted = _HMDB_MARKS[split]
    paths, labels = [], []
    for label, name in enumerate(class_names):
        split_file = by_class[name]
        for line_no, line in enumerate(_read_lines(split_file), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise DataError(f"{_where(split_file, line_no)}: malformed line {line.strip()!r}: expected "
                                f"`<video>.avi <0|1|2>` (0 unused, 1 train, 2 test)")
            if parts[1] == wanted:
                paths.append(str(videos / name / parts[0]))
                labels.append(label)
    return VideoList(PathTable(paths), np.asarray(labels, np.int32), class_names, str(pattern))


# --- Something-Something v2 -------------------------------------------------------------------------------

_JSON_SPACE = re.compile(r"\s*")


def _json_items(path: Path):
    """[(line, key, value)] of the members of the top-level JSON object, or (line, None, element) of the array,
    so that a bad entry is named by its line."""
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    text = path.read_text(encoding="utf-8-sig")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{_where(path, err.lineno)}: not valid JSON ({err.msg})") from None
    if not isinstance(document, (dict, list)) or not document:
        raise DataError(f"{path}: expected a non-empty JSON object or array")
    # The document parsed, so this walk over its top level cannot fail; it only notes where each item starts.
    decoder, items, line, counted = json.JSONDecoder(), [], 1, 0
    is_object = isinstance(document, dict)
    pos = _JSON_SPACE.match(text, text.index("{" if is_object else "[") + 1).end()
    while text[pos] not in "]}":
        line += text.count("\n", counted, pos)
        counted = pos
        key = None
        if is_object:
            key, pos = decoder.raw_decode(text, pos)
            pos = _JSON_SPACE.match(text, _JSON_SPACE.match(text, pos).end() + 1).end()  # past the colon
        value, pos = decoder.raw_decode(text, pos)
        items.append((line, key, value))
        pos = _JSON_SPACE.match(text, pos).end()
        if text[pos] == ",":
            pos = _JSON_SPACE.match(text, pos + 1).end()
    return items


def _ssv2_classes(path: Path) -> List[str]:
    """labels.json: {"Approaching something with your camera": "0", ...} -> names by id."""
    names = {}
    for line, name, value in _json_items(path):
        if name is None or not str(value).isdigit():
            raise DataError(f"{_where(path, line)}: expected `\"<class name>\": \"<id>\"`, got {value!r}")
        if int(value) in names:
            raise DataError(f"{_where(path, line)}: class id {value} appears twice")
        names[int(value)] = name
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{path}: class ids must be 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def ssv2(root: Path, split: str, num_classes: Optional[int], annotation_dir: Optional[str],
         video_dir: Optional[str]) -> VideoList:
    folders = [root / annotation_dir, root] if annotation_dir else [root]
    folder = next((f for f in folders if (f / "labels.json").is_file()), folders[0])
    class_file = folder / "labels.json"
    class_names = _ssv2_classes(class_file)
    _check_class_count(class_names, num_classes, class_file)
    class_id = {name: i for i, name in enumerate(class_names)}
    # The test list has no labels: val and test both read validation.json.
    list_path = folder / ("train.json" if split == "train" else "validation.json")
    videos = root / video_dir if video_dir else root
    paths, labels = [], []
    for line, _, entry in _json_items(list_path):
        if not isinstance(entry, dict) or not str(entry.get("id", "")).strip() or "template" not in entry:
            raise DataError(f"{_where(list_path, line)}: malformed entry: expected an object with \"id\" and "
                            f"\"template\"")
        # The template names the class with its placeholders in brackets: "Putting [something] on [something]".
        name = str(entry["template"]).replace("[", "").replace("]", "")
        if name not in class_id:
            raise DataError(f"{_where(list_path, line)}: unknown class {name!r} (template {entry['template']!r} "
                            f"without brackets is not in {class_file.name})")
        paths.append(str(videos / f"{str(entry['id']).strip()}.webm"))
        labels.append(class_id[name])
    return VideoList(PathTable(paths), np.asarray(labels, np.int32), class_names, str(list_path))


# --- A folder of the user's own videos: ROOT/<class name>/<video> -----------------------------------------

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp",
                    ".ogv", ".ts")
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
                       if f.is_file() and os.path.splitext(f.name)[1].lower() in VIDEO_EXTENSIONS)
        if files:
            classes[entry.name] = files
        else:
            empty.append(entry.name)
    if empty:
        _warn_once(f"{root}: folder(s) without videos ({', '.join(VIDEO_EXTENSIONS)}) are not classes: "
                   f"{', '.join(empty)}")
    return classes


def _content_digest(classes: Dict[str, List[str]]) -> str:
    listing = "\n".join(f"{name}/{video}" for name, videos in classes.items() for video in videos)
    return hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def check_split_fractions(fractions) -> List[float]:
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
        _warn_once(f"{root}: class(es) with fewer videos than the {len(SPLITS)} splits train on all of them and are "
                   f"neither validated nor tested: "
                   + ", ".join(f"{name} ({n} video{'s' if n != 1 else ''})" for name, n in train_only.items()))
    now = _class_folders(root, splits_dir)
    if _content_digest(now) != digest:
        _warn_once(f"{root}: the videos changed since {splits_dir} was written ({count} then, "
                   f"{sum(len(v) for v in now.values())} now in {len(now)} class folders): the written split is "
                   f"kept (listed videos that are gone count as bad files); delete {splits_dir} to split again")
    return class_names


def folder(root: Path, split: str, num_classes: Optional[int], fractions: Sequence[float],
           splits_dir: Optional[str]) -> VideoList:
    """ROOT/<class name>/<video>, class ids in alphabetical order. The split lists (PySlowFast `path label`, paths
    relative to ROOT) are written once to `splits_dir` (ROOT/splits) and read from then on; lists the user put
    there instead (without the record file) are read as PySlowFast lists."""
    fractions = check_split_fractions(fractions)
    lists_dir = Path(splits_dir).expanduser() if splits_dir else root / "splits"
    if not any((lists_dir / f"{s}.csv").is_file() for s in SPLITS):
        _write_folder_split(root, lists_dir, fractions)
    list_path = lists_dir / f"{split}.csv"
    record = lists_dir / SPLIT_RECORD
    if not record.is_file():
        # The user's own lists, read as data=k400 reads PySlowFast lists: the classes are the ids.
        return _slowfast_lists(root, list_path, num_classes, lists_dir)
    class_names = _read_split_record(record, fractions, root, lists_dir)
    if num_classes is not None and len(class_names) != num_classes:
        raise DataError(f"data.root={root}: {len(class_names)} classes (class folders) but data.num_classes="
                        f"{num_classes}: leave data.num_classes null to take the folders' count")
    return _slowfast_lists(root, list_path, num_classes, lists_dir, class_names)


def load_split(data_cfg, root: Path, split: str) -> VideoList:
    """The video list of one split, as `data_cfg` (the `data` group) describes the dataset. Raises DataError for a
    missing root or any broken annotation. `data.num_classes` null skips the class-count check."""
    if split not in SPLITS:
        raise DataError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise DataError(f"data.root={root}: directory not found")
    fmt, num_classes = data_cfg.format, data_cfg.num_classes
    if fmt == "kinetics":
        videos = kinetics(root, data_cfg.annotation_prefix, split, num_classes)
    elif fmt == "ucf101":
        videos = ucf101(root, split, int(data_cfg.split), num_classes)
    elif fmt == "hmdb51":
        videos = hmdb51(root, split, int(data_cfg.split), num_classes, data_cfg.annotation_dir, data_cfg.video_dir)
    elif fmt == "ssv2":
        videos = ssv2(root, split, num_classes, data_cfg.annotation_dir, data_cfg.video_dir)
    elif fmt == "folder":
        videos = folder(root, split, num_classes, data_cfg.split_fractions, data_cfg.splits_dir)
    else:
        raise DataError(f"data.format={fmt!r}: must be one of {', '.join(FORMATS)}")
    if len(videos) == 0:
        raise DataError(f"{videos.annotation}: no videos listed for split {split}")
    return videos
