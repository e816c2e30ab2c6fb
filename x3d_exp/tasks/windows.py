"""`task=infer infer.window_stride=S`: label windows every S seconds across a long video or a live stream.

    python run.py task=infer model=x3d_m ckpt=x3d_m.ckpt infer.inputs=[talk.mp4] infer.window_stride=1

Each window is the model's test clip (x3d_exp.data.stream.WindowPlan) cut into `infer.window_crops` crops (1: the
centre crop, 3: the test protocol's three) at the test crop size; their softmax is averaged. Per window, one JSON
line `{"video", "start", "end", "top5"}` is printed and flushed as soon as its batch is back (`"missing": true` and no
top5 when frames of it could not be decoded). Per input, in the run directory: NAME.windows.csv, NAME.segments.csv
(consecutive windows with the same top 1, merged, with their mean probability; a segment runs from half a stride
before its first window's centre to half a stride after its last one's) and NAME.timeline.png; then one summary
line on stdout.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import mindspore as ms

from x3d_exp.data.stream import WindowPlan, WindowReader, is_live, open_source, source_duration, source_fps
from x3d_exp.data.transforms import normalise, test_crops
from x3d_exp.engine.evaluate import softmax, top_k

# Top classes drawn on the timeline.
PLOTTED_CLASSES = 5


def forward(network, views: np.ndarray, batch_size: int) -> np.ndarray:
    """Softmax [len(views), classes] float64 of at most `batch_size` views, run as one batch of that size: graph
    mode would compile the network again for a smaller batch, so a short batch is padded with zeros."""
    batch = views
    if len(views) < batch_size:
        batch = np.concatenate([views, np.zeros((batch_size - len(views), *views.shape[1:]), views.dtype)])
    logits = network(ms.Tensor(batch)).asnumpy()[:len(views)]
    return softmax(logits.astype(np.float64))


def merge_segments(starts: np.ndarray, ends: np.ndarray, top1: np.ndarray, top1_prob: np.ndarray,
                   stride: float) -> List[dict]:
    """Runs of consecutive windows with the same top-1 class (-1: missing, never merged into a segment), each
    from half a stride before its first window's centre (not before 0) to half a stride after its last one's."""
    centres = (np.asarray(starts) + np.asarray(ends)) / 2
    segments = []
    run_start = 0
    for i in range(1, len(top1) + 1):
        if i < len(top1) and top1[i] == top1[run_start]:
            continue
        if top1[run_start] >= 0:
            segments.append({"start": round(max(0.0, centres[run_start] - stride / 2), 3),
                             "end": round(centres[i - 1] + stride / 2, 3), "index": int(top1[run_start]),
                             "mean_prob": float(np.mean(top1_prob[run_start:i])), "windows": i - run_start})
        run_start = i
    return segments


def output_name(source: str, taken: set) -> str:
    """A file-name stem for a source's outputs, unique in this run: the file's stem, `stdin`, or the URL's host and
    path."""
    if source == "-":
        stem = "stdin"
    elif "://" in source or source.startswith("/dev/"):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.split("://", 1)[-1]).strip("_")
    else:
        stem = Path(source).stem
    name, number = stem or "input", 2
    while name in taken:
        name, number = f"{stem}-{number}", number + 1
    taken.add(name)
    return name


class VideoWindows:
    """The windows of one input as they come back: times, probabilities (NaN rows: missing)."""

    def __init__(self, source: str, names: Optional[List[str]], num_classes: int):
        self.source, self.names, self.num_classes = source, names, num_classes
        self.starts: List[float] = []
        self.ends: List[float] = []
        self.probs: List[np.ndarray] = []

    def add(self, start: float, end: float, probs: Optional[np.ndarray]) -> dict:
        self.starts.append(start)
        self.ends.append(end)
        row = np.full(self.num_classes, np.nan, np.float32) if probs is None else probs.astype(np.float32)
        self.probs.append(row)
        record = {"video": self.source, "start": round(start, 3), "end": round(end, 3)}
        if probs is None:
            record["missing"] = True
        else:
            record["top5"] = top_k(probs, self.names)
        return record

    def label(self, index: int) -> str:
        return self.names[index] if self.names else str(index)

    def arrays(self):
        probs = np.stack(self.probs) if self.probs else np.zeros((0, self.num_classes), np.float32)
        missing = np.isnan(probs[:, 0]) if len(probs) else np.zeros(0, bool)
        top1 = np.where(missing, -1, np.argmax(np.nan_to_num(probs, nan=-1), axis=1))
        top1_prob = np.where(missing, np.nan, np.nanmax(np.where(missing[:, None], 0, probs), axis=1)
                             if len(probs) else np.zeros(0))
        return np.asarray(self.starts), np.asarray(self.ends), probs, top1, top1_prob

    def write(self, folder: Path, name: str, stride: float) -> dict:
        """The CSV of windows, the CSV of segments and the timeline PNG; returns their paths and the segments."""
        starts, ends, probs, top1, top1_prob = self.arrays()
        segments = merge_segments(starts, ends, top1, top1_prob, stride)
        for segment in segments:
            segment["label"] = self.label(segment["index"])
        paths = {"csv": folder / f"{name}.windows.csv", "segments_csv": folder / f"{name}.segments.csv",
                 "timeline": folder / f"{name}.timeline.png"}
        with open(paths["csv"], "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["start", "end", "missing", "label", "index", "prob", "top5"])
            for start, end, row, best in zip(starts, ends, probs, top1):
                if best < 0:
                    writer.writerow([f"{start:.3f}", f"{end:.3f}", 1, "", "", "", ""])
                    continue
                top = top_k(row.astype(np.float64), self.names)
                writer.writerow([f"{start:.3f}", f"{end:.3f}", 0, self.label(best), int(best), f"{row[best]:.6f}",
                                 " ".join(f"{e['index']}:{e['prob']:.4f}" for e in top)])
        with open(paths["segments_csv"], "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["start", "end", "label", "index", "mean_prob", "windows"])
            for seg in segments:
                writer.writerow([f"{seg['start']:.3f}", f"{seg['end']:.3f}", seg["label"], seg["index"],
                                 f"{seg['mean_prob']:.6f}", seg["windows"]])
        plot_timeline(paths["timeline"], self.source, (starts + ends) / 2, probs, segments, self.label)
        return {**{key: str(path) for key, path in paths.items()}, "segments": segments}


def plot_timeline(path: Path, title: str, centres: np.ndarray, probs: np.ndarray, segments: List[dict],
                  label: Callable[[int], str]) -> None:
    """The top classes' probabilities over time, each segment a band in its class's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = np.argsort(-np.nan_to_num(probs, nan=0).mean(axis=0), kind="stable")[:PLOTTED_CLASSES] \
        if len(probs) else []
    colours = {int(c): plt.cm.tab10(i % 10) for i, c in enumerate(shown)}
    figure, axes = plt.subplots(figsize=(10, 3.2))
    for seg in segments:
        colour = colours.get(seg["index"], (0.5, 0.5, 0.5, 1))
        axes.axvspan(seg["start"], seg["end"], color=colour, alpha=0.15, linewidth=0)
    for c in shown:
        axes.plot(centres, probs[:, c], color=colours[int(c)], linewidth=1.2, label=label(int(c)))
    axes.set_xlabel("time (s), window centres")
    axes.set_ylabel("probability")
    axes.set_ylim(0, 1)
    axes.set_title(title, fontsize=9)
    if len(shown):
        axes.legend(loc="upper right", fontsize=7, ncol=min(len(shown), 5))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class WindowBatches:
    """Finished windows in, lines out: windows batched through the network, each line printed as soon as its batch
    is back, in window order (a missing window is printed when the windows before it are)."""

    def __init__(self, network, results: VideoWindows, size: int, crops: int, per_batch: int, live: bool,
                 emit: Callable[[str], None], wall_time: Callable[[float], float]):
        self.network, self.results, self.size, self.crops, self.per_batch = network, results, size, crops, per_batch
        self.live, self.emit, self.wall_time = live, emit, wall_time
        self.waiting: list = []
        self.latencies: List[float] = []  # live: seconds from a window's end (as wall time) to its line

    def push(self, windows: list, final: bool) -> None:
        self.waiting.extend(windows)
        while self.waiting:
            if self.waiting[0].clip is None:
                self._done(self.waiting.pop(0), None)
                continue
            batch = []
            while len(batch) < min(self.per_batch, len(self.waiting)) and self.waiting[len(batch)].clip is not None:
                batch.append(self.waiting[len(batch)])
            # Live: run what is there now (waiting for a full batch would add its fill time to the latency).
            if len(batch) < self.per_batch and not (final or self.live or len(batch) < len(self.waiting)):
                return
            del self.waiting[:len(batch)]
            self._run(batch)

    def _run(self, batch: list) -> None:
        views = np.concatenate([normalise(test_crops(w.clip[None], self.size, self.crops)) for w in batch])
        probs = forward(self.network, views, self.per_batch * self.crops)
        for window, row in zip(batch, probs.reshape(len(batch), self.crops, -1).mean(axis=1)):
            self._done(window, row)

    def _done(self, window, probs: Optional[np.ndarray]) -> None:
        self.emit(json.dumps(self.results.add(window.start, window.end, probs)))
        if self.live:
            self.latencies.append(time.time() - self.wall_time(window.end))


def label_windows(source: str, network, names: Optional[List[str]], num_classes: int, *, sizes: dict,
                  stride: float, crops: int, batch_size: int, target_fps: float, decode_threads: int,
                  queue_size: int, folder: Path, name: str, emit: Callable[[str], None]) -> dict:
    """Label one input window by window; returns its summary record. Raises DataError if it cannot be opened.
    Ctrl+C stops the source, and the outputs and summary of the windows labelled so far are still written (the
    summary then says `"interrupted": true`)."""
    started = time.time()
    live = is_live(source)
    if live:
        print(f"note: {source}: reading a live source (windows are dropped if more than {queue_size} wait)",
              file=sys.stderr, flush=True)
    container = open_source(source)
    size = sizes["test_crop_size"]
    plan = WindowPlan(source_fps(container, target_fps), sizes["num_frames"], sizes["sampling_rate"],
                      target_fps, stride)
    duration = source_duration(container)
    # Only a source that may be shorter than one window keeps its first frames for the looped window.
    keep_first = live or duration is None or duration < plan.span + 2 / plan.fps
    reader = WindowReader(container, plan, size, queue_size, live, decode_threads, keep_first)
    results = VideoWindows(source, names, num_classes)
    batches = WindowBatches(network, results, size, crops, max(1, batch_size // crops), live, emit,
                            lambda end: reader.anchor + end)
    interrupted = padded = False
    try:
        for window in reader:
            padded = padded or window.padded
            batches.push([window, *(reader.pending() if live else [])], final=False)
        batches.push([], final=True)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        reader.close()
    outputs = results.write(folder, name, stride)
    starts, ends, probs, top1, _ = results.arrays()
    missing = int((top1 < 0).sum())
    if missing:
        times = ", ".join(f"{s:.1f}-{e:.1f}s" for s, e, t in zip(starts, ends, top1) if t < 0)
        print(f"warning: {source}: {missing} of {len(top1)} windows missing (frames that could not be decoded: "
              f"{times[:300]})", file=sys.stderr, flush=True)
    if reader.read_error:
        print(f"warning: {source}: reading stopped early: {reader.read_error}", file=sys.stderr, flush=True)
    seconds = time.time() - started
    covered = float(ends[-1]) if len(ends) else 0.0
    summary = {"video": source, "windows": len(top1), "missing": missing, "dropped": reader.dropped,
               "padded": padded, "stride": stride, "crops": crops, "fps": round(plan.fps, 3),
               "duration": round(duration if duration and not live else covered, 3),
               "seconds": round(seconds, 2), "realtime_factor": round(covered / seconds, 2) if seconds else None,
               "decoded_frames": reader.frames, "skipped_frames": reader.skipped, "corrupt": reader.corrupt,
               "segments": len(outputs["segments"]),
               **{key: outputs[key] for key in ("csv", "segments_csv", "timeline")}}
    if live:
        finite = [lat for lat in batches.latencies if math.isfinite(lat)]
        summary["latency"] = ({"mean": round(float(np.mean(finite)), 3), "max": round(float(np.max(finite)), 3)}
                              if finite else None)
    if interrupted:
        summary["interrupted"] = True
    return summary
