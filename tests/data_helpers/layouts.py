"""Tiny datasets in each published layout, built from real encoded videos, for the data tests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import av
import numpy as np
from omegaconf import OmegaConf

from x3d_exp.data.config import DataConfig

WIDTH, HEIGHT, FRAMES, FPS = 32, 24, 16, 30
SIZES = dict(num_frames=4, sampling_rate=2, crop_size=16, test_crop_size=20, train_scale=[20, 26])


def write_video(path: Path, value: int, *, codec: str = "libx264", width: int = WIDTH, height: int = HEIGHT,
                frames: int = FRAMES, fps: int = FPS, ramp_to: Optional[int] = None) -> None:
    """A real encoded video whose frame t is uniformly grey `value + t` (so tests can read back the sampling); with
    `ramp_to` the grey rises from there at the left edge to `ramp_to` at the right one (so tests can tell left from
    right)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "0", "threads": "1"}
        for t in range(frames):
            image = np.full((height, width, 3), min(255, value + t), np.uint8)
            if ramp_to is not None:
                image[:] = np.linspace(min(255, value + t), ramp_to, width).astype(np.uint8)[None, :, None]
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def data_cfg(root, **overrides):
    """A `data` config node (DataConfig schema) for `root`; small batches, in-process loading by default."""
    base = dict(name="test", format="kinetics", root=None if root is None else str(root),
                annotation_prefix="kinetics-400", num_classes=3, batch_size=2, num_workers=0, test_num_clips=2,
                test_num_crops=3)
    base.update(overrides)
    return OmegaConf.structured(DataConfig(**base))


def kinetics_official(root: Path, rows: Dict[str, List[tuple]], prefix: str = "kinetics-400",
                      split_column: Dict[str, str] = None) -> Dict[str, List[Path]]:
    """rows[split] = [(label, youtube_id), ...]; writes csvs and videos, returns the video paths per split."""
    split_column = split_column or {}
    paths = {}
    for split, items in rows.items():
        column = split_column.get(split, split)
        lines = ["label,youtube_id,time_start,time_end,split"]
        paths[split] = []
        for k, (label, youtube_id) in enumerate(items):
            # The published csvs quote the labels that hold spaces ("air drumming").
            quoted = f'"{label}"' if " " in label else label
            lines.append(f"{quoted},{youtube_id},{k},{k + 10},{column}")
            folder = {"validate": "val"}.get(column, column)
            video = root / folder / f"{youtube_id}_{k:06d}_{k + 10:06d}.mp4"
            write_video(video, 10 * len(paths[split]))
            paths[split].append(video)
        (root / f"{prefix}_{split}.csv").write_text("\n".join(lines) + "\n")
    return paths


def slowfast_lists(root: Path, rows: Dict[str, Sequence[tuple]]) -> None:
    """rows[split] = [(relative_or_absolute_path, label), ...]; writes lists and videos."""
    for split, items in rows.items():
        lines = []
        for k, (video, label) in enumerate(items):
            target = Path(video) if Path(video).is_absolute() else root / video
            write_video(target, 20 * k)
            lines.append(f"{video} {label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def ucf101(root: Path, classes: Sequence[str], train: Sequence[tuple], test: Sequence[str]) -> None:
    """classInd / trainlist01 / testlist01 with CRLF line ends, and .avi (MPEG-4 part 2) videos."""
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    crlf = "\r\n"
    (lists / "classInd.txt").write_bytes(crlf.join(f"{i + 1} {c}" for i, c in enumerate(classes)).encode() + b"\r\n")
    (lists / "trainlist01.txt").write_bytes(crlf.join(f"{v} {lab}" for v, lab in train).encode() + b"\r\n")
    (lists / "testlist01.txt").write_bytes(crlf.join(test).encode() + b"\r\n")
    for k, video in enumerate([v for v, _ in train] + list(test)):
        write_video(root / "UCF-101" / video, 20 * k, codec="mpeg4")


# The extensions and codecs a folder of one's own videos mixes.
FOLDER_CODECS = ((".mp4", "libx264"), (".avi", "mpeg4"), (".mkv", "libx264"), (".webm", "libvpx-vp9"))


def class_folders(root: Path, counts: Dict[str, int]) -> Dict[str, List[Path]]:
    """ROOT/<class>/<class>_<k>.<ext>, counts[class] videos each, cycling through .mp4, .avi, .mkv and .webm;
    returns the paths per class."""
    paths = {}
    for c, (name, count) in enumerate(counts.items()):
        paths[name] = []
        for k in range(count):
            extension, codec = FOLDER_CODECS[k % len(FOLDER_CODECS)]
            video = root / name / f"{name}_{k}{extension}"
            write_video(video, 10 * c + k, codec=codec)
            paths[name].append(video)
    return paths


def hmdb51(root: Path, marks: Dict[str, Sequence[Tuple[str, int]]], annotation_dir: str = "testTrainMulti_7030_splits",
           folds: Sequence[int] = (1,)) -> None:
    """marks[class] = [(video name, 0 unused | 1 train | 2 test)]: the official split files
    `<class>_test_split<N>.txt` (one `name id ` line per video, with the trailing space they have) for each fold,
    and ROOT/<class>/<name> .avi (MPEG-4 part 2) videos of those marked 1 or 2."""
    lists = root / annotation_dir
    lists.mkdir(parents=True, exist_ok=True)
    for c, (name, videos) in enumerate(marks.items()):
        for fold in folds:
            (lists / f"{name}_test_split{fold}.txt").write_text("".join(f"{v} {mark} \n" for v, mark in videos))
        for k, (video, mark) in enumerate(videos):
            if mark:
                write_video(root / name / video, 10 * c + k, codec="mpeg4")


def ssv2(root: Path, labels: Sequence[str], entries: Dict[str, Sequence[Tuple[str, str]]],
         annotation_dir: str = "labels", video_dir: str = "20bn-something-something-v2",
         **video_options) -> Dict[str, List[Path]]:
    """labels.json ({name: "id"}, id = position in `labels`), and entries[split] = [(video id, template)] as
    train.json / validation.json entries (template with [placeholders]), with their VP9 .webm videos (written with
    `video_options`, see write_video); returns the video paths per split."""
    lists = root / annotation_dir
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "labels.json").write_text(json.dumps({name: str(i) for i, name in enumerate(labels)}, indent=1))
    paths = {}
    for split, items in entries.items():
        rows, paths[split] = [], []
        for k, (video_id, template) in enumerate(items):
            # As published: `label` is the template with its placeholders filled in, lower case.
            rows.append({"id": video_id, "label": re.sub(r"\[[^]]*\]", "cup", template).lower(), "template": template,
                         "placeholders": ["cup"] * template.count("[")})
            video = root / video_dir / f"{video_id}.webm"
            write_video(video, 20 * k, codec="libvpx-vp9", **video_options)
            paths[split].append(video)
        (lists / f"{split}.json").write_text(json.dumps(rows, indent=1))
    return paths


def tiny_copy(group: str, root: Path, num_classes: int) -> None:
    """A copy in the group's published layout with the group's class count, and one val/test video: UCF101's own lists
    with its 101 classes, HMDB51's split files of 51 classes and SSv2's json of 174 labels, each with eight training
    videos (one batch of the groups' default 8); for Kinetics-400 the official train and val csvs, as most
    downloads have them (no test csv), whose classes are the train csv's labels, so every class needs a training
    video (`kinetics_labels`); for Kinetics-600 PySlowFast's
    `path label` lists (eight videos; the class count is the largest label + 1, so the last class is among them);
    for data=folder one class of ten videos (8 train, 1 val, 1 test) and one of two, too few to split (both
    train)."""
    spread = [k * (num_classes - 1) // 7 for k in range(8)]
    if group == "ucf101":
        classes = [f"Action{k:03d}" for k in range(num_classes)]
        train = [(f"Action{k:03d}/v_Action{k:03d}_g01_c0{j}.avi", k + 1) for k in range(4) for j in (1, 2)]
        ucf101(root, classes, train, ["Action002/v_Action002_g05_c01.avi"])
    elif group == "hmdb51":
        marks = {f"action_{k:02d}": [(f"action_{k:02d}_v1.avi", 1 if k in spread else 0),
                                     (f"action_{k:02d}_v2.avi", 2 if k == spread[3] else 0)]
                 for k in range(num_classes)}
        hmdb51(root, marks)
    elif group == "ssv2":
        labels = [f"Doing something number {k}" for k in range(num_classes)]
        templates = [f"Doing [something] number {k}" for k in range(num_classes)]
        ssv2(root, labels, {"train": [(str(100 + k), templates[label]) for k, label in enumerate(spread)],
                            "validation": [("7", templates[spread[5]])]})
    elif group == "folder":
        assert num_classes == 2
        class_folders(root, {"many": 10, "few": 2})
    elif group == "k600":
        slowfast_lists(root, {"train": [(f"train/{k}.mp4", label) for k, label in enumerate(spread)],
                              "val": [("val/0.mp4", spread[3])], "test": [("test/0.mp4", spread[5])]})
    else:
        labels = kinetics_labels(num_classes)
        kinetics_official(root, {"train": [(label, f"yt{k:04d}") for k, label in enumerate(labels)],
                                 "val": [(labels[spread[3]], "val0")]},
                          prefix=f"kinetics-{num_classes}", split_column={"val": "validate"})


# Real Kinetics names with the characters a csv reader and a class sort can trip on.
_KINETICS_NAMES = ["abseiling", "air drumming", "massaging person's head", "passing American football (in game)",
                   "tying knot (not on a tie)", "zumba"]


def kinetics_labels(num_classes: int) -> List[str]:
    """`num_classes` distinct labels, in no particular order: the tricky real names, then made-up ones."""
    made_up = [f"activity {k:03d}" for k in range(num_classes - len(_KINETICS_NAMES))]
    return list(reversed(_KINETICS_NAMES + made_up))
