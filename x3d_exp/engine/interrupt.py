"""Stopping a training at a step boundary on SIGINT, SIGTERM or SIGUSR1, with its state saved for a resume.

`StopSignals` turns the three signals into a request that the `StopAtStepBoundary` callback honours after the
step in flight: rank 0 writes `checkpoints/interrupted.ckpt` (weights, optimizer state, the epoch and the step within
it), and the job raises `Interrupted`, which the CLI reports in three lines and exits 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1). A second SIGINT exits at once, without saving.

Data parallel: each rank may get the signal at a slightly different moment (or only some ranks get it), so at every
step boundary the ranks add up their flags (one float all-reduce); every rank sees the same sum, so all of them stop
after the same step. The others then wait for rank 0 to finish writing (a second all-reduce) before they exit: msrun
kills every rank as soon as one exits non-zero.

MindSpore 2.10 installs, at every graph run, a C handler for SIGINT that answers by sending the process SIGTERM
(seen with strace: kill(getpid(), SIGTERM)), so a Ctrl+C would arrive as a SIGTERM. A watcher thread puts Python's
handler back whenever MindSpore has replaced it (it checks every millisecond, with ctypes' sigaction), so the real
signal, and its real name, reach `StopSignals`. A SIGINT in the millisecond after a graph run began still arrives as
SIGTERM (with checks every 20 ms, the tests' Ctrl+C on their short steps did so in one run of the suite). A check
costs a few microseconds.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from mindspore.train import Callback

from x3d_exp.engine.callbacks import HISTORY_FILE, TrainState
from x3d_exp.engine.checkpoint import INTERRUPT_CKPT, save_checkpoint_atomic, write_atomic
from x3d_exp.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_GUARD_PERIOD_S = 0.001
# Room for a `struct sigaction` on any Linux ABI (152 bytes on x86-64 glibc).
_SIGACTION_BYTES = 256


def exit_status(signal_name: str) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signal.Signals[signal_name])


class _SigintGuard(threading.Thread):
    """Puts Python's SIGINT handler back whenever native code has replaced it (see the module docstring)."""

    def __init__(self):
        super().__init__(daemon=True, name="sigint-guard")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._python = ctypes.create_string_buffer(_SIGACTION_BYTES)
        self._libc.sigaction(signal.SIGINT, None, self._python)
        self._done = threading.Event()

    def run(self):
        current = ctypes.create_string_buffer(_SIGACTION_BYTES)
        handler_bytes = ctypes.sizeof(ctypes.c_void_p)
        while not self._done.wait(_GUARD_PERIOD_S):
            self._libc.sigaction(signal.SIGINT, None, current)
            if current.raw[:handler_bytes] != self._python.raw[:handler_bytes]:
                self._libc.sigaction(signal.SIGINT, self._python, None)

    def stop(self):
        self._done.set()


class StopSignals:
    """While open (a context manager, main thread only): SIGINT, SIGTERM and SIGUSR1 raise `Interrupted` where the
    program stands, except while `deferring` (the training loop, whose step boundaries check `requested`): then the
    first signal's name is kept in `requested`, and a second SIGINT exits at once with status 130. On close the
    previous handlers come back."""

    def __init__(self, on_request: Optional[Callable[[int], None]] = None,
                 before_quit: Optional[Callable[[], None]] = None):
        self.requested: Optional[str] = None
        self.deferring = False
        # For a launcher: pass the first signal on (to the ranks), and stop them before a second Ctrl+C quits.
        self._on_request, self._before_quit = on_request, before_quit
        self._previous = {}
        self._guard: Optional[_SigintGuard] = None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.deferring:
            raise Interrupted(name)
        if self.requested is None:
            self.requested = name
            print(f"{name}: stopping after the step in flight to save the training state (Ctrl+C again quits at "
                  f"once)", file=sys.stderr, flush=True)
            if self._on_request is not None:
                self._on_request(signum)
        elif signum == signal.SIGINT:
            print("second SIGINT: quitting without saving", file=sys.stderr, flush=True)
            if self._before_quit is not None:
                self._before_quit()
            os._exit(exit_status("SIGINT"))

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread; an embedding caller keeps its own
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._guard = _SigintGuard()
        self._guard.start()
        return self

    def __exit__(self, *exc):
        if self._guard is not None:
            self._guard.stop()
            self._guard.join()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class StopAtStepBoundary(Callback):
    """After each step (and each epoch's end), stop every rank together when any rank was asked to; rank 0 saves the
    state first. Last in the callback list, so a step's metrics and an epoch's checkpoint are written before it."""

    def __init__(self, state: TrainState, signals: StopSignals):
        super().__init__()
        self.state, self.signals = state, signals

    def _agreed(self) -> Optional[str]:
        """The signal's name when any rank was asked to stop, the same answer on every rank."""
        dist = self.state.dist
        if dist.world_size == 1:
            return self.signals.requested
        # Each rank's request as the signal number in its own slot: every rank learns the same set.
        flags = np.zeros(dist.world_size, np.float32)
        if self.signals.requested:
            flags[dist.rank] = int(signal.Signals[self.signals.requested])
        numbers = [int(n) for n in dist.all_reduce_sum(flags) if n]
        return signal.Signals(numbers[0]).name if numbers else None

    def _stop(self, run_context, name: str, epoch: int, step_in_epoch: int):
        state = self.state
        path = state.ckpt_dir / INTERRUPT_CKPT
        if state.dist.is_main:
            meta = state.checkpoint_meta(epoch, step_in_epoch)
            write_atomic(state.ckpt_dir / HISTORY_FILE, json.dumps(state.history, indent=1))
            save_checkpoint_atomic(run_context.original_args().train_network, path, meta)
        state.dist.all_reduce_sum(np.zeros(1))  # the other ranks exit only once rank 0 has written
        err = Interrupted(name)
        err.checkpoint, err.run_dir = Path(path), state.ckpt_dir.parent
        err.position = (f"epoch {epoch + 1} of {state.cfg.trainer.epochs}, step {step_in_epoch} of "
                        f"{state.steps_per_epoch}" if step_in_epoch else f"the end of epoch {epoch}")
        raise err

    def on_train_step_end(self, run_context):
        if self.state.step_in_epoch == self.state.steps_per_epoch:
            return  # the epoch's end comes next: its validation and checkpoint first, then the check there
        name = self._agreed()
        if name:
            epoch = run_context.original_args().cur_epoch_num - 1
            self._stop(run_context, name, epoch, self.state.step_in_epoch)

    def on_train_epoch_end(self, run_context):
        epoch = run_context.original_args().cur_epoch_num
        if epoch == self.state.cfg.trainer.epochs:
            return  # training is over: the test follows, and a second Ctrl+C still quits at once
        name = self._agreed()
        if name:
            self._stop(run_context, name, epoch, 0)
