"""`Model.train` callbacks, one per behaviour, sharing one `TrainState`.

`train_callbacks` returns them in the order MindSpore must call them at each epoch's end (it calls a callback
list in order):

1. `StepLogger`: step loss, lr and clips/s, the progress bar, the epoch's history record.
2. `BatchNormStatistics`: precise BN (when asked for), then the mean of the BN buffers over ranks, so that
   validation and the checkpoint both see the statistics every rank shares.
3. `Validation`: the val split's video-level metrics; notes an improvement and keeps those weights in memory.
4. `BadVideoCount`: the bad-video count over ranks, and the stop when too many videos fail to decode.
5. `Checkpointing`: rank 0 writes best.ckpt, epochNNNN.ckpt and the history, last, so a checkpoint holds
   what was validated.

Steps are numbered globally from the epoch, (epoch - 1) * steps_per_epoch + i, so a resumed run continues
the same MLflow step axis. `tracker` is anything with `log_metrics(metrics, step)` (x3d_exp.tracking.Tracker;
a no-op on ranks other than 0).

Distributed: every rank trains, averages its BN statistics with the others and validates its shard; only rank 0
writes checkpoints and history. Every rank keeps the best weights in memory, so all test the same model.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from mindspore import nn
from mindspore.train import Callback
from omegaconf import DictConfig

from x3d_exp.distributed import SINGLE, Dist
from x3d_exp.engine.batchnorm import average_batchnorm_statistics, precise_batchnorm_statistics
from x3d_exp.engine.checkpoint import BEST_CKPT, epoch_checkpoints, save_checkpoint_atomic, write_atomic
from x3d_exp.engine.evaluate import evaluate, progress_bar
from x3d_exp.errors import UserError

log = logging.getLogger("x3d_exp.engine")
HISTORY_FILE = "history.json"


@dataclass
class TrainState:
    """What the callbacks of one training share: the epoch's decisions, the history and the best model so far."""

    cfg: DictConfig
    steps_per_epoch: int
    ckpt_dir: Path
    dist: Dist = SINGLE
    best_top1: float = -1.0
    history: List[dict] = field(default_factory=list)
    best_weights: Optional[Dict[str, np.ndarray]] = None
    best_path: Optional[Path] = None
    last_paths: List[Path] = field(default_factory=list)
    # This epoch's history record (StepLogger opens it, the others add to it) and whether val top-1 improved.
    record: dict = field(default_factory=dict)
    improved: bool = False
    # The training clip's (frames, crop side), saved in every checkpoint (engine.checkpoint.META_KEYS).
    clip: Optional[Tuple[int, int]] = None

    @classmethod
    def start(cls, cfg: DictConfig, steps_per_epoch: int, train_dir: Path, resumed_from: Optional[dict] = None,
              dist: Dist = SINGLE) -> "TrainState":
        """A new training's state, or a resumed one's from its checkpoint metadata and the files beside it."""
        ckpt_dir = train_dir / "checkpoints"
        state = cls(cfg, steps_per_epoch, ckpt_dir, dist)
        if resumed_from is None:
            return state
        state.best_top1 = float(resumed_from.get("best_top1", -1.0))
        history = ckpt_dir / HISTORY_FILE
        # The history file may run one epoch past the checkpoint if the process died between the two writes.
        if history.is_file():
            state.history = [r for r in json.loads(history.read_text()) if r["epoch"] <= resumed_from["epoch"]]
        best = ckpt_dir / BEST_CKPT
        state.best_path = best if best.is_file() else None
        state.last_paths = epoch_checkpoints(ckpt_dir)
        return state

    def evaluating(self, epoch: int) -> bool:
        return epoch % self.cfg.trainer.eval_every == 0 or epoch == self.cfg.trainer.epochs

    def saving(self, epoch: int) -> bool:
        return epoch % self.cfg.trainer.ckpt_every == 0 or epoch == self.cfg.trainer.epochs

    def epoch_step(self, epoch: int) -> int:
        return epoch * self.steps_per_epoch


class StepLogger(Callback):
    def __init__(self, state: TrainState, tracker, rates: List[float]):
        super().__init__()
        self.state, self.tracker, self.rates = state, tracker, rates
        self._bar = None
        self._t_step = time.time()
        self._epoch_loss: List[float] = []
        self._step_in_epoch = 0

    def on_train_epoch_begin(self, run_context):
        epoch = run_context.original_args().cur_epoch_num
        cfg = self.state.cfg
        self._bar = progress_bar(cfg, self.state.steps_per_epoch, f"epoch {epoch}/{cfg.trainer.epochs}")
        self._epoch_loss = []
        self._step_in_epoch = 0
        self._t_step = time.time()

    def on_train_step_end(self, run_context):
        args = run_context.original_args()
        cfg = self.state.cfg
        self._step_in_epoch += 1
        step = (args.cur_epoch_num - 1) * self.state.steps_per_epoch + self._step_in_epoch
        loss = float(np.mean(args.net_outputs.asnumpy()))
        if not np.isfinite(loss):
            raise UserError(f"training diverged: loss {loss} at step {step}; try a lower optim.lr (now {cfg.optim.lr})")
        self._epoch_loss.append(loss)
        now = time.time()
        # All ranks step together, so this is the global rate; train/loss is rank 0's own batch.
        clips_per_s = int(cfg.data.batch_size) * self.state.dist.world_size / max(now - self._t_step, 1e-9)
        self._t_step = now
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.3f}")
        if step % cfg.trainer.log_every == 0 or self._step_in_epoch == 1:
            self.tracker.log_metrics({"train/loss": loss, "train/lr": self.rates[step - 1],
                                      "train/clips_per_s": clips_per_s}, step)

    def on_train_epoch_end(self, run_context):
        epoch = run_context.original_args().cur_epoch_num
        self._bar.close()
        state = self.state
        state.record = {"epoch": epoch, "step": state.epoch_step(epoch), "train_loss": float(np.mean(self._epoch_loss))}
        state.improved = False
        state.history.append(state.record)
        self.tracker.log_metrics({"train/epoch_loss": state.record["train_loss"], "epoch": epoch},
                                 state.epoch_step(epoch))


class BatchNormStatistics(Callback):
    """Precise BN from `loader` (its own pipeline: the training one is mid-iteration inside Model.train) before an
    epoch is validated or saved; then, always, the mean of every rank's BN buffers."""

    def __init__(self, state: TrainState, network: nn.Cell, loader=None, num_batches: int = 0):
        super().__init__()
        self.state, self.network, self.loader, self.num_batches = state, network, loader, num_batches

    def on_train_epoch_end(self, run_context):
        epoch = run_context.original_args().cur_epoch_num
        if self.loader is not None and self.num_batches and (self.state.evaluating(epoch) or self.state.saving(epoch)):
            self.loader.set_epoch(epoch)
            used = precise_batchnorm_statistics(self.network, self.loader, self.num_batches)
            log.info("epoch %d: BN statistics from %d training batches", epoch, used)
        average_batchnorm_statistics(self.network, self.state.dist)


class Validation(Callback):
    def __init__(self, state: TrainState, tracker, network: nn.Cell, loader):
        super().__init__()
        self.state, self.tracker, self.network, self.loader = state, tracker, network, loader

    def on_train_epoch_end(self, run_context):
        epoch = run_context.original_args().cur_epoch_num
        state = self.state
        if not state.evaluating(epoch):
            return
        val = evaluate(self.network, self.loader, int(state.cfg.data.num_classes), state.cfg, "val", state.dist)
        self.network.set_train(True)
        state.record.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
        self.tracker.log_metrics({"val/loss": val["loss"], "val/top1": val["top1"], "val/top5": val["top5"]},
                                 state.epoch_step(epoch))
        state.improved = val["top1"] > state.best_top1
        state.best_top1 = max(state.best_top1, val["top1"])
        if state.improved:
            state.best_weights = {p.name: p.asnumpy().copy() for p in self.network.get_parameters()}


class BadVideoCount(Callback):
    """Videos that failed to decode, summed over ranks and loaders; stops the run past data.max_bad_fraction."""

    def __init__(self, state: TrainState, tracker, loaders):
        super().__init__()
        self.state, self.tracker, self.loaders = state, tracker, list(loaders)

    def on_train_epoch_end(self, run_context):
        epoch = run_context.original_args().cur_epoch_num
        bad = sum(len(loader.bad_videos()) for loader in self.loaders)
        total = int(round(self.state.dist.all_reduce_sum(np.array([bad]))[0]))
        self.tracker.log_metrics({"data/bad_videos": total}, self.state.epoch_step(epoch))
        for loader in self.loaders:
            loader.check_bad_fraction()


class Checkpointing(Callback):
    """Rank 0: best.ckpt on an improvement; every trainer.ckpt_every epochs (and the last) the history and
    epochNNNN.ckpt, keeping trainer.keep_last of those."""

    def __init__(self, state: TrainState):
        super().__init__()
        self.state = state

    def on_train_epoch_end(self, run_context):
        args = run_context.original_args()
        epoch = args.cur_epoch_num
        state = self.state
        if state.dist.is_main:
            meta = {"epoch": epoch, "step": state.epoch_step(epoch), "best_top1": state.best_top1}
            if state.clip:
                meta.update(clip_num_frames=state.clip[0], clip_crop_size=state.clip[1])
            if state.improved:
                state.best_path = save_checkpoint_atomic(args.train_network, state.ckpt_dir / BEST_CKPT, meta)
            if state.saving(epoch):
                # The history is written before the checkpoint that it goes with, so any complete checkpoint has one.
                write_atomic(state.ckpt_dir / HISTORY_FILE, json.dumps(state.history, indent=1))
                state.last_paths.append(save_checkpoint_atomic(
                    args.train_network, state.ckpt_dir / f"epoch{epoch:04d}.ckpt", meta))
                while len(state.last_paths) > state.cfg.trainer.keep_last:
                    state.last_paths.pop(0).unlink(missing_ok=True)
        log.info("epoch %d: %s", epoch, json.dumps(state.record))


def train_callbacks(state: TrainState, tracker, network: nn.Cell, rates: List[float], val_loader, loaders,
                    bn_loader=None) -> List[Callback]:
    """The callbacks of one training, in the order the module docstring gives and explains."""
    return [StepLogger(state, tracker, rates),
            BatchNormStatistics(state, network, bn_loader, int(state.cfg.trainer.precise_bn_batches)),
            Validation(state, tracker, network, val_loader),
            BadVideoCount(state, tracker, loaders),
            Checkpointing(state)]
