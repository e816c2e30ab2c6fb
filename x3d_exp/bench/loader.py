"""Loader benchmark: clips per second of the train and test loaders, decord pipeline vs a PyAV baseline.

    python -m x3d_exp.bench.loader                 # XS and M, 0/1/2/auto workers, K 1 and 2, ~10 minutes on 2 cores
    python -m x3d_exp.bench.loader --settings xs --workers 0 2 --splits train --clips-per-video 1 --rounds 1

It generates Kinetics-like H.264 files itself (340x256, 10 s at 30 fps, ~0.9 Mbit/s, x264 `veryfast`: CABAC and
B-frames like the re-encoded YouTube clips), lists them in the official Kinetics csv layout and reads them through
`build_loader` and MindSpore's GeneratorDataset, exactly as training and testing do. Two PyAV baselines decode the
same kind of training clips in one process (see `pyav_clip`) and apply the same crop/flip/normalisation.

Train figures are clips/s (with `data.train_clips_per_video` K, K clips come from one decode); test figures are
views/s of the 10 clips x 3 crops protocol (padding rows not counted), and videos/s is that divided by 30.
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
    """ROOT/bench_{train,test}.csv + ROOT/train/*.mp4: `num_files` encodes, listed ROWS times under distinct names
    (the test list reads the same files)."""
    marker = root / f"done-{num_files}x{seconds}s"
    if marker.exists() and (root / "bench_test.csv").exists():
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
    (root / "bench_test.csv").write_text("\n".join(lines) + "\n")
    marker.touch()
    return root


def time_loader(root: Path, setting: dict, workers, seconds: float, split: str = "train", clips_per_video: int = 1,
                decode_threads=1, batch_size: int = 4) -> float:
    """Clips/s (test: views/s) of a loader, after its first batch (worker start-up) and for about `seconds`."""
    # Knobs at their defaults are left out, so that this script also times code from before they existed.
    knobs = {key: value for key, value in (("decode_threads", decode_threads),
                                           ("train_clips_per_video", clips_per_video)) if value != 1}
    cfg = OmegaConf.structured(DataConfig(name="bench", format="kinetics", root=str(root), annotation_prefix="bench",
                                          num_classes=2, num_workers=workers, batch_size=batch_size, **knobs))
    loader = build_loader(cfg, split, **setting, seed=0)
    iterator = loader.dataset.create_tuple_iterator(num_epochs=-1, output_numpy=True)

    def clips_of(batch) -> int:
        return batch[0].shape[0] if split == "train" else int((batch[2] >= 0).sum())

    next(iterator)
    clips, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            clips += clips_of(next(iterator))
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


def worker_count(text: str):
    return text if text == "auto" else int(text)


def measure(methods: dict, rounds: int) -> dict:
    """Median rate of each method over `rounds`, the methods interleaved so that load from other processes hits all
    alike."""
    rates = {method: [] for method in methods}
    for _ in range(rounds):
        for method, run in methods.items():
            rates[method].append(run())
    return {method: float(np.median(values)) for method, values in rates.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--workers", nargs="+", type=worker_count, default=[0, 1, 2, "auto"])
    parser.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "test"])
    parser.add_argument("--clips-per-video", nargs="+", type=int, default=[1, 2],
                        help="data.train_clips_per_video values to time for the train split")
    parser.add_argument("--decode-threads", nargs="+", type=worker_count, default=[1],
                        help="data.decode_threads values to time")
    parser.add_argument("--no-baselines", action="store_true", help="skip the PyAV baselines")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing window of one measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per method, interleaved")
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
        methods = {}
        for split in args.splits:
            for clips in (args.clips_per_video if split == "train" else [1]):
                for threads in args.decode_threads:
                    for workers in args.workers:
                        methods[f"{split} K={clips} threads={threads} workers={workers}"] = (
                            lambda s=split, k=clips, t=threads, w=workers:
                            time_loader(root, setting, w, args.seconds, s, k, t))
        if not args.no_baselines:
            methods["pyav_slowfast"] = lambda: time_pyav(root, setting, args.seconds, slowfast=True)
            methods["pyav_lean"] = lambda: time_pyav(root, setting, args.seconds, slowfast=False)
        row = measure(methods, args.rounds)
        results[name] = row
        print(f"{name}: T={setting['num_frames']} tau={setting['sampling_rate']} crop={setting['crop_size']} "
              f"scale={setting['train_scale']} test crop={setting['test_crop_size']}, median of {args.rounds} x "
              f"{args.seconds:g} s, load average {os.getloadavg()[0]:.2f} after", flush=True)
        print(format_loader_rates(row, args.workers), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def format_loader_rates(row: dict, workers) -> str:
    """Loader rates as one line per split / K / threads with a column per worker count, then the PyAV baselines and
    the ratio of the one-process loader (0 workers) to them."""
    lines = ["  loader                        " + "".join(f"{f'{w} workers':>14}" for w in workers)]
    prefixes = sorted({key.rsplit(" workers=", 1)[0] for key in row if " workers=" in key})
    for prefix in prefixes:
        unit = "views/s" if prefix.startswith("test") else "clips/s"
        cells = "".join(f"{row.get(f'{prefix} workers={w}', float('nan')):14.1f}" for w in workers)
        lines.append(f"  {prefix + ' ' + unit:<30}{cells}")
    for baseline in ("pyav_slowfast", "pyav_lean"):
        if baseline in row:
            ratios = ", ".join(f"{prefix.split(' threads')[0]} {row[f'{prefix} workers=0'] / row[baseline]:.2f}x"
                               for prefix in prefixes if prefix.startswith("train") and f"{prefix} workers=0" in row)
            lines.append(f"  {baseline} {row[baseline]:.1f} clips/s (one process); 0-worker loader / it: {ratios}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
