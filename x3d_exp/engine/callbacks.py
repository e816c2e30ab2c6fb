"""`Model.train` callbacks, one per behaviour, sharing one `TrainState`.

`train_callbacks` returns them in the order MindSpore must call them at each epoch's end (it calls a callback
list in order):

1. `StepLogger`: step loss, lr and clips/s, the progress bar with the whole run's estimate (a line a minute in a
   plain log instead), the epoch's history record.
2. `BatchNormStatistics`: precise BN (when asked for), then the mean of the BN buffers over ranks, so that
   validation and the checkpoint both see the statistics every rank shares.
3. `Validation`: the val split's video-level metrics; notes an improvement and keeps those weights in memory.
4. `BadVideoCount`: the bad-video count over ranks, and the stop when too many videos fail to decode.
5. `Checkpointing`: rank 0 writes best.ckpt, epochNNNN.ckpt and the history, last, so a checkpoint holds
   what was validated; the epoch's log line, with the run's elapsed time and estimate.

The task appends x3d_exp.engine.interrupt.StopAtStepBoundary after them: a signal stops the run after a step.

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
from x3d_exp.engine.checkpoint import (BEST_CKPT, INTERRUPT_CKPT, epoch_checkpoints, save_checkpoint_atomic,
                                       write_atomic)
from x3d_exp.engine.evaluate import evaluate
from x3d_exp.engine.progress import PlainLogThrottle, RunClock, format_duration, progress_bar, progress_enabled
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
    best_epoch: Optional[int] = None
    # Steps done in the current epoch; a run resumed mid-epoch starts its first epoch at skip_steps.
    step_in_epoch: int = 0
    skip_steps: int = 0
    clock: Optional[RunClock] = None
    # The training time of the sessions before a resume, up to the state resumed from: the run's clock goes on from it.
    earlier_s: float = 0.0
    # Announced before the first step: the one-time graph compile's expected seconds (engine.memory).
    compile_estimate_s: Optional[float] = None

    @classmethod
    def start(cls, cfg: DictConfig, steps_per_epoch: int, train_dir: Path, resumed_from: Optional[dict] = None,
              dist: Dist = SINGLE) -> "TrainState":
        """A new training's state, or a resumed one's from its checkpoint metadata and the files beside it."""
        ckpt_dir = train_dir / "checkpoints"
        state = cls(cfg, steps_per_epoch, ckpt_dir, dist)
        if resumed_from is None:
            return state
        state.best_top1 = float(resumed_from.get("best_top1", -1.0))
        state.skip_steps = int(resumed_from.get("step_in_epoch", 0))
        state.earlier_s = float(resumed_from.get("elapsed_s", 0.0))
        history = ckpt_dir / HISTORY_FILE
        # The history file may run one epoch past the checkpoint if the process died between the two writes.
        if history.is_file():
            state.history = [r for r in json.loads(history.read_text()) if r["epoch"] <= resumed_from["epoch"]]
        validated = [r for r in state.history if "val_top1" in r]
        if validated:
            state.best_epoch = max(validated, key=lambda r: r["val_top1"])["epoch"]
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

    def checkpoint_meta(self, epoch: int, step_in_epoch: int = 0) -> dict:
        """What a checkpoint records beside the weights (engine.checkpoint.META_KEYS): where training stands after
        `epoch` epochs and `step_in_epoch` steps of the next, the best val top-1, the training clip and the training
        time so far."""
        meta = {"epoch": epoch, "step": self.epoch_step(epoch) + step_in_epoch, "best_top1": self.best_top1}
        if self.clock is not None:
            meta["elapsed_s"] = round(self.clock.elapsed(), 1)
        if step_in_epoch:
            meta["step_in_epoch"] = step_in_epoch
        if self.clip:
            meta.update(clip_num_frames=self.clip[0], clip_crop_size=self.clip[1])
        return meta

    def start_clock(self, first_epoch: int, val_batches: int, test_batches: int, eval_cost: float) -> RunClock:
        """The run's clock, counting what a resumed run has already done as done."""
        epochs = int(self.cfg.trainer.epochs)
        validations = sum(1 for e in range(1, epochs + 1) if self.evaluating(e))
        done = sum(1 for e in range(1, first_epoch + 1) if self.evaluating(e))
        self.clock = RunClock(epochs * self.steps_per_epoch, self.epoch_step(first_epoch) + self.skip_steps,
                              val_batches, validations, done, test_batches, eval_cost,
                              started=time.time() - self.earlier_s)
        return self.clock


class StepLogger(Callback):
    def __init__(self, state: TrainState, tracker, rates: List[float]):
        super().__init__()
        self.state, self.tracker, self.rates = state, tracker, rates
        self._bar = None
        self._t_step = time.time()
        self._epoch_loss: List[float] = []
        self._plain = PlainLogThrottle()
        self._first_step = True

    def on_train_begin(self, run_context):
        if self.state.compile_estimate_s is not None:
            log.info("compiling the training graph, one time, about %s", format_duration(self.state.compile_estimate_s))
            self.state.compile_estimate_s = None  # a resumed run trains its partial epoch, then the rest: say it once

    def on_train_epoch_begin(self, run_context):
        epoch = run_context.original_args().cur_epoch_num
        state, cfg = self.state, self.state.cfg
        # A run resumed mid-epoch: its loader skips the steps already trained (x3d_exp.data.Loader.set_epoch).
        state.step_in_epoch, state.skip_steps = state.skip_steps, 0
        self._bar = progress_bar(cfg, state.steps_per_epoch, f"epoch {epoch}/{cfg.trainer.epochs}",
                                 initial=state.step_in_epoch)
        self._epoch_loss = []
        self._t_step = time.time()

    def on_train_step_end(self, run_context):
        args = run_context.original_args()
        state, cfg = self.state, self.state.cfg
        state.step_in_epoch += 1
        step = (args.cur_epoch_num - 1) * state.steps_per_epoch + state.step_in_epoch
        loss = float(np.mean(args.net_outputs.asnumpy()))
        if not np.isfinite(loss):
            raise UserError(f"training diverged: loss {loss} at step {step}; try a lower optim.lr (now {cfg.optim.lr})")
        self._epoch_loss.append(loss)
        now = time.time()
        # All ranks step together, so this is the global rate; train/loss is rank 0's own batch.
        seconds = now - self._t_step
        clips_per_s = int(cfg.data.batch_size) * state.dist.world_size / max(seconds, 1e-9)
        self._t_step = now
        state.clock.step_done(seconds)
        if self._first_step:
            self._first_step = False
            log.info("first step, with the graph compile: %s", format_duration(seconds))
        self._bar.update(1)
        self._bar.set_postfix_str(f"loss {loss:.3f}, {state.clock.status(now)}")
        if not progress_enabled(cfg) and state.step_in_epoch < state.steps_per_epoch and self._plain.due(now):
            log.info("epoch %d/%d, step %d/%d: loss %.4f; %s", args.cur_epoch_num, cfg.trainer.epochs,
                     state.step_in_epoch, state.steps_per_epoch, loss, state.clock.status(now))
        if step % cfg.trainer.log_every == 0 or state.step_in_epoch == 1:
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
        val = evaluate(self.network, self.loader, int(state.cfg.data.num_classes), state.cfg, "val", state.dist,
                       on_batch=state.clock.eval_batch_done)
        state.clock.validation_done()
        self.network.set_train(True)
        state.record.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
        self.tracker.log_metrics({"val/loss": val["loss"], "val/top1": val["top1"], "val/top5": val["top5"]},
                                 state.epoch_step(epoch))
        state.improved = val["top1"] > state.best_top1
        state.best_top1 = max(state.best_top1, val["top1"])
        if state.improved:
            state.best_epoch = epoch
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
            meta = state.checkpoint_meta(epoch)
            if state.improved:
                state.best_path = save_checkpoint_atomic(args.train_network, state.ckpt_dir / BEST_CKPT, meta)
            if state.saving(epoch):
                # The history is written before the checkpoint that it goes with, so any complete checkpoint has one.
                write_atomic(state.ckpt_dir / HISTORY_FILE, json.dumps(state.history, indent=1))
                state.last_paths.append(save_checkpoint_atomic(
                    args.train_network, state.ckpt_dir / f"epoch{epoch:04d}.ckpt", meta))
                while len(state.last_paths) > state.cfg.trainer.keep_last:
                    state.last_paths.pop(0).unlink(missing_ok=True)
                # An interrupted state from before this epoch's end is older than this checkpoint now.
                (state.ckpt_dir / INTERRUPT_CKPT).unlink(missing_ok=True)
        log.info("epoch %d/%d: %s; %s", epoch, state.cfg.trainer.epochs, json.dumps(state.record),
                 state.clock.status())


def train_callbacks(state: TrainState, tracker, network: nn.Cell, rates: List[float], val_loader, loaders,
                    bn_loader=None) -> List[Callback]:
    """The callbacks of one training, in the order the module docstring gives and explains."""
    return [StepLogger(state, tracker, rates),
            BatchNormStatistics(state, network, bn_loader, int(state.cfg.trainer.precise_bn_batches)),
            Validation(state, tracker, network, val_loader),
            BadVideoCount(state, tracker, loaders),
            Checkpointing(state)]
