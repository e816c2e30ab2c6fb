"""The default dataset: small H.264 MP4s in the official Kinetics csv layout, generated once from a seed.

Every video shows one high-contrast textured square on a faint static texture; the classes differ only in how
the square moves. The classes are chosen to survive the horizontal flip of training augmentation (left and right
would swap under it), so "sideways" covers both: moving_down, moving_sideways, moving_up, standing_still.
Texture, colours, size, start position and speed are random and the square wraps around the frame edges, so
every position is equally likely in every class: one frame says nothing about the class, two frames do.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
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
GENERATOR_VERSION = 4
PREFIX = "synthetic"
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

log = logging.getLogger("x3d_exp.data")


def auto_size(min_size: int) -> int:
    """The generated short side for clips that need `min_size` pixels: a multiple of 32, at least 64."""
    return max(64, math.ceil(min_size / 32) * 32)


def _params(data_cfg, min_size: int) -> dict:
    syn = data_cfg.synthetic
    keys = ("num_classes", "train_per_class", "val_per_class", "test_per_class", "frames", "fps", "seed")
    params = {key: int(syn[key]) for key in keys}
    for key in ("object_size", "speed"):
        low, high = (float(v) for v in syn[key])
        if not 0 < low <= high <= 1:
            raise DataError(f"data.synthetic.{key}={[low, high]}: must be [low, high] fractions of the frame, "
                            f"0 < low <= high <= 1")
        params[key] = [low, high]
    params["size"] = auto_size(min_size) if syn.size == "auto" else int(syn.size)
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


def render(rng: np.random.Generator, motion: str, frames: int, size: int, object_size=(0.5, 0.6),
           speed=(0.004, 0.0055)) -> np.ndarray:
    """Frames [F, size, size, 3] uint8 of one video.

    A square of `object_size` (fractions of the frame side) with a coarse texture (blocks of size/8) moves at
    `speed` (fractions of the frame per frame), both drawn per video from the given ranges, so every generated
    resolution shows the same video. Positions are sub-pixel (bilinear), so slow motion is seen by models that
    sample every frame too. The default speed puts X3D-XS's frames (12 apart at 30 fps) 5-7% of the frame apart,
    the 3-4 px at 64 px that a small 3D CNN and X3D-XS learned reliably (docs/data.md, the synthetic default).
    """
    block = max(2, size // 8)
    cells = math.ceil(size / block)
    base = rng.integers(70, 186, 3)
    background = base + rng.integers(-18, 19, (cells, cells, 1))
    background = np.clip(background.repeat(block, 0).repeat(block, 1)[:size, :size], 0, 255).astype(np.float32)

    side = max(2, int(round(rng.uniform(*object_size) * size)))
    side_cells = math.ceil(side / block)
    dark, bright = rng.integers(0, 70, 3), rng.integers(186, 256, 3)
    pattern = rng.random((side_cells, side_cells)) < 0.5
    texture = np.where(pattern[..., None], bright, dark).repeat(block, 0).repeat(block, 1)[:side, :side]
    # The square drawn at the origin of a canvas; rolling the canvas moves it with wrap-around.
    layer = np.zeros((size, size, 3), np.float32)
    mask = np.zeros((size, size, 1), bool)
    layer[:side, :side], mask[:side, :side] = texture, True

    dy, dx = _DIRECTIONS[motion]
    if motion == "moving_sideways" and rng.random() < 0.5:
        dx = -dx
    pixels_per_frame = rng.uniform(*speed) * size
    start = rng.uniform(0, size, 2)
    t = np.arange(frames)
    ys, xs = start[0] + dy * pixels_per_frame * t, start[1] + dx * pixels_per_frame * t

    drawn = {}

    def composite(y: int, x: int) -> np.ndarray:
        # Slow motion revisits the same whole-pixel positions for several frames.
        if (y, x) not in drawn:
            if len(drawn) > 8:
                drawn.clear()
            drawn[(y, x)] = np.where(np.roll(mask, (y, x), axis=(0, 1)), np.roll(layer, (y, x), axis=(0, 1)),
                                     background)
        return drawn[(y, x)]

    video = np.empty((frames, size, size, 3), np.uint8)
    for i in range(frames):
        y0, x0 = math.floor(ys[i]), math.floor(xs[i])
        fy, fx = ys[i] - y0, xs[i] - x0
        frame = (1 - fy) * ((1 - fx) * composite(y0, x0) + fx * composite(y0, x0 + 1))
        if fy:
            frame += fy * ((1 - fx) * composite(y0 + 1, x0) + fx * composite(y0 + 1, x0 + 1))
        video[i] = np.clip(np.round(frame), 0, 255)
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
        # A keyframe every 16 frames: a clip's frames, up to 12 apart in a 160-frame video, are reached by decoding
        # from the nearest keyframe instead of from the start.
        stream.options = {"crf": "18", "preset": "ultrafast", "threads": "1", "g": "16"}
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def generate(root: Path, params: dict) -> None:
    """Write the dataset into the (empty) folder `root`, with a progress bar on a terminal."""
    from tqdm import tqdm

    classes = CLASSES[:params["num_classes"]]
    time_end = math.ceil(params["frames"] / params["fps"])
    total = sum(params[f"{split}_per_class"] for split in _SPLIT_CODES) * len(classes)
    bar = tqdm(total=total, desc="synthetic videos", disable=not sys.stderr.isatty(), leave=False)
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
                video = render(rng, label, params["frames"], params["size"], params["object_size"], params["speed"])
                encode_mp4(root / split / f"{youtube_id}_{0:06d}_{time_end:06d}.mp4", video, params["fps"])
                writer.writerow([label, youtube_id, 0, time_end, split])
                bar.update(1)
    bar.close()
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


def dataset_folder(root: Path, params: dict) -> Path:
    """Each set of parameters has its own folder under data.root (`96px-1a2b3c4d`), so runs that want different
    sets (another size for another model, a tiny test set) never replace one another's videos."""
    digest = hashlib.sha256(json.dumps([GENERATOR_VERSION, params], sort_keys=True).encode()).hexdigest()[:8]
    return root / f"{params['size']}px-{digest}"


def ensure_synthetic(data_cfg, min_size: int = 0) -> Path:
    """Generate the dataset unless a complete copy with the same parameters is there; return its folder (under
    data.root, see `dataset_folder`). With data.synthetic.size=auto the short side fits clips of `min_size` pixels.

    Generation happens in a temporary sibling folder renamed into place at the end, so an interrupted run never
    leaves a partial dataset, and concurrent processes (distributed ranks) end up with one complete copy.
    """
    params = _params(data_cfg, min_size)
    root = dataset_folder(Path(str(data_cfg.root)).expanduser() if data_cfg.root else default_root(), params)
    if _is_current(root, params):
        return root
    if root.exists() and not (root / MANIFEST).exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root}: exists and is not a generated synthetic dataset (no {MANIFEST}); "
                        f"choose another data.root")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    videos = sum(params[f"{split}_per_class"] for split in _SPLIT_CODES) * params["num_classes"]
    log.info("generating the synthetic dataset, one time: %d videos of %d frames at %d px into %s", videos,
             params["frames"], params["size"], root)
    started = time.time()
    try:
        generate(staging, params)
        log.info("generated the synthetic dataset in %.0f s", time.time() - started)
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
