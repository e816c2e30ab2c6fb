"""Peak memory of a worker process: Linux's VmHWM, reset after warm-up (so each case's peak is its own)."""

from __future__ import annotations

from typing import Optional

_PEAK_START: dict = {}


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    _PEAK_START["rss"] = _status_mb("VmRSS")


def _status_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_mb() -> dict:
    """Peak RSS since the reset, and the RSS at the reset (memory pools kept from earlier cases count in both)."""
    return {"peak": _status_mb("VmHWM"), "start": _PEAK_START.get("rss")}
