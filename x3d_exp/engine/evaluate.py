"""Multi-view evaluation: a plain loop, because views must be regrouped per video."""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import numpy as np
import mindspore as ms
from mindspore import nn
from omegaconf import DictConfig

from x3d_exp.distributed import SINGLE, Dist, merge_video_scores
from x3d_exp.engine.progress import progress_bar


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_k(probs: np.ndarray, names, k: int = 5) -> list:
    """The `k` most probable classes as [{"label", "index", "prob"}], fewer if the model has fewer classes; `label`
    is None without class names. Stable sort: equal probabilities keep class order, so the output is
    reproducible."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": names[i] if names else None, "index": int(i), "prob": float(probs[i])} for i in order]


def collect_scores(network: nn.Cell, loader, cfg: DictConfig, desc: str,
                   on_batch: Optional[Callable[[float], None]] = None):
    """Sum of softmax over every view of each video: ({video_index: probs}, {video_index: label}, loss sum, views).
    `on_batch` gets each batch's seconds (reading and scoring), for the run's time estimate."""
    network.set_train(False)
    prob_sum: Dict[int, np.ndarray] = {}
    labels: Dict[int, int] = {}
    loss_sum, views = 0.0, 0
    bar = progress_bar(cfg, loader.steps_per_epoch, desc)
    started = time.time()
    for batch in loader.dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        bar.update(1)
        keep = batch["video_index"] >= 0
        if keep.any():
            probs = softmax(network(ms.Tensor(batch["clip"])).asnumpy()[keep])
            batch_labels = batch["label"][keep]
            loss_sum += float(-np.log(np.clip(probs[np.arange(len(probs)), batch_labels], 1e-12, None)).sum())
            views += len(probs)
            for video, label, p in zip(batch["video_index"][keep], batch_labels, probs):
                prob_sum[int(video)] = prob_sum.get(int(video), 0) + p
                labels[int(video)] = int(label)
        if on_batch is not None:
            now = time.time()
            on_batch(now - started)
            started = now
    bar.close()
    return prob_sum, labels, loss_sum, views


def video_metrics(prob_sum: Dict[int, np.ndarray], labels: Dict[int, int], loss_sum: float, views: int,
                  num_classes: int) -> Dict[str, object]:
    """Video-level top-1/top-5 and per-class accuracy from the summed softmax (the ranking of the mean)."""
    if not prob_sum:
        return {"top1": 0.0, "top5": 0.0, "loss": float("nan"), "videos": 0, "per_class": [float("nan")] * num_classes}
    videos = sorted(prob_sum)
    scores = np.stack([prob_sum[v] for v in videos])
    truth = np.array([labels[v] for v in videos])
    ranked = np.argsort(-scores, axis=1, kind="stable")
    top1 = ranked[:, 0] == truth
    top5 = (ranked[:, :5] == truth[:, None]).any(axis=1)
    per_class = [float(top1[truth == c].mean()) if np.any(truth == c) else float("nan") for c in range(num_classes)]
    return {"top1": float(top1.mean()), "top5": float(top5.mean()), "loss": loss_sum / max(1, views),
            "videos": len(videos), "per_class": per_class}


def evaluate(network: nn.Cell, loader, num_classes: int, cfg: DictConfig, desc: str,
             dist: Dist = SINGLE, on_batch: Optional[Callable[[float], None]] = None) -> Dict[str, object]:
    """Video-level metrics of one split: the loss is per view, accuracy per video; over all ranks' shards."""
    scores = merge_video_scores(*collect_scores(network, loader, cfg, desc, on_batch), loader.num_videos, num_classes,
                                dist)
    return video_metrics(*scores, num_classes)
