"""MLflow, behind one context manager per job: `Tracker` (runs in x3d_exp.tracking.runs, multiruns in
x3d_exp.tracking.sweeps, plots in x3d_exp.tracking.plots).

`Tracker` is the one MLflow run of a train or test job: the flattened config, metrics, artifacts, and never left
RUNNING. `mlflow.enabled=false`, like ranks other than 0, makes every method a no-op.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from x3d_exp.config import JobContext
from x3d_exp.env import under_msrun
from x3d_exp.errors import Interrupted
from x3d_exp.tracking.runs import (ADOPT_ENV, close_orphaned_runs, create_run, log_params, owner_tags,
                                   view_command)

__all__ = ["ADOPT_ENV", "Tracker"]


class Tracker:
    """Context manager around an MLflow run; the run ends KILLED when a signal stopped the job (`Interrupted`), FAILED
    on any other exception, KeyboardInterrupt included.

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
        self._monitor = None
        # On a resume, each metric's last step already in the run: the replayed steps are not logged again.
        self._logged_up_to: dict = {}

    def __enter__(self):
        if not self.active:
            return self
        id_file = self.run_dir / "mlflow_run_id"
        adopted = os.environ.get(ADOPT_ENV)
        resumed = self.resume and id_file.is_file()
        if adopted:
            self.run_id, self.owner = adopted, False
        elif resumed:
            # A resumed run continues its own MLflow run: same params, one continuous step axis.
            self.run_id = id_file.read_text().strip()
            run = self.client.get_run(self.run_id)
            close_orphaned_runs(self.client, run.info.experiment_id)
            self.client.update_run(self.run_id, status="RUNNING")
            if "error" in self.client.get_run(self.run_id).data.tags:
                self.client.delete_tag(self.run_id, "error")  # the interruption it recorded is being repaired
            for key, value in {**owner_tags(), "resumed": "true"}.items():
                self.client.set_tag(self.run_id, key, value)
        else:
            self.run_id = create_run(self.client, self.cfg, self.run_dir, self.job)
        if not resumed:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self.run_id)
        if self.resume:
            # The killed process logged steps past its last checkpoint, and training replays them.
            self._logged_up_to = {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                                  for key in self.client.get_run(self.run_id).data.metrics}
        # Under msrun the launcher samples the machine; its ranks (rank 0 adopts the run) do not sample again.
        if self.cfg.mlflow.get("system_metrics") and not under_msrun():
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, float(self.cfg.mlflow.system_metrics_interval),
                                                 resume_logging=resumed, tracking_uri=self.tracking_uri)
            self._monitor.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.active:
            return False
        if self._monitor is not None:
            self._monitor.finish()
        if isinstance(exc, Interrupted):
            # Stopped by its user (a signal), its state saved: MLflow's KILLED, with the signal's name.
            self.client.set_tag(self.run_id, "error", str(exc))
            self.client.set_terminated(self.run_id, "KILLED")
        elif exc_type is not None:
            self.client.set_tag(self.run_id, "error", f"{exc_type.__name__}: {exc}"[:5000])
            self.client.set_terminated(self.run_id, "FAILED")
        elif self.owner:
            self.client.set_terminated(self.run_id, "FINISHED")
            print(f"view the run: {view_command(self.client, self.tracking_uri, self.run_id)}")
        return False

    def log_params(self, params: dict):
        if self.active:
            log_params(self.client, self.run_id, params)

    def log_metrics(self, metrics: dict, step: Optional[int]):
        if not self.active:
            return
        # Final metrics (step None) are always logged: a resumed run's test is a new result.
        replayed = {k for k in metrics if step is not None and step <= self._logged_up_to.get(k, -1)}
        entities = [mlflow.entities.Metric(k, float(v), int(time.time() * 1000), step or 0)
                    for k, v in metrics.items() if v is not None and k not in replayed]
        if entities:
            self.client.log_batch(self.run_id, metrics=entities)

    def log_artifact(self, path, artifact_path: Optional[str]):
        if self.active and path is not None and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_datasets(self, name: str, loaders: dict):
        """Each split's annotation file as an MLflow dataset input (name, file, digest of its contents, the split as
        its context), so the run's Datasets section says what it was trained and tested on."""
        if not self.active:
            return
        inputs = []
        for split, loader in loaders.items():
            path = Path(loader.annotation).resolve()
            # HMDB51's annotation is one file per class: a glob pattern, hashed over its files in order.
            digest = hashlib.sha256()
            for file in sorted(glob.glob(str(path))) or [path]:
                digest.update(Path(file).read_bytes())
            dataset = mlflow.entities.Dataset(name=name, digest=digest.hexdigest()[:16], source_type="local",
                                              source=json.dumps({"uri": str(path)}))
            context = mlflow.entities.InputTag("mlflow.data.context", split)
            inputs.append(mlflow.entities.DatasetInput(dataset, [context]))
        self.client.log_inputs(self.run_id, datasets=inputs)

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
