"""Compile the C++ kernels once per machine and keep the shared library in a cache.

The library is built with the system compiler on first use, for this CPU
(`-march=native`), and stored under a name that hashes everything that could
change the binary: sources, compiler and its version, flags and the CPU's
feature flags. Builds go to a temporary file that is renamed into place, so
parallel processes (msrun ranks, pytest workers) may build at once and each
sees either no library or a complete one.

Environment:
- `X3D_EXP_CACHE`: cache root (default `$XDG_CACHE_HOME/x3d_exp` or `~/.cache/x3d_exp`).
- `CXX`: the compiler (default `g++`, then `c++`).
- `X3D_EXP_CXXFLAGS`: replaces the optimisation flags (default `-O3 -march=native`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from x3d_exp.env import cache_root

KERNEL_DIR = Path(__file__).parent
SOURCES = (KERNEL_DIR / "channelwise_conv3d.cc", KERNEL_DIR / "fused_ops.cc")
# Part of the cache key (included by the sources), not compiled on its own.
HEADERS = (KERNEL_DIR / "common.h",)
LIBRARY_NAME = "x3d_kernels"
DEFAULT_FLAGS = ("-O3", "-march=native")
# Needed for any build, whatever the user's flags.
BASE_FLAGS = ("-std=c++17", "-shared", "-fPIC", "-pthread")
COMPILE_TIMEOUT_S = 300

log = logging.getLogger("x3d_exp.kernels")


class KernelBuildError(RuntimeError):
    """The kernel library could not be compiled or loaded."""


def cache_dir() -> Path:
    return cache_root() / "kernels"


def find_compiler() -> str:
    requested = os.environ.get("CXX")
    candidates = [requested] if requested else ["g++", "c++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise KernelBuildError(f"no C++ compiler found (tried {', '.join(candidates)}; set CXX)")


def compile_flags() -> list:
    custom = os.environ.get("X3D_EXP_CXXFLAGS")
    return list(BASE_FLAGS) + (shlex.split(custom) if custom is not None else list(DEFAULT_FLAGS))


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler_version(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelBuildError(f"cannot run {compiler}: {err}") from err
    if out.returncode != 0:
        raise KernelBuildError(f"{compiler} --version failed: {out.stderr.strip()[:200]}")
    return out.stdout.strip()


def library_path() -> Path:
    """Where the library for this source, compiler, flags and CPU lives (built or not)."""
    compiler = find_compiler()
    key = hashlib.sha256()
    sources = [path.read_bytes() for path in SOURCES + HEADERS]
    for part in (*sources, compiler.encode(), _compiler_version(compiler).encode(),
                 " ".join(compile_flags()).encode(), _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"{LIBRARY_NAME}-{key.hexdigest()[:20]}.so"


def build_library() -> Path:
    """Path of the compiled kernel library, compiling it if this machine has no cached copy."""
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    cmd = [find_compiler(), *compile_flags(), *map(str, SOURCES), "-o", temp]
    # First use on a machine: say why the job pauses (tens of seconds at -O3) before it does.
    log.info("compiling the C++ CPU kernels for this machine, one time, into %s", target.parent)
    started = time.time()
    try:
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as err:
            raise KernelBuildError(f"{shlex.join(cmd)}: {err}") from err
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
            first = errors[0].strip() if errors else f"exit status {result.returncode}"
            # The first line is what the one-line fallback warning shows.
            raise KernelBuildError(f"compiling the {LIBRARY_NAME} library failed: {first}\n{shlex.join(cmd)}\n"
                                   f"{result.stderr}")
        os.replace(temp, target)
        log.info("compiled the C++ CPU kernels in %.0f s", time.time() - started)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return target
