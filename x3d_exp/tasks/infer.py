"""`task=infer`: classify video files with a checkpoint, multi-view like the test protocol.

    python run.py task=infer model=x3d_m ckpt=x3d_m.ckpt infer.inputs=[a.mp4,b.avi] infer.labels=classes.txt

Every input gives `data.test_num_clips x data.test_num_crops` views (clips spread over the video, crops across the
frame resized to the test crop), exactly as the test split does; the softmax is averaged over the views.

Output, per video in input order: one JSON line `{"video": path, "top5": [{"label", "index", "prob"}, ...]}` on
stdout (fewer than 5 entries if the model has fewer classes), or a small table when stdout is a terminal
(`infer.output=auto|json|table`). Then one summary line `{"task": "infer", "videos": N, "failed": M, ...}`.
An input that is missing or cannot be decoded gives `error: <path>: <reason>` on stderr and the others are still
processed; if any failed the run ends with one more error line and exit status 2.

The class count is the checkpoint's (rows of its classifier), whatever `data.num_classes` says. Class names come
from `infer.labels` (one per line), else from the MLflow model given as `ckpt` (models:/..., runs:/..., or a
train job's `mlflow_model` folder), else from the configured dataset's annotation if it can be read and has that
many classes (never generated or downloaded for this), else `label` is null.

No MLflow run is made: inference records nothing but its output.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from omegaconf import DictConfig, OmegaConf

from x3d_exp.config import JobContext, input_sizes
from x3d_exp.data import load_video_views
from x3d_exp.data.datasets import SPLITS, dataset_layout, load_split
from x3d_exp.data.loader import decode_threads
from x3d_exp.data.stream import is_live
from x3d_exp.engine.build import build_network, setup_context
from x3d_exp.engine.evaluate import top_k
from x3d_exp.errors import DataError, UserError, WeightsError
from x3d_exp.models.fuse import inference_network
from x3d_exp.tasks.windows import forward, label_windows, output_name
from x3d_exp.weights import load_params, local_checkpoint, model_description, params_num_classes, read_params

OUTPUTS = ("auto", "json", "table")


def read_labels(path: str, num_classes: int) -> List[str]:
    """One class name per line (trailing blank lines ignored); must name exactly `num_classes` classes."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"infer.labels={path}: cannot read ({err})") from None
    while lines and not lines[-1]:
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line]
    if blank:
        raise UserError(f"infer.labels={path}:{blank[0]}: empty class name")
    if len(lines) != num_classes:
        raise UserError(f"infer.labels={path}: {len(lines)} names but the checkpoint has {num_classes} classes")
    return lines


def dataset_labels(data: DictConfig, num_classes: int) -> Tuple[Optional[List[str]], str]:
    """(class names, where from) from the dataset annotation, or (None, why not).

    Any split's annotation will do: every reader numbers classes from one class list (the train csv, classInd),
    and an evaluation-only copy may hold no train list.
    """
    if OmegaConf.is_missing(data, "root") or not data.root:
        return None, f"data.root is not set for data={data.name}"
    reasons = []
    try:
        roots = dataset_layout(data).annotation_roots(Path(str(data.root)).expanduser())
    except DataError as err:
        return None, str(err)
    for split in SPLITS:
        for folder in roots:
            try:
                videos = load_split(data, folder, split)
            except DataError as err:
                reasons.append(str(err))
                continue
            if len(videos.class_names) != num_classes:
                return None, (f"{videos.annotation} has {len(videos.class_names)} classes, the checkpoint "
                              f"{num_classes}")
            return list(videos.class_names), videos.annotation
    return None, reasons[0]


def format_table(record: dict, views: int) -> str:
    rows = [f"{record['video']}  ({views} views)", "  rank    prob  index  label"]
    for rank, entry in enumerate(record["top5"], start=1):
        label = entry["label"] if entry["label"] is not None else "-"
        rows.append(f"  {rank:>4}  {100 * entry['prob']:5.1f}%  {entry['index']:>5}  {label}")
    return "\n".join(rows) + "\n"


class _Video:
    """Probabilities of one input's views, summed as its batches come back."""

    def __init__(self, path: str, views: int):
        self.path, self.views, self.remaining = path, views, views
        self.prob_sum = 0.0


def _predict(network, rows: List[Tuple[_Video, np.ndarray]], batch_size: int) -> None:
    for (video, _), probs in zip(rows, forward(network, np.stack([view for _, view in rows]), batch_size)):
        video.prob_sum = video.prob_sum + probs
        video.remaining -= 1


def task_infer(cfg: DictConfig, job: JobContext = JobContext()) -> dict:
    started = time.time()
    options = cfg.infer
    inputs = options.inputs or []
    inputs = [str(inputs)] if isinstance(inputs, str) else [str(p) for p in inputs]
    if not inputs:
        raise UserError("infer.inputs: give the videos to classify (infer.inputs=[a.mp4,b.avi])")
    ckpt = cfg.ckpt
    if not ckpt:
        raise UserError("task=infer needs ckpt=PATH (a .ckpt from task=train or task=convert, or an MLflow model "
                        "URI such as models:/NAME/VERSION)")
    try:
        weights = local_checkpoint(ckpt, cfg.mlflow.tracking_uri)
    except WeightsError as err:
        raise UserError(str(err)) from None
    output = str(options.output)
    if output not in OUTPUTS:
        raise UserError(f"infer.output={output}: must be one of {', '.join(OUTPUTS)}")
    table = output == "table" or (output == "auto" and sys.stdout.isatty())
    data = cfg.data
    batch_size = int(options.batch_size or data.eval_batch_size or data.batch_size)
    if batch_size < 1:
        raise UserError(f"infer.batch_size={batch_size}: must be >= 1")
    stride, crops = _window_options(options)

    params = read_params(weights)
    num_classes = params_num_classes(params) or int(data.num_classes)
    labels = options.labels
    described = model_description(weights)
    if labels:
        names, label_source = read_labels(str(labels), num_classes), str(labels)
    elif described:
        names, label_source = described["class_names"], ckpt
    else:
        names, label_source = dataset_labels(data, num_classes)
        if names is None:
            print(f"note: printing class indices only (no infer.labels, and no class names from the dataset: "
                  f"{label_source})", file=sys.stderr)
            label_source = None

    device = setup_context(cfg)
    # An MLflow model carries the model config it was trained with: its network, whatever model= says.
    network = build_network(OmegaConf.merge(cfg, {"data": {"num_classes": num_classes},
                                                  "model": described["model"] if described else {}}), device)
    try:
        load_params(network, params)
    except WeightsError as err:
        raise UserError(f"ckpt={ckpt}: {err}") from None
    network.set_train(False)
    sizes = input_sizes(cfg, network.spec)
    network = inference_network(network)
    if stride is not None:
        return _infer_windows(cfg, job, network, inputs, names, label_source, num_classes, sizes, batch_size,
                              stride, crops, started)
    view_args = dict(num_frames=sizes["num_frames"], sampling_rate=sizes["sampling_rate"],
                     test_crop_size=sizes["test_crop_size"], num_clips=int(data.test_num_clips),
                     num_crops=int(data.test_num_crops), target_fps=float(data.target_fps),
                     decoder=str(data.get("decoder", "decord")))

    def emit(video: _Video) -> None:
        record = {"video": video.path, "top5": top_k(video.prob_sum / video.views, names)}
        sys.stdout.write(format_table(record, video.views) if table else json.dumps(record) + "\n")
        sys.stdout.flush()

    # Views of consecutive videos share batches (no padding per video); a video is printed once all its views
    # are back, and since batches run in input order, so are the lines.
    waiting: List[_Video] = []
    rows: List[Tuple[_Video, np.ndarray]] = []
    failed = 0

    def flush(final: bool) -> None:
        nonlocal rows
        while len(rows) >= batch_size or (final and rows):
            _predict(network, rows[:batch_size], batch_size)
            rows = rows[batch_size:]
        while waiting and waiting[0].remaining == 0:
            emit(waiting.pop(0))

    for path in inputs:
        try:
            views = load_video_views(path, **view_args)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            failed += 1
            continue
        video = _Video(path, len(views))
        waiting.append(video)
        rows.extend((video, view) for view in views)
        flush(final=False)
    flush(final=True)

    summary = {"task": "infer", "model": cfg.model.name, "ckpt": ckpt, "num_classes": num_classes,
               "views": view_args["num_clips"] * view_args["num_crops"], "labels": label_source,
               "videos": len(inputs), "failed": failed, "seconds": round(time.time() - started, 1)}
    if failed:
        # The summary still closes stdout for scripts; the error then sets exit status 2 like other user errors.
        print(json.dumps(summary), flush=True)
        raise UserError(f"{failed} of {len(inputs)} inputs could not be read (named above)")
    return summary


def _window_options(options) -> Tuple[Optional[float], int]:
    """(infer.window_stride or None, infer.window_crops), checked."""
    stride, crops = options.window_stride, options.window_crops
    if crops not in (1, 3):
        raise UserError(f"infer.window_crops={crops}: must be 1 (the centre crop) or 3 (the test protocol's crops)")
    if stride is None:
        return None, crops
    if isinstance(stride, bool) or not isinstance(stride, (int, float)) or not stride > 0:
        raise UserError(f"infer.window_stride={stride}: must be a number of seconds > 0")
    return float(stride), int(crops)


def _infer_windows(cfg, job: JobContext, network, inputs: List[str], names, label_source, num_classes: int,
                   sizes: dict, batch_size: int, stride: float, crops: int, started: float) -> dict:
    """`infer.window_stride` set: every input labelled window by window (x3d_exp.tasks.windows)."""
    queue_size = int(cfg.infer.get("queue_size") or 2 * max(1, batch_size // crops))
    if queue_size < 1:
        raise UserError(f"infer.queue_size={queue_size}: must be >= 1")
    folder = Path(job.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    taken: set = set()
    failed = interrupted = 0
    # Compile the network now, at the batch shape of the windows, not on a live stream's first window.
    size = sizes["test_crop_size"]
    forward(network, np.zeros((1, 3, sizes["num_frames"], size, size), np.float32),
            max(1, batch_size // crops) * crops)

    def emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    for source in inputs:
        try:
            summary = label_windows(source, network, names, num_classes, sizes=sizes, stride=stride, crops=crops,
                                    batch_size=batch_size, target_fps=float(cfg.data.target_fps),
                                    decode_threads=decode_threads(cfg.data.decode_threads, 1),
                                    queue_size=queue_size, folder=folder, name=output_name(source, taken), emit=emit)
        except DataError as err:
            if is_live(source) and len(inputs) == 1:
                raise  # an unreachable stream or a missing camera: one error line, exit 2
            print(f"error: {err}", file=sys.stderr, flush=True)
            failed += 1
            continue
        emit(json.dumps(summary))
        if summary.get("interrupted"):
            interrupted = 1
            break

    summary = {"task": "infer", "model": cfg.model.name, "ckpt": cfg.ckpt, "num_classes": num_classes,
               "window_stride": stride, "window_crops": crops, "labels": label_source, "videos": len(inputs),
               "failed": failed, "seconds": round(time.time() - started, 1)}
    if interrupted:
        summary["interrupted"] = True
    if failed:
        print(json.dumps(summary), flush=True)
        raise UserError(f"{failed} of {len(inputs)} inputs could not be read (named above)")
    return summary
