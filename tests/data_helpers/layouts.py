"""Tiny datasets in each published layout, built from real encoded videos, for the data tests."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import av
import numpy as np
from omegaconf import OmegaConf

from x3d_exp.data.config import DataConfig

WIDTH, HEIGHT, FRAMES, FPS = 32, 24, 16, 30
SIZES = dict(num_frames=4, sampling_rate=2, crop_size=16, test_crop_size=20, train_scale=[20, 26])


def write_video(path: Path, value: int, *, codec: str = "libx264", width: int = WIDTH, height: int = HEIGHT,
                frames: int = FRAMES, fps: int = FPS) -> None:
    """A real encoded video whose frame t is uniformly grey `value + t` (so tests can read back the sampling)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "0", "threads": "1"}
        for t in range(frames):
            image = np.full((height, width, 3), min(255, value + t), np.uint8)
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
            lines.append(f"{label},{youtube_id},{k},{k + 10},{column}")
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
