"""The memory a training will need, estimated before its first step, and the memory the machine has free.

estimate = parameters + gradients + optimizer state (4 bytes each per parameter; SGD keeps two copies, its accum and
stat, and AdamW two moments) + activations kept for the backward pass + the runtime.

- Activations: the elements of every conv and linear output of one clip at the training clip (traced from the built
  network, models.summary.trace_network), times the batch, times `ACTIVATION_COPIES`: besides each conv's output the
  backward pass keeps its BatchNorm's output and its activation's, and MindSpore's CPU kernels allocate their
  gradients alongside.
- Runtime: what a process holds besides: Python, MindSpore, the data pipeline's queues, MLflow, and the compiled
  graphs with their kernels, which grow with the network's layer count (`RUNTIME_BYTES` + `RUNTIME_BYTES_PER_LAYER`
  per conv and linear layer).

The constants were fitted (least squares of the relative error) to the peak RSS of X3D-XS and X3D-M at batch 16 and
X3D-L at batches 4 and 16 on the CPU (docs/training.md gives the figures and the error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from x3d_exp.models.summary import trace_network

BYTES = 4  # float32
# Per parameter, both optimizers keep two: SGD its accum and stat, AdamW its two moments (adam_m, adam_v).
OPTIMIZER_COPIES = 2
ACTIVATION_COPIES = 3.1
RUNTIME_BYTES = 0.96e9
RUNTIME_BYTES_PER_LAYER = 7.4e6
# Rule of thumb for the one-time graph compile on the CPU: seconds per conv and linear layer of the network, from
# X3D-L's 27 s (232 layers) on this 2-core machine unloaded. A loaded machine takes several times longer.
COMPILE_S_PER_LAYER = 0.1
COMPILE_S_BASE = 3.0


@dataclass(frozen=True)
class MemoryEstimate:
    params: float
    optimizer: float
    activations: float
    runtime: float
    batch_size: int

    @property
    def total(self) -> float:
        return self.params + self.optimizer + self.activations + self.runtime

    def per_clip(self) -> float:
        return self.activations / max(1, self.batch_size)

    def batch_that_fits(self, available: float) -> int:
        """The largest batch whose estimate fits in `available` bytes (0 if not even one clip fits)."""
        fixed = self.params + self.optimizer + self.runtime
        return max(0, int((available - fixed) // max(1.0, self.per_clip())))

    def describe(self) -> str:
        return (f"about {size_text(self.total)} (parameters and gradients {size_text(self.params)}, optimizer "
                f"{size_text(self.optimizer)}, activations {size_text(self.activations)} at batch {self.batch_size}, "
                f"runtime {size_text(self.runtime)})")


def size_text(size: float) -> str:
    """Bytes as a person reads them: 2.2 GB, 15 MB."""
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def estimate_memory(network, clip: Sequence[int], batch_size: int, optimizer: str) -> MemoryEstimate:
    """The training's estimate for `batch_size` clips of shape `clip` (C, T, H, W)."""
    count = trace_network(network, clip)
    params = sum(int(p.size) for p in network.get_parameters())
    activation_elements = sum(_elements(layer.out_shape) for layer in count.layers)
    return MemoryEstimate(params=2 * BYTES * params, optimizer=OPTIMIZER_COPIES * BYTES * params,
                          activations=ACTIVATION_COPIES * BYTES * activation_elements * batch_size,
                          runtime=RUNTIME_BYTES + RUNTIME_BYTES_PER_LAYER * len(count.layers), batch_size=batch_size)


def compile_seconds(network, clip: Sequence[int]) -> float:
    """The one-time graph compile's expected seconds on the CPU, from the network's layer count."""
    return COMPILE_S_BASE + COMPILE_S_PER_LAYER * len(trace_network(network, clip).layers)


def _elements(shape) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


def available_memory(device: str) -> Optional[float]:
    """Bytes free for the run: MemAvailable of the host on the CPU, the device's free memory on a GPU (through
    MindSpore's runtime; written, not run here, as this machine has no GPU); None when unknown."""
    if device == "GPU":
        try:
            import mindspore as ms

            stats = ms.runtime.memory_stats()
            return float(stats["total_reserved_memory"] - stats["total_allocated_memory"]) or None
        except Exception:  # noqa: BLE001 - no GPU build, or an API that moved: say nothing rather than guess
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        return None


def memory_warning(estimate: MemoryEstimate, available: Optional[float]) -> Optional[str]:
    """One line when the estimate exceeds what is free, naming a batch size that fits; None otherwise."""
    if available is None or estimate.total <= available:
        return None
    fits = estimate.batch_that_fits(available)
    advice = (f"data.batch_size={fits} fits" if fits >= 1
              else "not even data.batch_size=1 fits: try a smaller model or clip")
    return f"this run needs {size_text(estimate.total)} but only {size_text(available)} is free: {advice}"


__all__ = ["MemoryEstimate", "available_memory", "compile_seconds", "estimate_memory", "memory_warning", "size_text"]
