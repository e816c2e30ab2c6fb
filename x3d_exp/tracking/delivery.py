"""Delivering a spool (x3d_exp.tracking.spool) to its tracking store: in order, each record once.

`Delivery` applies the records after the spool's delivered offset for one store, and saves the new offset
atomically after each record (consecutive metric records go as one batch). A process killed between applying a
record and saving the offset leaves that record to be applied again: ops are idempotent, and the first metric batch
a new delivery sends is checked against the store first (a metric with the same key, step and timestamp is already
there: skipped), so every metric has one value per step.

`Sender` runs a Delivery in a background thread of the job, with retries and backoff (1 s doubling to 30 s) while
the store is away; `drain` waits a bounded time at the end of the job. `sync` is the same delivery run to the end
by `task=sync`, for what a job could not deliver.

The MLflow client's own HTTP retries would hold the sender for minutes on one request (7 retries with backoff by
default); x3d_exp.env caps them (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT), since the spool
retries without end anyway. The training thread itself never waits on the network.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from x3d_exp.tracking.runs import (RUN_ID_FILE, close_orphaned_runs, display_uri,  # runs registers the ops
                                   view_command)
from x3d_exp.tracking.spool import OPS, NotYet, Record, Spool, _warn, write_atomic_text

log = logging.getLogger("x3d_exp.tracking.delivery")
# Store errors that retrying cannot mend: the record is reported and passed over instead of blocking the rest.
PERMANENT_ERRORS = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
                    "BAD_REQUEST", "PERMISSION_DENIED")
MAX_BACKOFF_S = 30.0
METRICS_PER_BATCH = 1000


def retryable(err: BaseException) -> bool:
    """True for the store being away or busy (connection refused, timeout, 5xx, a locked sqlite file)."""
    if isinstance(err, NotYet):
        return True
    if isinstance(err, MlflowException):
        return err.error_code not in PERMANENT_ERRORS
    import requests

    return isinstance(err, (OSError, requests.RequestException))


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


class Delivery:
    """One spool delivered to one store. `id_file` receives the run's id once the store has created the run."""

    def __init__(self, spool: Spool, tracking_uri: str, id_file: Optional[Path] = None,
                 on_run: Optional[Callable[[str], None]] = None):
        self.spool = spool
        # One spelling per store (a relative sqlite path made absolute), so its delivery state is found again.
        self.tracking_uri = display_uri(tracking_uri)
        self.client = MlflowClient(self.tracking_uri)
        self.id_file = id_file
        self.on_run = on_run
        state = spool.load_state(tracking_uri)
        self.offset = int(state.get("delivered", 0))
        self.run_id: Optional[str] = state.get("run_id")
        # A delivery that died may have applied the record after the offset without saving the offset.
        self.uncertain = True
        # The spool is replayed into a run that already has metrics (the same store under another spelling of its
        # URI, say): every metric batch is checked against the store, not just the first.
        self.replaying = False
        self._reported: set = set()

    def pending(self) -> List[Record]:
        records, damaged = self.spool.read(self.offset)
        for line in damaged:
            if line not in self._reported:
                self._reported.add(line)
                _warn(line)
        return records

    def step(self) -> bool:
        """Deliver the next record (or metric batch); False when nothing is pending. Raises when the store is away
        (the record stays pending); a record the store refuses for good is reported in one line and passed over."""
        records = self.pending()
        if not records:
            return False
        batch = records[:1]
        if batch[0].op == "log_metrics":
            count = len(batch[0].args["metrics"])
            for record in records[1:]:
                count += len(record.args.get("metrics", ()))
                if record.op != "log_metrics" or count > METRICS_PER_BATCH:
                    break
                batch.append(record)
        try:
            self._apply(batch)
        except Exception as err:  # noqa: BLE001 - any failure of one record must not end the delivery
            if retryable(err):
                self.uncertain = True
                raise
            _warn(f"{self.spool.path}: record {batch[0].op!r} refused by {self.tracking_uri}, passed over "
                  f"({first_line(err)})")
        self.offset = batch[-1].end
        self.spool.save_state(self.tracking_uri, {"delivered": self.offset, "run_id": self.run_id})
        return True

    def _apply(self, batch: List[Record]) -> None:
        op = batch[0].op
        if not op:
            return  # a damaged record, already reported
        if op not in OPS:
            raise KeyError(f"no spool op {op!r} registered in this process")
        if op == "create_run":
            self.run_id = OPS[op](self.client, self.run_id, **batch[0].args)
            self.replaying = bool(self.client.get_run(self.run_id).data.metrics)
            if self.id_file is not None:
                write_atomic_text(self.id_file, self.run_id)
            if self.on_run is not None:
                self.on_run(self.run_id)
        elif self.run_id is None:
            raise ValueError("the spool logs into a run it never created")
        elif op == "log_metrics":
            metrics = [m for record in batch for m in record.args["metrics"]]
            if self.uncertain or self.replaying:
                metrics = self._not_delivered(metrics)
            if metrics:
                OPS[op](self.client, self.run_id, metrics=metrics)
        else:
            OPS[op](self.client, self.run_id, **batch[0].args)
        self.uncertain = False

    def _not_delivered(self, metrics: List[list]) -> List[list]:
        """The metrics not already in the store with the same step and timestamp (the same record, delivered)."""
        present = set()
        for key in {m[0] for m in metrics}:
            present.update((key, m.step, m.timestamp) for m in self.client.get_metric_history(self.run_id, key))
        return [m for m in metrics if (m[0], int(m[3]), int(m[2])) not in present]


class DeliveryLock:
    """The one process delivering a spool holds this (an flock, released by the kernel when the process dies)."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self._file = None

    def acquire(self) -> bool:
        self.spool.lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.spool.lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return True

    def holder(self) -> str:
        try:
            return self.spool.lock_path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Sender:
    """A job's background delivery of its spool. `start` returns False (records are then only spooled) when another
    process is already delivering this spool."""

    def __init__(self, spool: Spool, tracking_uri: str, id_file: Optional[Path] = None,
                 on_run: Optional[Callable[[str], None]] = None):
        self.spool = spool
        self.lock = DeliveryLock(spool)
        self.delivery = Delivery(spool, tracking_uri, id_file, on_run)
        self._wake = threading.Event()  # new records: deliver now rather than at the next poll
        self._retry = threading.Event()  # the end of the job: retry now rather than after the backoff
        self._stop = threading.Event()
        self._draining = False
        self._thread: Optional[threading.Thread] = None
        self.last_error: Optional[str] = None

    @property
    def run_id(self) -> Optional[str]:
        return self.delivery.run_id

    def start(self) -> bool:
        if not self.lock.acquire():
            _warn(f"{self.spool.path} is being delivered by process {self.lock.holder()}: this job only spools")
            return False
        self.spool.repair_tail()
        self._thread = threading.Thread(target=self._loop, name="mlflow-spool-sender", daemon=True)
        self._thread.start()
        return True

    def notify(self) -> None:
        """A record was appended: deliver it now rather than at the next poll."""
        self._wake.set()

    def _loop(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                progressed = self.delivery.step()
            except Exception as err:  # noqa: BLE001 - retryable by Delivery.step's contract
                if self.last_error is None:
                    log.warning("MLflow store %s unreachable (%s): records are spooled in %s and sent when it "
                                "answers", self.delivery.tracking_uri, first_line(err), self.spool.path)
                self.last_error = first_line(err)
                # New records do not cut the backoff short: each would cost a request to a store that is away.
                self._retry.wait(min(backoff, 2.0) if self._draining else backoff)
                self._retry.clear()
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            if self.last_error is not None:
                log.warning("MLflow store %s answers again: delivering the spool", self.delivery.tracking_uri)
                self.last_error = None
            backoff = 1.0
            if not progressed:
                # Polls too: another process (msrun's rank 0) may append to this spool.
                self._wake.wait(0.5)
                self._wake.clear()

    def pending(self) -> int:
        return len(self.delivery.pending())

    def drain(self, timeout: float) -> int:
        """Wait until every record is delivered, at most `timeout` seconds; returns how many are still pending."""
        if self._thread is None:
            return self.pending()
        self._draining = True
        self._retry.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        while (left := self.pending()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def stop(self) -> None:
        """Stop delivering. A request in flight is left to finish or die with the process; the lock stays held
        until then, so no other process delivers the same record meanwhile."""
        self._stop.set()
        self._retry.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            if not self._thread.is_alive():
                self.lock.release()


def sync_command(path: Path) -> str:
    return f"python run.py task=sync sync.path={Path(path).resolve()}"


def finish_delivery(sender: Sender, timeout: float, announce: bool) -> int:
    """The end of a job's delivery: wait up to `timeout` s, stop the sender; returns the records left. Prints one
    warning line with the sync command when some are left, else (with `announce`) how to view the run."""
    left = sender.drain(timeout)
    sender.stop()
    uri = sender.delivery.tracking_uri
    if left:
        _warn(f"MLflow at {uri} did not answer within mlflow.drain_timeout={timeout:g}s: {left} records wait in "
              f"{sender.spool.path}; deliver them with: {sync_command(sender.spool.run_dir)}")
    elif announce and sender.run_id:
        try:
            print(f"view the run: {view_command(sender.delivery.client, uri, sender.run_id)}", flush=True)
        except Exception as err:  # noqa: BLE001 - the store went away again just now; the run is delivered
            log.warning("the run %s is delivered; its link is not (%s)", sender.run_id, first_line(err))
    return left


def sync(spool: Spool, tracking_uri: str, timeout: float) -> tuple:
    """Deliver a spool to the end (task=sync); returns (records delivered, records still pending, run id). A run
    whose job was killed (no closing record, its process gone) is closed KILLED by the orphan rule."""
    lock = DeliveryLock(spool)
    if not lock.acquire():
        raise RuntimeError(f"{spool.path} is being delivered by process {lock.holder()}")
    try:
        spool.repair_tail()
        delivery = Delivery(spool, tracking_uri, spool.run_dir / RUN_ID_FILE)
        before, backoff = len(delivery.pending()), 1.0
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not delivery.step():
                    break
            except Exception as err:  # noqa: BLE001 - retryable by Delivery.step's contract
                if time.monotonic() + backoff > deadline:
                    _warn(f"{spool.path}: {tracking_uri} unreachable ({first_line(err)})")
                    break
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        left = len(delivery.pending())
        if not left and delivery.run_id:
            close_orphaned_runs(delivery.client, delivery.client.get_run(delivery.run_id).info.experiment_id)
        return before - left, left, delivery.run_id
    finally:
        lock.release()
