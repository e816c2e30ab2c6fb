"""MLflow, behind one context manager per job: `Tracker` (runs in x3d_exp.tracking.runs, multiruns in
x3d_exp.tracking.sweeps, plots in x3d_exp.tracking.plots).

`Tracker` is the one MLflow run of a train or test job: the flattened config, metrics, artifacts, and never left
RUNNING. `mlflow.enabled=false`, like ranks other than 0, makes every method a no-op.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from x3d_exp.config import JobContext
from x3d_exp.tracking.runs import ADOPT_ENV, close_orphaned_runs, create_run, display_uri, log_params, owner_tags

__all__ = ["ADOPT_ENV", "Tracker"]


class Tracker:
    """Context manager around an MLflow run; the run ends FAILED on any exception, KeyboardInterrupt included.

    `active=False` (ranks other than 0) makes every method a no-op, so the engine needs no rank checks around it.
    The owner of a run that ends well prints how to view it.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, job: JobContext, resume: bool = False, active: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.job = job
        self.resume = resume
        self.active = active and bool(cfg.mlflow.enabled)
        self.tracking_uri = cfg.mlflow.tracking_uri
        self.client = MlflowClient(self.tracking_uri) if self.active else None
        self.run_id: Optional[str] = None
        self.owner = True

    @property
    def display_uri(self) -> str:
        return display_uri(self.tracking_uri)

    def __enter__(self):
        if not self.active:
            return self
        id_file = self.run_dir / "mlflow_run_id"
        adopted = os.environ.get(ADOPT_ENV)
        if adopted:
            self.run_id, self.owner = adopted, False
        elif self.resume and id_file.is_file():
            # A resumed run continues its own MLflow run: same params, one continuous step axis.
            self.run_id = id_file.read_text().strip()
            run = self.client.get_run(self.run_id)
            close_orphaned_runs(self.client, run.info.experiment_id)
            self.client.update_run(self.run_id, status="RUNNING")
            if "error" in self.client.get_run(self.run_id).data.tags:
                self.client.delete_tag(self.run_id, "error")  # the interruption it recorded is being repaired
            for key, value in {**owner_tags(), "resumed": "true"}.items():
                self.client.set_tag(self.run_id, key, value)
            return self
        else:
            self.run_id = create_run(self.client, self.cfg, self.run_dir, self.job)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id)
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.active:
            return False
        if exc_type is not None:
            self.client.set_tag(self.run_id, "error", f"{exc_type.__name__}: {exc}"[:5000])
            self.client.set_terminated(self.run_id, "FAILED")
        elif self.owner:
            self.client.set_terminated(self.run_id, "FINISHED")
            print(f"view the run: mlflow ui --backend-store-uri {self.display_uri}")
        return False

    def log_params(self, params: dict):
        if self.active:
            log_params(self.client, self.run_id, params)

    def log_metrics(self, metrics: dict, step: Optional[int]):
        if not self.active:
            return
        entities = [mlflow.entities.Metric(k, float(v), int(time.time() * 1000), step or 0)
                    for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=entities)

    def log_artifact(self, path, artifact_path: Optional[str]):
        if self.active and path is not None and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, network, sizes: dict):
        if not self.active:
            return
        from x3d_exp.models.summary import format_summary, trace_network

        count = trace_network(network, network.spec.input_shape)
        self.client.log_param(self.run_id, "model_params", count.params)
        self.client.log_param(self.run_id, "model_gmacs", round(count.gmacs, 4))
        summary = self.run_dir / "model_summary.txt"
        summary.write_text(format_summary(self.cfg.model.name, count) + f"\nloader clip sizes: {sizes}\n")
        self.log_artifact(summary, None)
