"""The machine a figure was measured on: CPU, cores, ISA, memory, library versions and copy bandwidth."""

from __future__ import annotations

import os
import platform
import threading
import time


def copy_bandwidth_gbs(threads: int, megabytes: int = 128, repeats: int = 5) -> float:
    """Read+write bytes per second of numpy copies, one array pair per thread (numpy drops the GIL)."""
    import numpy as np

    n = megabytes * 2 ** 20 // 4
    pairs = [(np.ones(n, np.float32), np.empty(n, np.float32)) for _ in range(threads)]
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.copyto, args=(dst, src)) for src, dst in pairs]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, threads * 2 * n * 4 / (time.perf_counter() - start) / 1e9)
    return best


def machine_description() -> dict:
    model = platform.processor()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f" {f}" in flags]
    memory_gib = None
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        pass
    return {"cpu": model, "cpus": len(os.sched_getaffinity(0)), "isa": isa,
            "memory_gib": round(memory_gib, 1) if memory_gib else None, "python": platform.python_version(),
            "env": {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                   "X3D_EXP_KERNEL_THREADS") if os.environ.get(k)}}


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("mindspore", "torch", "pytorchvideo", "onnxruntime", "openvino", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
