"""Training, validation and multi-view testing on MindSpore's `Model`, recorded in MLflow.

Logging, validation, checkpointing and progress are callbacks of `Model.train`;
evaluation is a plain loop because views must be regrouped per video.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import mindspore as ms
from mindspore import nn
from mindspore.train import Callback, Model
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("x3d_exp.engine")


# ---------------------------------------------------------------- set-up

def resolve_device(setting: str) -> str:
    if setting != "auto":
        return setting
    try:
        return "GPU" if ms.hal.is_available("GPU") else "CPU"
    except Exception:  # builds without the GPU plugin raise instead of answering
        return "CPU"


def setup_context(cfg: DictConfig) -> str:
    device = resolve_device(cfg.device)
    mode = ms.GRAPH_MODE if cfg.trainer.graph_mode else ms.PYNATIVE_MODE
    ms.set_context(mode=mode, device_target=device)
    ms.set_seed(int(cfg.seed))
    return device


def input_sizes(cfg: DictConfig, spec) -> dict:
    """The clip the loader produces: the model's own sizes unless the data config overrides them."""
    sizes = {}
    for key in ("num_frames", "sampling_rate", "crop_size", "test_crop_size", "train_scale"):
        value = cfg.data[key] if cfg.data[key] is not None else getattr(spec, key)
        sizes[key] = list(value) if key == "train_scale" else int(value)
    return sizes


def build_network(cfg: DictConfig, device: str):
    from x3d_exp.kernels import resolve_cpu_kernels
    from x3d_exp.models import build_model
    from x3d_exp.tasks import model_kwargs

    conv_impl = resolve_cpu_kernels(cfg.model.cpu_kernels, device)
    return build_model(cfg.model.name, num_classes=int(cfg.data.num_classes), conv_impl=conv_impl,
                       **model_kwargs(cfg))


def lr_per_step(cfg: DictConfig, steps_per_epoch: int, base_lr: float) -> List[float]:
    """One learning rate per iteration: linear warmup, then cosine (or step decay) to the end."""
    total = cfg.trainer.epochs * steps_per_epoch
    warmup = int(round(cfg.schedule.warmup_epochs * steps_per_epoch))
    sched = cfg.schedule
    rates = []
    for step in range(total):
        if step < warmup:
            rates.append(sched.warmup_start_lr + (base_lr - sched.warmup_start_lr) * step / warmup)
        elif sched.name == "cosine_warmup":
            progress = (step - warmup) / max(1, total - warmup)
            rates.append(sched.end_lr + (base_lr - sched.end_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
        else:
            passed = sum(1 for m in sched.milestones if step >= m * steps_per_epoch)
            rates.append(base_lr * sched.gamma ** passed)
    return rates


def build_optimizer(cfg: DictConfig, network: nn.Cell, steps_per_epoch: int, world_size: int = 1):
    base_lr = float(cfg.optim.lr)
    if cfg.optim.scale_lr:
        base_lr *= cfg.data.batch_size * world_size / cfg.optim.base_batch_size
    rates = lr_per_step(cfg, steps_per_epoch, base_lr)
    params = network.trainable_params()
    # BN scales/shifts and biases carry no weight decay (PySlowFast's X3D recipe).
    no_decay = [p for p in params if p.name.endswith(("gamma", "beta", "bias"))]
    decay = [p for p in params if not p.name.endswith(("gamma", "beta", "bias"))]
    groups = [{"params": decay, "weight_decay": float(cfg.optim.weight_decay)},
              {"params": no_decay, "weight_decay": 0.0}]
    lr = ms.Tensor(np.asarray(rates, np.float32))
    if cfg.optim.name == "adamw":
        optimizer = nn.AdamWeightDecay(groups, learning_rate=lr, beta1=cfg.optim.betas[0], beta2=cfg.optim.betas[1])
    else:
        optimizer = nn.SGD(groups, learning_rate=lr, momentum=float(cfg.optim.momentum),
                           nesterov=bool(cfg.optim.nesterov))
    return optimizer, rates


# ---------------------------------------------------------------- evaluation

def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def evaluate(network: nn.Cell, loader, num_classes: int) -> Dict[str, float]:
    """Video-level metrics: softmax averaged over every view of a video, then top-1/top-5 and per-class accuracy."""
    network.set_train(False)
    prob_sum: Dict[int, np.ndarray] = {}
    labels: Dict[int, int] = {}
    loss_sum, loss_count = 0.0, 0
    for batch in loader.dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        keep = batch["video_index"] >= 0
        if not keep.any():
            continue
        logits = network(ms.Tensor(batch["clip"])).asnumpy()[keep]
        probs = _softmax(logits)
        batch_labels = batch["label"][keep]
        loss_sum += float(-np.log(np.clip(probs[np.arange(len(probs)), batch_labels], 1e-12, None)).sum())
        loss_count += len(probs)
        for video, label, p in zip(batch["video_index"][keep], batch_labels, probs):
            prob_sum[int(video)] = prob_sum.get(int(video), 0) + p
            labels[int(video)] = int(label)
    if not prob_sum:
        return {"top1": 0.0, "top5": 0.0, "loss": float("nan"), "videos": 0, "per_class": [0.0] * num_classes}
    videos = sorted(prob_sum)
    scores = np.stack([prob_sum[v] for v in videos])
    truth = np.array([labels[v] for v in videos])
    ranked = np.argsort(-scores, axis=1)
    top1 = ranked[:, 0] == truth
    top5 = (ranked[:, :5] == truth[:, None]).any(axis=1)
    per_class = [float(top1[truth == c].mean()) if np.any(truth == c) else float("nan") for c in range(num_classes)]
    return {"top1": float(top1.mean()), "top5": float(top5.mean()), "loss": loss_sum / max(1, loss_count),
            "videos": len(videos), "per_class": per_class}


# ---------------------------------------------------------------- checkpoints

def save_checkpoint_atomic(network: nn.Cell, path: Path, extra: dict) -> Path:
    """Write to a temporary name, then rename: a killed process never leaves a half checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    ms.save_checkpoint(network, str(tmp), append_dict={k: v for k, v in extra.items()})
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- callbacks

class TrainMonitor(Callback):
    """Per-step MLflow metrics, a tqdm bar, and per-epoch validation + checkpoints."""

    def __init__(self, tracker, network, val_loader, run_dir: Path, cfg: DictConfig, rates: List[float],
                 steps_per_epoch: int, batch_size: int, bad_sources):
        super().__init__()
        self.tracker = tracker
        self.network = network
        self.val_loader = val_loader
        self.run_dir = run_dir
        self.cfg = cfg
        self.rates = rates
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.bad_sources = bad_sources
        self.history: List[dict] = []
        self.best_top1 = -1.0
        self.best_path: Optional[Path] = None
        self.last_paths: List[Path] = []
        self._bar = None
        self._t_step = time.time()
        self._epoch_loss: List[float] = []

    def on_train_epoch_begin(self, run_context):
        from tqdm import tqdm

        epoch = run_context.original_args().cur_epoch_num
        self._bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{self.cfg.trainer.epochs}",
                         disable=not _progress_enabled(self.cfg), leave=False)
        self._epoch_loss = []
        self._t_step = time.time()

    def on_train_step_end(self, run_context):
        args = run_context.original_args()
        step = args.cur_step_num
        loss = float(np.mean(args.net_outputs.asnumpy()))
        if not np.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {step}")
        self._epoch_loss.append(loss)
        now = time.time()
        clips_per_s = self.batch_size / max(now - self._t_step, 1e-9)
        self._t_step = now
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}")
        if step % self.cfg.trainer.log_every == 0 or step == 1:
            self.tracker.log_metrics({"train/loss": loss, "train/lr": self.rates[step - 1],
                                      "train/clips_per_s": clips_per_s}, step)

    def on_train_epoch_end(self, run_context):
        args = run_context.original_args()
        epoch, step = args.cur_epoch_num, args.cur_step_num
        if self._bar is not None:
            self._bar.close()
        record = {"epoch": epoch, "train_loss": float(np.mean(self._epoch_loss)) if self._epoch_loss else None}
        if epoch % self.cfg.trainer.eval_every == 0 or epoch == self.cfg.trainer.epochs:
            metrics = evaluate(self.network, self.val_loader, int(self.cfg.data.num_classes))
            self.network.set_train(True)
            record.update(val_loss=metrics["loss"], val_top1=metrics["top1"], val_top5=metrics["top5"])
            self.tracker.log_metrics({"val/loss": metrics["loss"], "val/top1": metrics["top1"],
                                      "val/top5": metrics["top5"]}, step)
            if metrics["top1"] > self.best_top1:
                self.best_top1 = metrics["top1"]
                self.best_path = save_checkpoint_atomic(self.network, self.run_dir / "checkpoints" / "best.ckpt",
                                                        {"epoch": epoch, "step": step})
        bad = sum(len(source.bad_videos()) for source in self.bad_sources)
        self.tracker.log_metrics({"data/bad_videos": bad, "train/epoch_loss": record["train_loss"] or 0.0}, step)
        for source in self.bad_sources:
            source.check_bad_fraction()
        if epoch % self.cfg.trainer.ckpt_every == 0 or epoch == self.cfg.trainer.epochs:
            path = save_checkpoint_atomic(self.network, self.run_dir / "checkpoints" / f"epoch{epoch:04d}.ckpt",
                                          {"epoch": epoch, "step": step})
            self.last_paths.append(path)
            while len(self.last_paths) > self.cfg.trainer.keep_last:
                self.last_paths.pop(0).unlink(missing_ok=True)
        self.history.append(record)
        log.info("epoch %d: %s", epoch, json.dumps(record))


def _progress_enabled(cfg: DictConfig) -> bool:
    import sys

    if cfg.trainer.progress == "auto":
        return sys.stderr.isatty()
    return cfg.trainer.progress in ("on", "true", True)


# ---------------------------------------------------------------- plots

def save_plots(history: List[dict], per_class: List[float], class_names: List[str], out_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    evaluated = [r for r in history if "val_top1" in r]
    ax_loss.plot([r["epoch"] for r in evaluated], [r["val_loss"] for r in evaluated], label="val")
    ax_loss.set_xlabel("epoch"), ax_loss.set_ylabel("loss"), ax_loss.legend()
    ax_acc.plot([r["epoch"] for r in evaluated], [r["val_top1"] for r in evaluated], marker="o")
    ax_acc.set_xlabel("epoch"), ax_acc.set_ylabel("val top-1"), ax_acc.set_ylim(0, 1)
    curves = out_dir / "learning_curves.png"
    fig.tight_layout(), fig.savefig(curves), plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(per_class)), 4))
    ax.bar(range(len(per_class)), per_class)
    if len(class_names) <= 40:
        ax.set_xticks(range(len(per_class)), class_names, rotation=60, ha="right")
    ax.set_ylabel("test top-1"), ax.set_ylim(0, 1), ax.set_title("per-class accuracy")
    per_class_png = out_dir / "per_class_accuracy.png"
    fig.tight_layout(), fig.savefig(per_class_png), plt.close(fig)
    return [curves, per_class_png]


# ---------------------------------------------------------------- tasks

def _loaders(cfg: DictConfig, spec, run_dir: Path, splits):
    from x3d_exp.data import build_loader

    sizes = input_sizes(cfg, spec)
    return {split: build_loader(cfg.data, split, seed=int(cfg.seed), bad_log_dir=str(run_dir / "bad_videos"),
                                **sizes) for split in splits}


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def task_train(cfg: DictConfig) -> dict:
    from x3d_exp.tracking import Tracker

    started = time.time()
    run_dir = _run_dir()
    device = setup_context(cfg)
    network = build_network(cfg, device)
    with Tracker(cfg, run_dir) as tracker:
        loaders = _loaders(cfg, network.spec, run_dir, ("train", "val", "test"))
        if cfg.ckpt:
            from x3d_exp.weights import load_pretrained

            load_pretrained(network, cfg.ckpt)
        tracker.log_model(network, input_sizes(cfg, network.spec))
        train = loaders["train"]
        optimizer, rates = build_optimizer(cfg, network, train.steps_per_epoch)
        loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
        model = Model(network, loss_fn, optimizer, amp_level=cfg.amp_level if device != "CPU" else "O0")
        monitor = TrainMonitor(tracker, network, loaders["val"], run_dir, cfg, rates, train.steps_per_epoch,
                               int(cfg.data.batch_size), list(loaders.values()))
        model.train(int(cfg.trainer.epochs), train.dataset, callbacks=[monitor], dataset_sink_mode=False)
        if monitor.best_path is not None:
            ms.load_param_into_net(network, ms.load_checkpoint(str(monitor.best_path)))
        result = _test_and_record(cfg, network, loaders["test"], tracker, run_dir, monitor.history)
        tracker.log_artifact(monitor.best_path, "checkpoints")
        if monitor.last_paths:
            tracker.log_artifact(monitor.last_paths[-1], "checkpoints")
        result.update(task="train", run_id=tracker.run_id, val_top1=monitor.best_top1,
                      epochs=int(cfg.trainer.epochs), seconds=round(time.time() - started, 1))
    print(f"view the run: mlflow ui --backend-store-uri {tracker.tracking_uri}")
    return result


def _test_and_record(cfg, network, test_loader, tracker, run_dir, history) -> dict:
    from x3d_exp.models.summary import count_parameters

    metrics = evaluate(network, test_loader, int(cfg.data.num_classes))
    tracker.log_metrics({"test/top1": metrics["top1"], "test/top5": metrics["top5"],
                         "data/bad_videos": len(test_loader.bad_videos())}, None)
    plots = save_plots(history, metrics["per_class"], test_loader.class_names, run_dir / "plots")
    for plot in plots:
        tracker.log_artifact(plot, "plots")
    per_class_path = run_dir / "per_class_accuracy.json"
    per_class_path.write_text(json.dumps(dict(zip(test_loader.class_names, metrics["per_class"])), indent=1))
    tracker.log_artifact(per_class_path, None)
    return {"model": cfg.model.name, "params": count_parameters(network), "test_top1": metrics["top1"],
            "test_top5": metrics["top5"], "test_videos": metrics["videos"], "world_size": 1}


def task_test(cfg: DictConfig) -> dict:
    from x3d_exp.tasks import UserError
    from x3d_exp.tracking import Tracker

    if not cfg.ckpt:
        raise UserError("task=test needs ckpt=PATH (a .ckpt written by task=train or task=convert)")
    started = time.time()
    run_dir = _run_dir()
    device = setup_context(cfg)
    network = build_network(cfg, device)
    with Tracker(cfg, run_dir) as tracker:
        from x3d_exp.weights import load_pretrained

        skipped = load_pretrained(network, cfg.ckpt)
        if skipped:
            raise UserError(f"ckpt={cfg.ckpt}: its head does not fit data.num_classes={cfg.data.num_classes}")
        loaders = _loaders(cfg, network.spec, run_dir, ("test",))
        tracker.log_model(network, input_sizes(cfg, network.spec))
        result = _test_and_record(cfg, network, loaders["test"], tracker, run_dir, [])
        result.update(task="test", run_id=tracker.run_id, val_top1=None, epochs=0,
                      seconds=round(time.time() - started, 1))
    return result
