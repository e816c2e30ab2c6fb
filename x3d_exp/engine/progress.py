"""Where a run stands: the progress bar, the whole run's elapsed time and an estimate of what is left.

`RunClock` estimates the rest of the run (the training steps left, the validations left and the final test) from
the step and evaluation-batch times measured so far. The first training step of the process and the first batch of
each evaluation graph are left out: they include MindSpore's one-time graph compile. Before the first validation
has been timed, an evaluation batch is estimated from the training step (a forward pass is about a third of a
forward and backward pass), scaled by the eval crop and batch.

On a terminal the progress bar carries the estimate; in a plain log (stderr not a terminal: Slurm, nohup) there is
no bar and no control character, one line per epoch and at most one line per `PLAIN_LOG_INTERVAL_S` inside one.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from omegaconf import DictConfig

PLAIN_LOG_INTERVAL_S = 60.0
# Forward-only time as a fraction of a training step's forward and backward (measured 0.3-0.4 on X3D-XS/M, CPU).
FORWARD_SHARE = 0.35


def progress_enabled(cfg: DictConfig) -> bool:
    """The bar is drawn on a terminal, or when trainer.progress=on; trainer.progress=off never."""
    setting = str(cfg.trainer.progress)
    return sys.stderr.isatty() if setting == "auto" else setting in ("on", "true", "True")


def progress_bar(cfg: DictConfig, total: int, desc: str, initial: int = 0):
    """tqdm with ETA on a terminal; silent in logs unless trainer.progress=on."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not progress_enabled(cfg), leave=False,
                dynamic_ncols=True)


def format_duration(seconds: float) -> str:
    """`41 s`, `2 min 41 s`, `3 h 05 min`: what a person reads."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


class RunClock:
    """Elapsed time of the whole run and the estimate of what is left (see the module docstring).

    `total_steps` training steps, `steps_done` of them already done (a resumed run); `validations` validations of
    `val_batches` batches each, `validations_done` done; a final test of `test_batches`. `eval_cost` scales a
    training step to an evaluation batch until one is measured.
    """

    def __init__(self, total_steps: int, steps_done: int, val_batches: int, validations: int, validations_done: int,
                 test_batches: int, eval_cost: float = FORWARD_SHARE, started: Optional[float] = None):
        self.started = time.time() if started is None else started
        self.total_steps, self.steps_done = total_steps, steps_done
        self.val_batches, self.validations, self.validations_done = val_batches, validations, validations_done
        self.test_batches, self.eval_cost = test_batches, eval_cost
        self._step_times: list = []
        self._eval_times: list = []
        self._first_step_seen = False
        self._first_eval_seen = False

    def step_done(self, seconds: float) -> None:
        self.steps_done += 1
        if self._first_step_seen:
            self._step_times.append(seconds)
        self._first_step_seen = True

    def eval_batch_done(self, seconds: float) -> None:
        if self._first_eval_seen:
            self._eval_times.append(seconds)
        self._first_eval_seen = True

    def validation_done(self) -> None:
        self.validations_done += 1

    def elapsed(self, now: Optional[float] = None) -> float:
        return (time.time() if now is None else now) - self.started

    def remaining(self) -> Optional[float]:
        """Seconds left for training, validations and the test; None until a step has been timed."""
        if not self._step_times:
            return None
        # The recent steps: the rate moves with the load on the machine, and the data cache warms up.
        recent = self._step_times[-50:]
        step = sum(recent) / len(recent)
        batch = sum(self._eval_times) / len(self._eval_times) if self._eval_times else step * self.eval_cost
        evals = max(0, self.validations - self.validations_done) * self.val_batches + self.test_batches
        return max(0, self.total_steps - self.steps_done) * step + evals * batch

    def status(self, now: Optional[float] = None) -> str:
        """`run 2 min 3 s, about 5 min 10 s left` (or `estimating what is left` before the first timed step)."""
        left = self.remaining()
        tail = f"about {format_duration(left)} left" if left is not None else "estimating what is left"
        return f"run {format_duration(self.elapsed(now))}, {tail}"


class PlainLogThrottle:
    """True at most once per `interval` seconds: lines inside an epoch in a plain log."""

    def __init__(self, interval: float = PLAIN_LOG_INTERVAL_S, now: Optional[float] = None):
        self.interval = interval
        self._last = time.time() if now is None else now

    def due(self, now: Optional[float] = None) -> bool:
        now = time.time() if now is None else now
        if now - self._last < self.interval:
            return False
        self._last = now
        return True


def eval_cost(train_batch: int, train_crop: int, eval_batch: int, eval_crop: int) -> float:
    """An evaluation batch's time as a fraction of a training step's, before one is measured: a forward pass of
    `eval_batch` clips at `eval_crop` against a forward and backward pass of `train_batch` at `train_crop`."""
    return FORWARD_SHARE * (eval_batch / train_batch) * (eval_crop / train_crop) ** 2


def summary_line(result: dict, view: Optional[str]) -> str:
    """The line a person reads at the end of a train or test job (the JSON line follows it)."""
    videos = int(result.get("test_videos") or 0)
    top1 = float(result["test_top1"])
    parts = [f"test top-1 {top1:.1%} ({round(top1 * videos)}/{videos} videos), top-5 {float(result['test_top5']):.1%}"]
    if result.get("val_top1") is not None and result.get("best_epoch") is not None:
        parts.append(f"best val top-1 {float(result['val_top1']):.1%} at epoch {result['best_epoch']}")
    parts.append(format_duration(float(result.get("seconds") or 0)))
    if result.get("run_dir"):
        parts.append(f"run dir {result['run_dir']}")
    if view:
        parts.append(f"view: {view}")
    return "; ".join(parts)
