"""Training, validation and multi-view testing on MindSpore's `Model`, recorded in MLflow.

Logging, validation, checkpointing and progress are callbacks of `Model.train`;
evaluation is a plain loop because views must be regrouped per video.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.train import Callback, Model
from omegaconf import DictConfig

from x3d_exp.distributed import (SINGLE, Dist, average_batchnorm_statistics, batchnorm_statistics, check_replicas,
                                 merge_video_scores)
from x3d_exp.tasks import UserError

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
    # A distributed launcher names its device (its collective library only exists there).
    device = resolve_device(cfg.launcher.device or cfg.device)
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
    sched = cfg.schedule
    total = cfg.trainer.epochs * steps_per_epoch
    warmup = int(round(sched.warmup_epochs * steps_per_epoch))
    start_lr = base_lr / 10 if sched.warmup_start_lr is None else float(sched.warmup_start_lr)
    end_lr = base_lr / 1000 if sched.get("end_lr") is None else float(sched.end_lr)
    rates = []
    for step in range(total):
        if step < warmup:
            rates.append(start_lr + (base_lr - start_lr) * step / warmup)
        elif sched.name == "cosine_warmup":
            progress = (step - warmup) / max(1, total - warmup)
            rates.append(end_lr + (base_lr - end_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
        else:
            passed = sum(1 for m in sched.milestones if step >= m * steps_per_epoch)
            rates.append(base_lr * sched.gamma ** passed)
    return rates


class ClippedTrainStep(nn.TrainOneStepCell):
    """One optimizer step on gradients whose global L2 norm is clipped to `max_norm` (after the data-parallel
    mean). Parameter names are those of the cell Model builds itself, so checkpoints are interchangeable."""

    def __init__(self, network_with_loss: nn.Cell, optimizer: nn.Optimizer, max_norm: float):
        super().__init__(network_with_loss, optimizer)
        self.max_norm = float(max_norm)

    def construct(self, *inputs):
        loss = self.network(*inputs)
        grads = self.grad_reducer(self.grad_no_sens(self.network, self.weights)(*inputs))
        return ops.depend(loss, self.optimizer(ops.clip_by_global_norm(grads, self.max_norm)))


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


def collect_scores(network: nn.Cell, loader, cfg: DictConfig, desc: str):
    """Sum of softmax over every view of each video: ({video_index: probs}, {video_index: label}, loss sum, views)."""
    network.set_train(False)
    prob_sum: Dict[int, np.ndarray] = {}
    labels: Dict[int, int] = {}
    loss_sum, views = 0.0, 0
    bar = progress_bar(cfg, loader.steps_per_epoch, desc)
    for batch in loader.dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        bar.update(1)
        keep = batch["video_index"] >= 0
        if not keep.any():
            continue
        probs = _softmax(network(ms.Tensor(batch["clip"])).asnumpy()[keep])
        batch_labels = batch["label"][keep]
        loss_sum += float(-np.log(np.clip(probs[np.arange(len(probs)), batch_labels], 1e-12, None)).sum())
        views += len(probs)
        for video, label, p in zip(batch["video_index"][keep], batch_labels, probs):
            prob_sum[int(video)] = prob_sum.get(int(video), 0) + p
            labels[int(video)] = int(label)
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
             dist: Dist = SINGLE) -> Dict[str, object]:
    """Video-level metrics of one split: the loss is per view, accuracy per video; over all ranks' shards."""
    scores = merge_video_scores(*collect_scores(network, loader, cfg, desc), loader.num_videos, num_classes, dist)
    return video_metrics(*scores, num_classes)


def precise_batchnorm_statistics(network: nn.Cell, loader, num_batches: int) -> int:
    """PySlowFast's precise BN: set every BN's running mean and variance to the plain average of the statistics of
    up to `num_batches` training batches under the current weights; returns the number of batches used.

    The running averages trail the weights by many steps, which shows in the evaluation while the lr is high. The
    BN ops expose only their running averages, so each batch's own statistics are recovered from consecutive values,
    running_i = m * running_(i-1) + (1 - m) * batch_i, m being the BN momentum.
    """
    from x3d_exp.models.x3d import BN_MOMENTUM

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


# ---------------------------------------------------------------- checkpoints and resume

EPOCH_CKPT = re.compile(r"^epoch(\d+)\.ckpt$")


def save_checkpoint_atomic(train_network: nn.Cell, path: Path, extra: dict) -> Path:
    """Write the whole training state (weights, optimizer moments, its step counter that positions the lr) to a
    temporary name, then rename: a killed process never leaves a half-written checkpoint under a final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # save_checkpoint appends ".ckpt" to any other suffix, so the temporary name must end in .ckpt itself.
    tmp = path.with_name(f".{path.stem}.partial.ckpt")
    ms.save_checkpoint(train_network, str(tmp), append_dict=dict(extra))
    os.replace(tmp, path)
    return path


def epoch_checkpoints(ckpt_dir: Path) -> List[Path]:
    """Complete per-epoch checkpoints in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := EPOCH_CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_unfinished_run(outputs: Path, exclude: Path) -> Optional[Tuple[Path, int, int]]:
    """(run dir, last saved epoch, planned epochs) of the most recently checkpointed run in Hydra's default layout
    `outputs/<date>/<time>/` whose checkpoints stop short of its trainer.epochs; None if there is none."""
    from omegaconf import OmegaConf

    candidates = []
    for ckpt_dir in outputs.glob("*/*/checkpoints"):
        run = ckpt_dir.parent
        found = epoch_checkpoints(ckpt_dir)
        if run.resolve() == exclude.resolve() or not found:
            continue
        try:
            planned = int(OmegaConf.load(run / ".hydra" / "config.yaml").trainer.epochs)
        except Exception:  # not a run of ours, or its config is unreadable: not a candidate
            continue
        last = int(EPOCH_CKPT.match(found[-1].name).group(1))
        if last < planned:
            candidates.append((found[-1].stat().st_mtime, run, last, planned))
    return max(candidates, key=lambda c: c[0])[1:] if candidates else None


def resolve_resume(setting, run_dir: Path):
    """(directory the run writes to, checkpoint to resume from or None) for `resume=false|auto|PATH`.

    A resumed run keeps writing into the directory of the checkpoint it resumes, next to its MLflow run id.
    """
    if setting in (False, None, "false", "False"):
        return run_dir, None
    if setting == "auto":
        found = epoch_checkpoints(run_dir / "checkpoints")
        if not found:
            hint = ""
            unfinished = newest_unfinished_run(run_dir.parent.parent, exclude=run_dir)
            if unfinished:
                hint = (f"; the newest unfinished run next to it is {unfinished[0]} (epoch {unfinished[1]} of "
                        f"{unfinished[2]}): resume={unfinished[0]} continues that one")
            print(f"resume=auto: no checkpoint in {run_dir / 'checkpoints'}, starting from scratch{hint}")
            return run_dir, None
        return run_dir, found[-1]
    path = Path(str(setting)).expanduser()
    if path.is_dir():
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = epoch_checkpoints(ckpt_dir)
        if not found:
            raise UserError(f"resume={setting}: no epochNNNN.ckpt in {ckpt_dir}")
        path = found[-1]
    elif not path.is_file():
        raise UserError(f"resume={setting}: no such checkpoint or run directory")
    return path.resolve().parent.parent, path.resolve()


def restore_training_state(train_network: nn.Cell, path: Path) -> dict:
    """Load weights and optimizer state into the training cell; returns the saved epoch, step and best top-1."""
    from x3d_exp.weights import WeightsError

    try:
        state = ms.load_checkpoint(str(path))
    except (ValueError, RuntimeError, OSError) as err:
        raise WeightsError(f"resume: {path} is not a readable checkpoint ({err})") from None
    missing = [k for k in ("epoch", "step") if k not in state]
    if missing:
        raise WeightsError(f"resume: {path} has no {', '.join(missing)} entry (not written by task=train)")
    meta = {k: state.pop(k).asnumpy().item() for k in ("epoch", "step", "best_top1") if k in state}
    not_loaded, _ = ms.load_param_into_net(train_network, state)
    model_keys = [k for k in not_loaded if k.split(".", 1)[0] in ("stem", "stages", "head")]
    if model_keys:
        raise WeightsError(f"resume: {path} does not fit this model: {model_keys[0]} missing "
                           f"(+{len(model_keys) - 1} more); resume with the same model config")
    return meta


# ---------------------------------------------------------------- callbacks

class TrainMonitor(Callback):
    """Step metrics and a progress bar; per epoch: validation, checkpoints, the bad-video count and history.

    Steps are numbered globally from the epoch, (epoch - 1) * steps_per_epoch + i, so a resumed run continues
    the same MLflow step axis.

    Distributed: every rank trains, averages its BN statistics with the others and validates its shard; only rank 0
    writes checkpoints and history. Every rank keeps the best weights in memory, so all test the same model.
    """

    def __init__(self, tracker, network: nn.Cell, val_loader, train_dir: Path, cfg: DictConfig,
                 rates: List[float], steps_per_epoch: int, loaders, start: Optional[dict] = None,
                 dist: Dist = SINGLE, bn_loader=None):
        super().__init__()
        self.dist = dist
        self.bn_loader = bn_loader
        self.best_weights: Optional[Dict[str, np.ndarray]] = None
        self.tracker = tracker
        self.network = network
        self.val_loader = val_loader
        self.ckpt_dir = train_dir / "checkpoints"
        self.history_path = self.ckpt_dir / "history.json"
        self.cfg = cfg
        self.rates = rates
        self.steps_per_epoch = steps_per_epoch
        self.loaders = loaders
        resumed = start is not None
        self.best_top1 = float(start.get("best_top1", -1.0)) if resumed else -1.0
        # The history file may run one epoch past the checkpoint if the process died between the two writes.
        self.history: List[dict] = ([r for r in json.loads(self.history_path.read_text())
                                     if r["epoch"] <= start["epoch"]]
                                    if resumed and self.history_path.is_file() else [])
        best = self.ckpt_dir / "best.ckpt"
        self.best_path: Optional[Path] = best if resumed and best.is_file() else None
        self.last_paths: List[Path] = epoch_checkpoints(self.ckpt_dir) if resumed else []
        self._bar = None
        self._t_step = time.time()
        self._epoch_loss: List[float] = []
        self._step_in_epoch = 0

    def on_train_epoch_begin(self, run_context):
        epoch = run_context.original_args().cur_epoch_num
        self._bar = progress_bar(self.cfg, self.steps_per_epoch, f"epoch {epoch}/{self.cfg.trainer.epochs}")
        self._epoch_loss = []
        self._step_in_epoch = 0
        self._t_step = time.time()

    def on_train_step_end(self, run_context):
        args = run_context.original_args()
        self._step_in_epoch += 1
        step = (args.cur_epoch_num - 1) * self.steps_per_epoch + self._step_in_epoch
        loss = float(np.mean(args.net_outputs.asnumpy()))
        if not np.isfinite(loss):
            raise UserError(f"training diverged: loss {loss} at step {step}; try a lower optim.lr (now {self.cfg.optim.lr})")
        self._epoch_loss.append(loss)
        now = time.time()
        # All ranks step together, so this is the global rate; train/loss is rank 0's own batch.
        clips_per_s = int(self.cfg.data.batch_size) * self.dist.world_size / max(now - self._t_step, 1e-9)
        self._t_step = now
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.3f}")
        if step % self.cfg.trainer.log_every == 0 or self._step_in_epoch == 1:
            self.tracker.log_metrics({"train/loss": loss, "train/lr": self.rates[step - 1],
                                      "train/clips_per_s": clips_per_s}, step)

    def on_train_epoch_end(self, run_context):
        args = run_context.original_args()
        epoch = args.cur_epoch_num
        step = epoch * self.steps_per_epoch
        self._bar.close()
        record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(self._epoch_loss))}
        metrics = {"train/epoch_loss": record["train_loss"], "epoch": epoch}
        improved = False
        last = epoch == self.cfg.trainer.epochs
        evaluating = epoch % self.cfg.trainer.eval_every == 0 or last
        saving = epoch % self.cfg.trainer.ckpt_every == 0 or last
        if self.bn_loader is not None and (evaluating or saving):
            self.bn_loader.set_epoch(epoch)
            used = precise_batchnorm_statistics(self.network, self.bn_loader, self.cfg.trainer.precise_bn_batches)
            log.info("epoch %d: BN statistics from %d training batches", epoch, used)
        # Before validating or saving, so the checkpoint holds the statistics the ranks evaluated with.
        average_batchnorm_statistics(self.network, self.dist)
        if evaluating:
            val = evaluate(self.network, self.val_loader, int(self.cfg.data.num_classes), self.cfg, "val", self.dist)
            self.network.set_train(True)
            record.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
            metrics.update({"val/loss": val["loss"], "val/top1": val["top1"], "val/top5": val["top5"]})
            improved = val["top1"] > self.best_top1
            self.best_top1 = max(self.best_top1, val["top1"])
        bad = sum(len(loader.bad_videos()) for loader in self.loaders)
        metrics["data/bad_videos"] = int(round(self.dist.all_reduce_sum(np.array([bad]))[0]))
        self.tracker.log_metrics(metrics, step)
        for loader in self.loaders:
            loader.check_bad_fraction()
        self.history.append(record)
        if improved:
            self.best_weights = {p.name: p.asnumpy().copy() for p in self.network.get_parameters()}
        if not self.dist.is_main:
            log.info("epoch %d: %s", epoch, json.dumps(record))
            return
        state = {"epoch": epoch, "step": step, "best_top1": self.best_top1}
        train_network = args.train_network
        if improved:
            self.best_path = save_checkpoint_atomic(train_network, self.ckpt_dir / "best.ckpt", state)
        if saving:
            # The history is written before the checkpoint that it goes with, so any complete checkpoint has one.
            _write_atomic(self.history_path, json.dumps(self.history, indent=1))
            self.last_paths.append(save_checkpoint_atomic(train_network, self.ckpt_dir / f"epoch{epoch:04d}.ckpt",
                                                          state))
            while len(self.last_paths) > self.cfg.trainer.keep_last:
                self.last_paths.pop(0).unlink(missing_ok=True)
        log.info("epoch %d: %s", epoch, json.dumps(record))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def progress_bar(cfg: DictConfig, total: int, desc: str):
    """tqdm with ETA on a terminal; silent in logs unless trainer.progress=on."""
    import sys

    from tqdm import tqdm

    setting = str(cfg.trainer.progress)
    enabled = sys.stderr.isatty() if setting == "auto" else setting in ("on", "true", "True")
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


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

def _loaders(cfg: DictConfig, spec, run_dir: Path, splits, dist: Dist = SINGLE):
    from x3d_exp.data import build_loader

    sizes = input_sizes(cfg, spec)
    return {split: build_loader(cfg.data, split, seed=int(cfg.seed), bad_log_dir=str(run_dir / "bad_videos"),
                                shard_id=dist.rank, num_shards=dist.world_size, **sizes) for split in splits}


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _amp_level(cfg: DictConfig, device: str) -> str:
    if device == "CPU" and cfg.amp_level != "O0":
        log.warning("amp_level=%s ignored on the CPU (no float16 convolutions there); using O0", cfg.amp_level)
        return "O0"
    return str(cfg.amp_level)


def _join(cfg: DictConfig) -> Tuple[str, Dist]:
    from x3d_exp.distributed import join

    device = setup_context(cfg)
    return device, join(device)


def _restore_best(network: nn.Cell, monitor: "TrainMonitor") -> None:
    """The best validated weights: this session's copy in memory, else (a resumed run) best.ckpt, else the last."""
    if monitor.best_weights is not None:
        for param in network.get_parameters():
            param.set_data(ms.Tensor(monitor.best_weights[param.name]))
    elif (monitor.ckpt_dir / "best.ckpt").is_file():
        ms.load_param_into_net(network, ms.load_checkpoint(str(monitor.ckpt_dir / "best.ckpt")))


def _leave_result(result: dict, out_dir: Path, dist: Dist) -> None:
    """Rank 0's result for the msrun launcher, which prints it (x3d_exp.msrun)."""
    if dist.world_size > 1 and dist.is_main:
        from x3d_exp.msrun import RESULT_FILE

        _write_atomic(out_dir / RESULT_FILE, json.dumps(result))


def task_train(cfg: DictConfig) -> dict:
    from x3d_exp import msrun
    from x3d_exp.tracking import Tracker

    if msrun.needs_launch(cfg):
        return msrun.launch(cfg)
    started = time.time()
    train_dir, resume_from = resolve_resume(cfg.resume, _run_dir())
    device, dist = _join(cfg)
    network = build_network(cfg, device)
    with Tracker(cfg, train_dir, resume=resume_from is not None, active=dist.is_main) as tracker:
        loaders = _loaders(cfg, network.spec, train_dir, ("train", "val", "test"), dist)
        if cfg.ckpt and resume_from is None:
            from x3d_exp.weights import load_pretrained

            skipped = load_pretrained(network, cfg.ckpt)
            if skipped:
                print(f"ckpt={cfg.ckpt}: loaded all but {', '.join(skipped)} (class count differs)")
        if resume_from is None:
            tracker.log_model(network, input_sizes(cfg, network.spec))
            tracker.log_params({"world_size": dist.world_size})
        train = loaders["train"]
        optimizer, rates = build_optimizer(cfg, network, train.steps_per_epoch, dist.world_size)
        loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
        amp_level = _amp_level(cfg, device)
        scale = ms.amp.DynamicLossScaleManager() if amp_level in ("O2", "O3") else None
        if cfg.optim.clip_grad_norm:
            model = Model(ClippedTrainStep(nn.WithLossCell(network, loss_fn), optimizer, cfg.optim.clip_grad_norm))
        else:
            model = Model(network, loss_fn, optimizer, amp_level=amp_level, loss_scale_manager=scale)
        start = None
        if resume_from is not None:
            start = restore_training_state(model.train_network, resume_from)
            print(f"resumed from {resume_from} at epoch {start['epoch']}, step {start['step']}")
        first_epoch = int(start["epoch"]) if start else 0
        if first_epoch >= cfg.trainer.epochs:
            raise UserError(f"resume={cfg.resume}: {resume_from} is already at epoch {first_epoch} of "
                             f"trainer.epochs={cfg.trainer.epochs}")
        train.set_epoch(first_epoch)
        # Its own pipeline: the training one is mid-iteration inside Model.train when the statistics are taken.
        bn_loader = (_loaders(cfg, network.spec, train_dir, ("train",), dist)["train"]
                     if cfg.trainer.precise_bn_batches else None)
        monitor = TrainMonitor(tracker, network, loaders["val"], train_dir, cfg, rates, train.steps_per_epoch,
                               list(loaders.values()), start, dist, bn_loader)
        model.train(int(cfg.trainer.epochs), train.dataset, callbacks=[monitor], dataset_sink_mode=False,
                    initial_epoch=first_epoch)
        check_replicas(model.train_network, dist, train_dir)
        _restore_best(network, monitor)
        result = _test_and_record(cfg, network, loaders["test"], tracker, train_dir, monitor.history, dist)
        tracker.log_artifact(monitor.best_path, "checkpoints")
        if monitor.last_paths:
            tracker.log_artifact(monitor.last_paths[-1], "checkpoints")
        result.update(task="train", run_id=tracker.run_id, val_top1=monitor.best_top1,
                      epochs=int(cfg.trainer.epochs), seconds=round(time.time() - started, 1))
        _leave_result(result, train_dir, dist)
    if tracker.active and tracker.owner:
        print(f"view the run: mlflow ui --backend-store-uri {tracker.display_uri}")
    return result


def inference_network(network: nn.Cell) -> nn.Cell:
    """For a one-off evaluation: with the CPU kernels, a copy with the eval BatchNorms folded into them (about half
    the forward time, same logits within 1e-5; x3d_exp.models.fuse). Not between epochs: each copy compiles anew."""
    if network.spec.conv_impl == "native":
        return network
    from x3d_exp.models.fuse import fuse_for_inference

    return fuse_for_inference(network)


def _test_and_record(cfg, network, test_loader, tracker, run_dir, history, dist: Dist = SINGLE,
                     scorer: Optional[nn.Cell] = None) -> dict:
    from x3d_exp.models.summary import count_parameters

    metrics = evaluate(scorer or network, test_loader, int(cfg.data.num_classes), cfg, "test", dist)
    bad = int(round(dist.all_reduce_sum(np.array([len(test_loader.bad_videos())]))[0]))
    tracker.log_metrics({"test/top1": metrics["top1"], "test/top5": metrics["top5"], "test/loss": metrics["loss"],
                         "data/bad_videos_test": bad}, None)
    if dist.is_main:
        plots = save_plots(history, metrics["per_class"], test_loader.class_names, run_dir / "plots")
        for plot in plots:
            tracker.log_artifact(plot, "plots")
        per_class_path = run_dir / "per_class_accuracy.json"
        per_class_path.write_text(json.dumps(dict(zip(test_loader.class_names, metrics["per_class"])), indent=1))
        tracker.log_artifact(per_class_path, None)
    return {"model": cfg.model.name, "params": count_parameters(network), "test_top1": metrics["top1"],
            "test_top5": metrics["top5"], "test_videos": metrics["videos"], "world_size": dist.world_size}


def task_test(cfg: DictConfig) -> dict:
    from x3d_exp import msrun
    from x3d_exp.tracking import Tracker

    if not cfg.ckpt:
        raise UserError("task=test needs ckpt=PATH (a .ckpt written by task=train or task=convert)")
    if msrun.needs_launch(cfg):
        return msrun.launch(cfg)
    started = time.time()
    run_dir = _run_dir()
    device, dist = _join(cfg)
    network = build_network(cfg, device)
    with Tracker(cfg, run_dir, active=dist.is_main) as tracker:
        from x3d_exp.weights import load_pretrained

        skipped = load_pretrained(network, cfg.ckpt)
        if skipped:
            raise UserError(f"ckpt={cfg.ckpt}: its head does not fit data.num_classes={cfg.data.num_classes}")
        loaders = _loaders(cfg, network.spec, run_dir, ("test",), dist)
        tracker.log_model(network, input_sizes(cfg, network.spec))
        tracker.log_params({"world_size": dist.world_size})
        result = _test_and_record(cfg, network, loaders["test"], tracker, run_dir, [], dist,
                                  scorer=inference_network(network))
        result.update(task="test", run_id=tracker.run_id, val_top1=None, epochs=0,
                      seconds=round(time.time() - started, 1))
        _leave_result(result, run_dir, dist)
    if tracker.active and tracker.owner:
        print(f"view the run: mlflow ui --backend-store-uri {tracker.display_uri}")
    return result
