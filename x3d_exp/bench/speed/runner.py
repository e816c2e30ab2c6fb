"""What the driver asks of either framework's runner, inside its worker process."""

from __future__ import annotations

import time
from typing import Callable, Optional

from x3d_exp.bench.speed.cases import WARMUP
from x3d_exp.bench.speed.memory import peak_mb, reset_peak


class StepRunner:
    """A runner's `setup(variant, case)` builds `self.step` for the case and calls `warm_up`; the driver then times
    one step at a time and reads the peak memory of the timed steps."""

    step: Optional[Callable[[], object]] = None

    def warm_up(self) -> None:
        """Untimed steps (MindSpore compiles its graph in the first), then the peak-memory reset."""
        for _ in range(WARMUP):
            self.step()
        reset_peak()

    def time_one(self) -> float:
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start

    def output(self):
        """The current case's output, as numpy (the runtimes' logits are compared on the same input)."""
        import numpy as np

        return np.asarray(self.step())

    def peak(self) -> dict:
        return peak_mb()
