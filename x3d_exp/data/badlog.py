"""The record of bad videos, shared by the loader's worker processes through one locked file.

Forked workers cannot update the parent's memory, so each bad file is appended to a JSON-lines file under an
exclusive `flock`: the check-and-append is atomic across processes, which is what makes the warning and the
count happen once per file whichever worker meets it first.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from typing import Dict, Set

log = logging.getLogger("x3d_exp.data")


class BadVideoLog:
    def __init__(self, path: str):
        self.path = path
        # Bad files this process already knows of, so later epochs skip them without touching the disk.
        self._known: Set[str] = set()

    def __contains__(self, video: str) -> bool:
        return video in self._known

    def record(self, video: str, reason: str) -> None:
        """Remember `video` as bad; the first process to record it logs the warning."""
        if video in self._known:
            return
        self._known.add(video)
        with open(self.path, "a+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.seek(0)
                if video in _parse(f.read()):
                    return
                f.write(json.dumps({"path": video, "reason": reason}) + "\n")
                f.flush()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        log.warning("bad video skipped: %s (%s)", video, reason)

    def read(self) -> Dict[str, str]:
        if not os.path.exists(self.path):
            return {}
        with open(self.path, encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            try:
                return _parse(f.read())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _parse(text: str) -> Dict[str, str]:
    entries = {}
    for line in text.splitlines():
        if line.strip():
            item = json.loads(line)
            entries.setdefault(item["path"], item["reason"])
    return entries
