"""The default dataset: small H.264 MP4s in the official Kinetics csv layout, generated once from a seed.

Every video shows one high-contrast textured square on a faint static texture; the classes differ only in how
the square moves. The classes are chosen to survive the horizontal flip of training augmentation (left and right
would swap under it), so "sideways" covers both: moving_down, moving_sideways, moving_up, standing_still.
Texture, colours, size, start position and speed are random and the square wraps around the frame edges, so
every position is equally likely in every class: one frame says nothing about the class, two frames do.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import av
import numpy as np

from x3d_exp.env import cache_root
from x3d_exp.errors import DataError

CLASSES = ("moving_down", "moving_sideways", "moving_up", "standing_still")
# Unit (dy, dx) per class; sideways picks its sign per video.
_DIRECTIONS = {"moving_down": (1, 0), "moving_sideways": (0, 1), "moving_up": (-1, 0), "standing_still": (0, 0)}
MANIFEST = "synthetic.json"
# Bump when the rendering or encoding changes, so cached copies are regenerated.
GENERATOR_VERSION = 3
PREFIX = "synthetic"
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _params(data_cfg) -> dict:
    syn = data_cfg.synthetic
    keys = ("num_classes", "train_per_class", "val_per_class", "test_per_class", "frames", "size", "fps", "seed")
    params = {key: int(syn[key]) for key in keys}
    if not 2 <= params["num_classes"] <= len(CLASSES):
        raise DataError(f"data.synthetic.num_classes={params['num_classes']}: the generator has "
                        f"{len(CLASSES)} motion classes, use 2..{len(CLASSES)}")
    if params["size"] % 2:
        raise DataError(f"data.synthetic.size={params['size']}: must be even (H.264 4:2:0)")
    for key, low in (("frames", 2), ("size", 16), ("fps", 1), ("train_per_class", 1), ("val_per_class", 1),
                     ("test_per_class", 1)):
        if params[key] < low:
            raise DataError(f"data.synthetic.{key}={params[key]}: must be >= {low}")
    return params


def render(rng: np.random.Generator, motion: str, frames: int, size: int) -> np.ndarray:
    """Frames [F, size, size, 3] uint8 of one video.

    The sizes were tuned with a small 3D CNN standing in for X3D (see the README's data section):
    a square covering about half the frame, a coarse texture (blocks of size/8) and 1.5-2 px per frame, i.e.
    3-4 px between the frames of a sampling-rate-2 clip, less than one texture block, so that small
    spatio-temporal kernels see the direction without aliasing.
    """
    block = max(2, size // 8)
    cells = math.ceil(size / block)
    base = rng.integers(70, 186, 3)
    background = base + rng.integers(-18, 19, (cells, cells, 1))
    background = np.clip(background.repeat(block, 0).repeat(block, 1)[:size, :size], 0, 255)

    side = int(rng.integers(size // 2, size * 3 // 5 + 1))
    side_cells = math.ceil(side / block)
    dark, bright = rng.integers(0, 70, 3), rng.integers(186, 256, 3)
    pattern = rng.random((side_cells, side_cells)) < 0.5
    texture = np.where(pattern[..., None], bright, dark).repeat(block, 0).repeat(block, 1)[:side, :side]
    # The square drawn at the origin of a canvas; rolling the canvas moves it with wrap-around.
    layer = np.zeros((size, size, 3), np.int64)
    mask = np.zeros((size, size, 1), bool)
    layer[:side, :side], mask[:side, :side] = texture, True

    dy, dx = _DIRECTIONS[motion]
    if motion == "moving_sideways" and rng.random() < 0.5:
        dx = -dx
    speed = rng.uniform(1.5, 2.0)
    start = rng.uniform(0, size, 2)
    t = np.arange(frames)
    ys = np.round(start[0] + dy * speed * t).astype(int) % size
    xs = np.round(start[1] + dx * speed * t).astype(int) % size
    video = np.empty((frames, size, size, 3), np.uint8)
    for i in range(frames):
        obj = np.roll(layer, (ys[i], xs[i]), axis=(0, 1))
        obj_mask = np.roll(mask, (ys[i], xs[i]), axis=(0, 1))
        video[i] = np.where(obj_mask, obj, background)
    return video


def encode_mp4(path: Path, video: np.ndarray, fps: int) -> None:
    """H.264 MP4 (yuv420p), byte-identical for identical frames.

    With preset `fast` (threads=1 too) the bytes of these tiny frames varied between encodes in one process, in
    about half of the test-suite runs: its result depended on the process's earlier activity, not on the input.
    `ultrafast` skips x264's lookahead and wider motion search and gave identical bytes in every one of 200
    repeated encodes of 16 videos under the same conditions.
    """
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast", "threads": "1"}
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def generate(root: Path, params: dict) -> None:
    """Write the dataset into the (empty) folder `root`."""
    classes = CLASSES[:params["num_classes"]]
    time_end = math.ceil(params["frames"] / params["fps"])
    for split, code in _SPLIT_CODES.items():
        (root / split).mkdir()
        per_class = params[f"{split}_per_class"]
        with open(root / f"{PREFIX}_{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            for index in range(per_class * len(classes)):
                label = classes[index % len(classes)]
                rng = np.random.default_rng([params["seed"], code, index])
                youtube_id = f"{split}{index:06d}"
                video = render(rng, label, params["frames"], params["size"])
                encode_mp4(root / split / f"{youtube_id}_{0:06d}_{time_end:06d}.mp4", video, params["fps"])
                writer.writerow([label, youtube_id, 0, time_end, split])
    # Written last: its presence marks a complete dataset.
    (root / MANIFEST).write_text(json.dumps({"generator": GENERATOR_VERSION, "params": params}, indent=1))


def _is_current(root: Path, params: dict) -> bool:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest == {"generator": GENERATOR_VERSION, "params": params}


def default_root() -> Path:
    return cache_root() / "synthetic"


def ensure_synthetic(data_cfg) -> Path:
    """Generate the dataset into data.root unless a complete copy with the same parameters is there; return root.

    Generation happens in a temporary sibling folder renamed into place at the end, so an interrupted run never
    leaves a partial dataset, and concurrent processes (distributed ranks) end up with one complete copy.
    """
    params = _params(data_cfg)
    root = Path(str(data_cfg.root)).expanduser() if data_cfg.root else default_root()
    if _is_current(root, params):
        return root
    if root.exists() and not (root / MANIFEST).exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"data.root={root}: exists and is not a generated synthetic dataset (no {MANIFEST}); "
                        f"choose another data.root")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate(staging, params)
        if _is_current(root, params):  # another process finished first
            return root
        if root.exists():
            # An empty folder, or a copy made with other parameters: move it aside, then swap.
            stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.rename(root, stale / "data")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(staging, root)
        except OSError:
            # Another process renamed its copy in first.
            if not _is_current(root, params):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
