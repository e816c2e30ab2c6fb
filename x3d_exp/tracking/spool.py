"""The durable spool every MLflow record passes through, so the tracker can never stop or stall training.

A record is one JSON line `{"op": NAME, "args": {...}, "time": SECONDS}` appended to `<run dir>/mlflow_spool.jsonl`
and flushed to disk (fsync) before the logging call returns; a sender (x3d_exp.tracking.delivery) delivers the
records to the tracking store in order. A run dir's spool holds exactly one MLflow run: its first record creates it
(`create_run`), and every later record applies to that run.

Appends take an exclusive lock on the spool file, so several writers may share one spool: under msrun, rank 0
appends to the launcher's spool, and a sweep job's task appends to the spool its sweep wrapper opened.

Reading is tolerant: a last record cut short mid-write (the process was killed) is not read, and the owner cuts it
off before appending again (`repair_tail`); a damaged line is reported in one line and skipped.

Record types (ops) are registered by name; a record's args are JSON values. To add one, write a function
`fn(client, run_id, **args)` (an `mlflow.tracking.MlflowClient`, the run's id, the record's args) and register it
in one line:

    register_op("log_logged_model", log_logged_model)

then append records with `tracker.record("log_logged_model", **json_args)`. An op runs again if the process died
between delivering it and recording the delivery, so it must be idempotent (or check the store first). It raises
`NotYet` when the store is not ready for it yet (the record is retried later); an op that returns a run id (only
`create_run` does) makes that the run of the records after it.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from x3d_exp.errors import DISK_FULL, NoSpace

SPOOL_FILE = "mlflow_spool.jsonl"
# Per tracking store, how far the spool is delivered and the run it created there (x3d_exp.tracking.delivery).
STATE_SUFFIX = ".state.json"
# Held by the one process delivering a spool (its job, or task=sync), so no record is sent twice at once.
LOCK_SUFFIX = ".lock"
# A run's identity before the store gives it an id: a tag set at creation, so creating it again finds it instead.
RUN_KEY_TAG = "x3d.run_key"

OPS: Dict[str, Callable] = {}


class NotYet(Exception):
    """The store is not ready for this record yet (a sweep job's parent run is not created): retry it later."""


def register_op(name: str, fn: Callable) -> Callable:
    """Make `fn(client, run_id, **args)` deliverable as the records named `name`."""
    OPS[name] = fn
    return fn


@dataclass(frozen=True)
class Record:
    op: str
    args: dict
    time: float
    end: int  # byte offset just past this record's line


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def write_atomic_text(path: Path, text: str) -> None:
    """Replace `path` by `text` in one step (a reader sees the old or the new file, never half of one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Spool:
    """One run's spool file: append, read from a byte offset, and the delivery state beside it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.state_path = self.path.with_name(self.path.name + STATE_SUFFIX)
        self.lock_path = self.path.with_name(self.path.name + LOCK_SUFFIX)

    @classmethod
    def in_dir(cls, run_dir: Path) -> "Spool":
        return cls(Path(run_dir) / SPOOL_FILE)

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def append(self, op: str, **args) -> None:
        """Append one record and flush it to disk; returns in about a millisecond, whatever the network does."""
        if op not in OPS:
            raise KeyError(f"no spool op {op!r} registered (x3d_exp.tracking.spool.register_op)")
        line = json.dumps({"op": op, "args": args, "time": time.time()}, allow_nan=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._locked("ab") as f:
                f.write(line.encode())
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            # What was written of the line is cut off by the next reader (repair_tail), like a killed writer's.
            # A training's run dir (its checkpoints/ is there) can be resumed once there is room.
            resumable = (self.run_dir / "checkpoints").is_dir()
            raise NoSpace(f"no space left on the disk of {self.path} to record to MLflow: free space there; the "
                          f"records before this one are kept", run_dir=self.run_dir if resumable else None) from None

    @contextmanager
    def _locked(self, mode: str) -> Iterator:
        with open(self.path, mode) as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield f

    def repair_tail(self) -> None:
        """Cut off a last record cut short mid-write, so the next append starts a line of its own."""
        if not self.path.is_file():
            return
        with self._locked("r+b") as f:
            data = f.read()
            whole = data.rfind(b"\n") + 1
            if whole < len(data):
                f.truncate(whole)
                f.flush()
                os.fsync(f.fileno())
                _warn(f"{self.path}: its last record was cut short mid-write ({len(data) - whole} bytes), dropped")

    def read(self, start: int = 0) -> Tuple[List[Record], List[str]]:
        """The whole records after byte `start`, and one line per damaged record among them."""
        if not self.path.is_file():
            return [], []
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read()
        records, damaged = [], []
        position = start
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break  # still being written, or cut short by a kill: not a record yet
            position += len(raw)
            try:
                item = json.loads(raw)
                records.append(Record(str(item["op"]), dict(item["args"]), float(item["time"]), position))
            except (ValueError, KeyError, TypeError) as err:
                damaged.append(f"{self.path}: damaged record at byte {position - len(raw)} skipped "
                               f"({type(err).__name__}: {str(err)[:100]})")
                records.append(Record("", {}, 0.0, position))  # still counts as read, so it is passed over
        return records, damaged

    def creates_run(self) -> bool:
        """True when the spool already creates its run (a resumed job re-opens that run instead)."""
        return any(r.op == "create_run" for r in self.read()[0])

    def run_key(self) -> Optional[str]:
        """The key of the run this spool creates (the last one, should a run dir be reused), None before its
        creation is spooled."""
        keys = [r.args["key"] for r in self.read()[0] if r.op == "create_run"]
        return keys[-1] if keys else None

    def metric_steps(self) -> Dict[str, int]:
        """Each metric's last step in the spool: what a resumed job has already logged, delivered or not."""
        last: Dict[str, int] = {}
        for record in self.read()[0]:
            if record.op == "log_metrics":
                for key, _value, _ms, step in record.args["metrics"]:
                    last[key] = max(step, last.get(key, -1))
        return last

    def load_state(self, uri: str) -> dict:
        """How far this spool is delivered to the store `uri`: {"delivered": byte offset, "run_id", ...}."""
        try:
            return json.loads(self.state_path.read_text()).get(uri, {})
        except (OSError, ValueError):
            return {}

    def save_state(self, uri: str, state: dict) -> None:
        try:
            states = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            states = {}
        states[uri] = state
        write_atomic_text(self.state_path, json.dumps(states))

    def pending(self, uri: str) -> int:
        """Records not yet delivered to `uri`."""
        return len(self.read(int(self.load_state(uri).get("delivered", 0)))[0])

    def tracking_uri(self) -> Optional[str]:
        """The store the job that wrote this spool logged to (what `task=sync` delivers to by default)."""
        return next((r.args.get("tracking_uri") for r in self.read()[0] if r.op in ("create_run", "reopen_run")),
                    None)
