"""Loader benchmark: decoded + augmented training clips per second, decord pipeline vs a PyAV baseline.

    python -m x3d_exp.bench.loader                 # XS and M settings, 0/1/2 workers, ~3 minutes on 2 cores
    python -m x3d_exp.bench.loader --settings xs --workers 0 2 --rounds 1

It generates Kinetics-like H.264 files itself (340x256, 10 s at 30 fps, ~0.9 Mbit/s, x264 `veryfast`: CABAC and
B-frames like the re-encoded YouTube clips), lists them in the official Kinetics csv layout and reads them through
`build_loader`, exactly as training does. Two PyAV baselines decode the same kind of clips in one process (see
`pyav_clip`) and apply the same crop/flip/normalisation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import av
import numpy as np
from omegaconf import OmegaConf

from x3d_exp.data.config import DataConfig
from x3d_exp.data.loader import build_loader
from x3d_exp.data.transforms import normalise, train_crop
from x3d_exp.data.video import clip_frame_indices, short_side_size
from x3d_exp.env import cache_root

# The published training inputs of X3D-XS and X3D-M (x3d_exp.models.x3d.VARIANTS).
SETTINGS = {
    "xs": dict(num_frames=4, sampling_rate=12, crop_size=160, test_crop_size=182, train_scale=[182, 228]),
    "m": dict(num_frames=16, sampling_rate=5, crop_size=224, test_crop_size=256, train_scale=[256, 320]),
}
WIDTH, HEIGHT, FPS, BITRATE = 340, 256, 30, 900_000
# Rows per list: the encoded files are repeated under other names so an epoch is long enough to time.
ROWS = 96


def _encode(path: Path, seconds: int, seed: int) -> None:
    """A panning high-detail texture with per-frame noise: costs the decoder about what a real clip does."""
    rng = np.random.default_rng(seed)
    frames = seconds * FPS
    scene = rng.integers(0, 256, (HEIGHT // 4 + 80, WIDTH // 4 + 80, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.bit_rate = BITRATE
        stream.options = {"preset": "veryfast"}
        for t in range(frames):
            dy, dx = int(60 + 50 * np.sin(t / 25)), (2 * t) % 300
            image = scene[dy:dy + HEIGHT, dx:dx + WIDTH].astype(np.int16) + rng.integers(-10, 11, (HEIGHT, WIDTH, 1))
            image = np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_dataset(root: Path, num_files: int, seconds: int) -> Path:
    """ROOT/bench_train.csv + ROOT/train/*.mp4: `num_files` encodes, listed ROWS times under distinct names."""
    marker = root / f"done-{num_files}x{seconds}s"
    if marker.exists():
        return root
    (root / "train").mkdir(parents=True, exist_ok=True)
    sources = []
    for k in range(num_files):
        source = root / f"source{k}.mp4"
        if not source.exists():
            _encode(source.with_suffix(".tmp.mp4"), seconds, k)
            os.replace(source.with_suffix(".tmp.mp4"), source)
        sources.append(source)
    lines = ["label,youtube_id,time_start,time_end,split"]
    for row in range(ROWS):
        name = root / "train" / f"clip{row:05d}_000000_{seconds:06d}.mp4"
        if not name.exists():
            os.symlink(sources[row % num_files], name)
        lines.append(f"class{row % 2},clip{row:05d},0,{seconds},train")
    (root / "bench_train.csv").write_text("\n".join(lines) + "\n")
    marker.touch()
    return root


def time_loader(root: Path, setting: dict, workers: int, seconds: float, batch_size: int = 4) -> float:
    """Clips/s of the training loader, after its first batch (worker start-up) and for about `seconds`."""
    cfg = OmegaConf.structured(DataConfig(name="bench", root=str(root), annotation_prefix="bench", num_classes=2,
                                          num_workers=workers, batch_size=batch_size))
    loader = build_loader(cfg, "train", **setting, seed=0)
    iterator = loader.dataset.create_tuple_iterator(num_epochs=-1, output_numpy=True)
    next(iterator)
    clips, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            clips += next(iterator)[0].shape[0]
        except StopIteration:  # end of an epoch; the iterator goes on with the next
            continue
    rate = clips / (time.perf_counter() - start)
    iterator.stop()
    if loader.bad_videos():
        raise RuntimeError(f"benchmark files reported bad: {loader.bad_videos()}")
    return rate


def pyav_clip(path: str, setting: dict, rng: np.random.Generator, slowfast: bool) -> np.ndarray:
    """One training clip decoded with PyAV: seek to the keyframe before the window, decode forward.

    slowfast=True does what PySlowFast's pyav backend does: every frame of the window becomes a full-size RGB
    array, then the sampled ones are resized (swscale here, torch there). slowfast=False is a leaner PyAV use
    that converts only the sampled frames, straight to the target size.
    """
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        fps = float(stream.average_rate)
        indices = clip_frame_indices(stream.frames, fps, setting["num_frames"], setting["sampling_rate"], 30,
                                     float(rng.random()))
        short = int(rng.integers(setting["train_scale"][0], setting["train_scale"][1] + 1))
        height, width = short_side_size(stream.codec_context.height, stream.codec_context.width, short)
        ticks = 1 / (fps * stream.time_base)  # pts per frame
        first, last = int(indices.min()), int(indices.max())
        container.seek(int(first * ticks), stream=stream, backward=True)
        wanted = {int(i) for i in indices}
        frames = {}
        for frame in container.decode(stream):
            index = int(round(frame.pts / ticks))
            if slowfast and first <= index <= last:
                frames[index] = frame.to_ndarray(format="rgb24")
            elif index in wanted:
                frames[index] = frame.to_ndarray(width=width, height=height, format="rgb24")
            if index >= last:
                break
    if slowfast:
        frames = {i: av.VideoFrame.from_ndarray(frames[i], format="rgb24").reformat(width=width, height=height)
                  .to_ndarray() for i in wanted}
    clip = np.stack([frames[int(i)] for i in indices])
    return normalise(train_crop(clip, setting["crop_size"], rng))


def time_pyav(root: Path, setting: dict, seconds: float, slowfast: bool) -> float:
    paths = sorted(str(p) for p in (root / "train").glob("*.mp4"))
    rng = np.random.default_rng(0)
    pyav_clip(paths[0], setting, rng, slowfast)
    clips, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pyav_clip(paths[clips % len(paths)], setting, rng, slowfast)
        clips += 1
    return clips / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=4.0, help="timing window of one measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurements per method, interleaved so that load from other processes hits all alike")
    parser.add_argument("--files", type=int, default=6, help="distinct encoded videos")
    parser.add_argument("--video-seconds", type=int, default=10)
    parser.add_argument("--root", type=Path, default=cache_root() / "bench")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    root = make_dataset(args.root, args.files, args.video_seconds)
    print(f"data: {args.files} H.264 files {WIDTH}x{HEIGHT}, {args.video_seconds} s at {FPS} fps in {root} "
          f"(ready after {time.perf_counter() - started:.0f} s)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    results = {}
    for name in args.settings:
        setting = SETTINGS[name]
        methods = {f"decord_{w}w": (lambda w=w: time_loader(root, setting, w, args.seconds)) for w in args.workers}
        methods["pyav_slowfast"] = lambda: time_pyav(root, setting, args.seconds, slowfast=True)
        methods["pyav_lean"] = lambda: time_pyav(root, setting, args.seconds, slowfast=False)
        rates = {method: [] for method in methods}
        for _ in range(args.rounds):
            for method, measure in methods.items():
                rates[method].append(measure())
        row = {method: float(np.median(values)) for method, values in rates.items()}
        results[name] = row
        print(f"{name}: T={setting['num_frames']} tau={setting['sampling_rate']} crop={setting['crop_size']} "
              f"scale={setting['train_scale']}, median of {args.rounds} x {args.seconds:g} s: "
              + ", ".join(f"{k} {v:.1f}" for k, v in row.items()) + " clips/s", flush=True)
        if "decord_0w" in row:
            print(f"  one process, decord pipeline / PyAV PySlowFast-way = "
                  f"{row['decord_0w'] / row['pyav_slowfast']:.2f}x, / lean PyAV = "
                  f"{row['decord_0w'] / row['pyav_lean']:.2f}x", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
