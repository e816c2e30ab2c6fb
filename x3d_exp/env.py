"""Every contract with the process environment, in one place. Imports nothing but the standard library.

`prepare_process` must run before MindSpore runs its first CPU kernel. `ONEDNN_MAX_CPU_ISA`: oneDNN's AVX-512
code paths run every Conv3d with a kernel larger than 1 (X3D's stem 1x3x3 conv among them) as its reference
implementation, about 100x slower than its AVX2 GEMM path on AMD EPYC (docs/performance.md). oneDNN reads the
variable when it creates its first primitive, so setting it in `os.environ`, even after `import mindspore`, is
enough. A value the user exported wins.

`OMP_WAIT_POLICY` is left alone: our C++ kernels (x3d_exp.kernels) use their own sleeping thread pool instead of
OpenMP, whose spinning workers starved MindSpore's thread pool unless the variable was exported before Python
started.

MLflow's HTTP client retries a request 7 times with backoff by default, minutes on one call; the spool's sender
(x3d_exp.tracking.delivery) retries without end itself, so its requests are capped (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
MLFLOW_HTTP_REQUEST_TIMEOUT), unless the user exported them.

`ADOPTED_RUN_ENV` carries, across msrun's process boundary only, the spool of the MLflow run the launcher opened
for rank 0; the CLI reads it once into its JobContext (`adopted_run`).
"""

import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

DEFAULT_ONEDNN_ISA = "AVX2"
MLFLOW_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                      # A job that saves or loads an MLflow model would otherwise draw tqdm bars into a plain log.
                      "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
ADOPTED_RUN_ENV = "X3D_EXP_MLFLOW_SPOOL"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def configure_environment() -> None:
    """Cap oneDNN at AVX2, quieten MindSpore's C++ logging and cap MLflow's HTTP retries (each unless already set).
    Runs on `import x3d_exp`, so a library user gets the same fast convolutions as run.py; says once, with the fix,
    when MindSpore came first."""
    if "ONEDNN_MAX_CPU_ISA" not in os.environ and "mindspore" in sys.modules:
        warnings.warn("mindspore was imported before x3d_exp: if it has already run a convolution, oneDNN ignores "
                      f"ONEDNN_MAX_CPU_ISA={DEFAULT_ONEDNN_ISA} and X3D's convolutions can run ~100x slower; import "
                      f"x3d_exp first, or export ONEDNN_MAX_CPU_ISA={DEFAULT_ONEDNN_ISA}", RuntimeWarning,
                      stacklevel=3)
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", DEFAULT_ONEDNN_ISA)
    # MindSpore's C++ logging otherwise floods stderr with warnings on every run.
    os.environ.setdefault("GLOG_v", "3")
    for name, value in MLFLOW_HTTP_LIMITS.items():
        os.environ.setdefault(name, value)


def prepare_process() -> None:
    """`configure_environment`, and SIGTERM made an interrupt: for processes x3d_exp owns (run.py, its ranks)."""
    configure_environment()
    # MindSpore answers Ctrl+C by sending the process SIGTERM, which kills Python without unwinding; turning it
    # into KeyboardInterrupt lets the MLflow run be closed as FAILED (msrun and Slurm stop jobs with SIGTERM too).
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def cache_root() -> Path:
    """Where generated data and compiled kernels are kept: X3D_EXP_CACHE, else $XDG_CACHE_HOME/x3d_exp, else
    ~/.cache/x3d_exp. The config resolver ${x3d_cache:NAME} uses it too, so YAML and code agree."""
    root = os.environ.get("X3D_EXP_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "x3d_exp"


def under_msrun() -> bool:
    """True in the processes msrun starts (its ranks and its scheduler)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def adopted_run() -> Optional[Path]:
    """In an msrun rank: the spool of the MLflow run its launcher opened (None elsewhere)."""
    value = os.environ.get(ADOPTED_RUN_ENV)
    return Path(value) if value and under_msrun() else None
