"""Multi-view evaluation and precise BN: plain loops, because views must be regrouped per video."""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import numpy as np
import mindspore as ms
from mindspore import nn
from omegaconf import DictConfig

from x3d_exp.distributed import SINGLE, Dist, batchnorm_statistics, merge_video_scores
from x3d_exp.engine.progress import progress_bar
from x3d_exp.models.x3d import BN_MOMENTUM


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


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


def precise_batchnorm_statistics(network: nn.Cell, loader, num_batches: int) -> int:
    """PySlowFast's precise BN: set every BN's running mean and variance to the plain average of the statistics of
    up to `num_batches` training batches under the current weights; returns the number of batches used.

    The running averages trail the weights by many steps, which shows in the evaluation while the lr is high. The
    BN ops expose only their running averages, so each batch's own statistics are recovered from consecutive values,
    running_i = m * running_(i-1) + (1 - m) * batch_i, m being the BN momentum.
    """
    params = batchnorm_statistics(network)
    if not params or num_batches < 1:
        return 0
    network.set_train(True)
    previous = [p.asnumpy().astype(np.float64) for p in params]
    sums = [np.zeros_like(v) for v in previous]
    used = 0
    for batch in loader.dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        if used == num_batches:
            break
        network(ms.Tensor(batch["clip"]))
        current = [p.asnumpy().astype(np.float64) for p in params]
        for total, now, before in zip(sums, current, previous):
            total += (now - BN_MOMENTUM * before) / (1 - BN_MOMENTUM)
        previous = current
        used += 1
    if used == 0:
        return 0
    for param, total in zip(params, sums):
        param.set_data(ms.Tensor((total / used).astype(np.float32)))
    return used
