"""MLflow, behind one context manager per job: `Tracker` (runs in x3d_exp.tracking.runs, multiruns in
x3d_exp.tracking.sweeps, plots in x3d_exp.tracking.plots).

`Tracker` is the one MLflow run of a train or test job: the flattened config, metrics, artifacts, and never left
RUNNING. Every record goes through the run dir's spool (x3d_exp.tracking.spool): a logging call appends a line and
returns in about a millisecond, and the owner's sender thread (x3d_exp.tracking.delivery) delivers it, so the
tracking store being away never stops or stalls training (docs/tracking.md). `mlflow.enabled=false`, like ranks
other than 0, makes every method a no-op.
"""

from __future__ import annotations

import glob
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from x3d_exp.config import FACTORS, JobContext
from x3d_exp.env import under_msrun
from x3d_exp.errors import Interrupted, NoSpace
from x3d_exp.tracking.delivery import Sender, finish_delivery
from x3d_exp.tracking import models  # noqa: F401  (registers the log_trained_model record)
from x3d_exp.tracking.runs import RUN_ID_FILE, display_uri, git_commit, owner_tags, spool_new_run
from x3d_exp.tracking.spool import Spool

__all__ = ["Tracker", "dataset_digest"]


def dataset_digest(annotation: Path, root: Path) -> str:
    """16 hex digits of the data root's path, the annotation's contents (HMDB51's, one file per class, is a glob
    pattern: its files in order) and, for a generated set, its manifest (the generator's settings)."""
    from x3d_exp.data.synthetic import MANIFEST

    digest = hashlib.sha256(str(root).encode())
    files = sorted(glob.glob(str(annotation))) or [annotation]
    if (root / MANIFEST).is_file():
        files.append(root / MANIFEST)
    for file in files:
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()[:16]


class Tracker:
    """Context manager around an MLflow run. It ends KILLED when the job was stopped by a signal (`Interrupted`),
    FAILED on any other exception (KeyboardInterrupt included), and otherwise FINISHED by its owner.

    `job.adopted_run` (a spool an outer process opened: the sweep job wrapper, the msrun launcher) makes this an
    adopting tracker: it appends to that spool and leaves creating, delivering and closing the run to the owner.
    `active=False` (ranks other than 0) makes every method a no-op, so the engine needs no rank checks around it.
    At the end the owner waits up to `mlflow.drain_timeout` for the delivery, then prints how to view the run (unless
    `print_link=False`: train and test jobs end with a line of their own that holds the link), or one warning line
    with the command that delivers the rest.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, job: JobContext, resume: bool = False, active: bool = True,
                 print_link: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.job = job
        self.resume = resume
        self.print_link = print_link
        self.active = active and bool(cfg.mlflow.enabled)
        self.tracking_uri = str(cfg.mlflow.tracking_uri)
        self.owner = job.adopted_run is None
        self.spool = Spool(job.adopted_run) if job.adopted_run else Spool.in_dir(self.run_dir)
        self.sender: Optional[Sender] = None
        self._monitor = None
        self._monitor_lock = threading.Lock()
        self._closed = False
        # On a resume, each metric's last step the killed process spooled: the replayed steps are not logged again.
        self._logged_up_to: dict = {}

    @property
    def run_id(self) -> Optional[str]:
        """The run's id once the store has created it (None while the store has been away since the start)."""
        if self.sender is not None:
            return self.sender.run_id
        id_file = self.spool.run_dir / RUN_ID_FILE
        return id_file.read_text().strip() if self.active and id_file.is_file() else None

    def __enter__(self):
        if not self.active:
            return self
        if self.resume:
            self._logged_up_to = self.spool.metric_steps()
        if self.owner:
            self.sender = Sender(self.spool, self.tracking_uri, self.run_dir / RUN_ID_FILE, self._start_monitor)
            self.sender.start()
            if self.resume and self.spool.creates_run():
                # A resumed run continues its own MLflow run: same params, one continuous step axis.
                self.record("reopen_run", tags={**owner_tags(), "resumed": "true"},
                            tracking_uri=display_uri(self.tracking_uri))
            else:
                spool_new_run(self.spool, self.cfg, self.run_dir, self.job)
        if self.run_id:
            self._start_monitor(self.run_id)
        return self

    def _start_monitor(self, run_id: str) -> None:
        """MLflow's own system-metrics sampler, once the run exists. It logs directly, not through the spool: while
        the store is away its samples are lost. Under msrun the launcher samples the machine; its ranks do not."""
        if not self.cfg.mlflow.get("system_metrics") or under_msrun():
            return
        with self._monitor_lock:
            if self._monitor is not None or self._closed:
                return
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, float(self.cfg.mlflow.system_metrics_interval),
                                                 resume_logging=self.resume, tracking_uri=self.tracking_uri)
            self._monitor.start()

    def __exit__(self, exc_type, exc, tb):
        if not self.active:
            return False
        with self._monitor_lock:
            self._closed = True  # a run the sender creates from now on gets no sampler
            if self._monitor is not None:
                self._monitor.finish()
        try:
            if exc_type is not None and issubclass(exc_type, Interrupted):
                self.record("terminate", status="KILLED", error=str(exc))
            elif exc_type is not None:
                self.record("terminate", status="FAILED", error=f"{exc_type.__name__}: {exc}")
            elif self.owner:
                self.record("terminate", status="FINISHED")
        except NoSpace as err:
            # The disk is full. The job's own error, if it has one, is what the user reads; the run is closed KILLED
            # by task=sync or by the next run in the experiment (docs/tracking.md).
            unrecorded = err
        else:
            unrecorded = None
        if self.sender is not None:
            finish_delivery(self.sender, float(self.cfg.mlflow.drain_timeout),
                            announce=exc_type is None and unrecorded is None and self.print_link)
        if unrecorded is not None and exc_type is None:
            raise unrecorded
        return False

    def record(self, op: str, **args) -> None:
        """Append one record (an op registered in x3d_exp.tracking.spool) for the sender to deliver."""
        if not self.active:
            return
        self.spool.append(op, **args)
        if self.sender is not None:
            self.sender.notify()

    def log_params(self, params: dict):
        self.record("log_params", params={k: None if v is None else str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict, step: Optional[int]):
        if not self.active:
            return
        # Final metrics (step None) are always logged: a resumed run's test is a new result.
        replayed = {k for k in metrics if step is not None and step <= self._logged_up_to.get(k, -1)}
        now = int(time.time() * 1000)
        rows = [[k, float(v), now, step or 0] for k, v in metrics.items() if v is not None and k not in replayed]
        if rows:
            self.record("log_metrics", metrics=rows)

    def log_artifact(self, path, artifact_path: Optional[str]):
        if self.active and path is not None and Path(path).exists():
            self.record("log_artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_datasets(self, name: str, loaders: dict):
        """Each split's annotation file as an MLflow dataset input (name, file, the split as its context), so the
        run's Datasets section says what it was trained and tested on. The digest covers the annotation's contents,
        the data root its paths resolve in and, for a generated set, its manifest (the generator's settings): two
        sets with the same file names but other videos differ."""
        if not self.active:
            return
        datasets = []
        for split, loader in loaders.items():
            path, root = Path(loader.annotation).resolve(), Path(loader.root).resolve()
            datasets.append({"name": name, "digest": dataset_digest(path, root), "source_type": "local",
                             "source": json.dumps({"uri": str(path), "root": str(root)}), "context": split})
        self.record("log_inputs", datasets=datasets)

    def log_model(self, model_name: str, trained, nominal, sizes: dict):
        """Size and cost (models.summary.NetworkCount) at the clip trained on and at the model's own input size."""
        if not self.active:
            return
        from x3d_exp.models.summary import format_summary

        self.log_params({"model_params": trained.params, "model_gmacs": round(trained.gmacs, 4),
                         "model_gmacs_nominal": round(nominal.gmacs, 4),
                         "clip": "x".join(str(d) for d in trained.input_shape),
                         "clip_sampling_rate": sizes["sampling_rate"]})
        summary = self.run_dir / "model_summary.txt"
        summary.write_text(format_summary(model_name, nominal) + f"\n\nat the trained clip {list(trained.input_shape)}"
                           f": {trained.gmacs:.4f} GMACs\nloader clip sizes: {sizes}\n")
        self.log_artifact(summary, None)

    def log_trained_model(self, model_dir: Path, metrics: dict) -> None:
        """The model the job saved at `model_dir` (tracking.models.save_trained_model), to become the run's
        LoggedModel with `metrics` linked to it and, with mlflow.registered_model, registered: a spooled record like
        the others (tracking.models delivers it and leaves its ids beside the model: tracking.models.delivered_model).
        """
        if not self.active:
            return
        tags = {"model": str(self.cfg.model.name), "data": str(self.cfg.data.name)}
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        self.record("log_trained_model", model_dir=str(Path(model_dir).resolve()), name=str(self.cfg.model.name),
                    metrics={k: float(v) for k, v in metrics.items() if v is not None},
                    registered_model=self.cfg.mlflow.registered_model, tags=tags,
                    params={key: float(self.cfg.model[key]) for key in FACTORS})
