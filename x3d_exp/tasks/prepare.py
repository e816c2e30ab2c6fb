"""`task=prepare`: a dataset re-encoded to a smaller short side in a new root with the same layout."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm

from x3d_exp.config import JobContext
from x3d_exp.data.prepare import prepare_dataset
from x3d_exp.engine.progress import progress_bar
from x3d_exp.errors import UserError

# Bad files named in the result line; all of them are printed as they are met.
LISTED_BAD = 20


def task_prepare(cfg: DictConfig, job: JobContext = JobContext()) -> dict:
    """prepare.src (default data.root) -> prepare.dst (default <src>_<short side>), videos at prepare.short_side."""
    options = cfg.prepare
    src = options.src or cfg.data.root
    if not src:
        raise UserError("prepare.src: give the dataset root to re-encode (prepare.src=/data/k400 or data.root=...)")
    short_side = int(options.short_side)
    dst = options.dst or f"{str(src).rstrip('/')}_{short_side}"
    started = time.perf_counter()
    counts = prepare_dataset(Path(str(src)), Path(str(dst)), short_side, crf=int(options.crf),
                             preset=str(options.preset), keyint=options.keyint,
                             make_bar=lambda total: progress_bar(cfg, total, f"prepare {Path(src).name} -> "
                                                                 f"{short_side}p"),
                             report=lambda line: tqdm.write(line, file=sys.stderr))
    seconds = time.perf_counter() - started
    print(f"prepare: {counts.encoded} videos re-encoded to short side {short_side}, {counts.copied} files copied, "
          f"{counts.skipped} already done, {len(counts.bad)} bad; {src} -> {dst} in {seconds:.1f} s")
    return {"task": "prepare", "src": str(src), "dst": str(dst), "short_side": short_side, **counts.as_dict(),
            "bad_files": sorted(counts.bad)[:LISTED_BAD], "seconds": round(seconds, 1)}
