"""One MLflow run per run.py job: flattened config, metrics, artifacts, and never left RUNNING.

A run has one owner, the process that created it, which alone closes it FINISHED. An outer process can create
the run and hand its id to the process that trains through `ADOPT_ENV`: the msrun launcher to rank 0, the sweep
job wrapper (x3d_exp.sweeps) to the task. The adopting Tracker logs into that run, marks it FAILED on an error and
otherwise leaves closing it to the owner, which knows whether every other rank or step succeeded too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Optional

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from x3d_exp.config import flatten

log = logging.getLogger("x3d_exp.tracking")
MLFLOW_PARAM_LIMIT = 6000
ADOPT_ENV = "X3D_EXP_MLFLOW_RUN_ID"


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(".")


def display_uri(uri: str) -> str:
    """The store's URI with a relative sqlite path made absolute, so a printed command works anywhere."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """Every param as a string cut to MLflow's limit; log_batch takes at most 100 at a time."""
    items = [(k, str(v)[:MLFLOW_PARAM_LIMIT]) for k, v in params.items()]
    for start in range(0, len(items), 90):
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[start:start + 90]])


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created if missing; parallel sweep jobs may race to create it, and one wins."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def create_run(client: MlflowClient, cfg: DictConfig, run_dir: Path, tags: Optional[dict] = None,
               run_name: Optional[str] = None) -> str:
    """A RUNNING run with the standard tags, the flattened config as params and the `.hydra/` files."""
    from hydra.core.hydra_config import HydraConfig

    overrides = " ".join(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ""
    all_tags = {"task": cfg.task, "model": cfg.model.name, "data": cfg.data.name,
                "hydra_overrides": overrides, "run_dir": str(Path(run_dir).resolve())}
    commit = git_commit()
    if commit:
        all_tags["git_commit"] = commit
    all_tags.update(tags or {})
    run_id = client.create_run(experiment_id(client, cfg.mlflow.experiment_name),
                               run_name=run_name or cfg.mlflow.run_name, tags=all_tags).info.run_id
    log_params(client, run_id, flatten(cfg))
    hydra_dir = _hydra_output_dir() / ".hydra"
    if hydra_dir.is_dir():
        client.log_artifacts(run_id, str(hydra_dir), ".hydra")
    return run_id


class Tracker:
    """Context manager around an MLflow run; the run ends FAILED on any exception, KeyboardInterrupt included.

    `active=False` (ranks other than 0) makes every method a no-op, so the engine needs no rank checks around it.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, resume: bool = False, active: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.active = active
        self.tracking_uri = cfg.mlflow.tracking_uri
        self.client = MlflowClient(self.tracking_uri) if active else None
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
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "resumed", "true")
            return self
        else:
            self.run_id = create_run(self.client, self.cfg, self.run_dir)
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
        from x3d_exp.models.summary import format_summary, trace_network

        if not self.active:
            return
        count = trace_network(network, network.spec.input_shape)
        self.client.log_param(self.run_id, "model_params", count.params)
        self.client.log_param(self.run_id, "model_gmacs", round(count.gmacs, 4))
        summary = self.run_dir / "model_summary.txt"
        summary.write_text(format_summary(self.cfg.model.name, count) + f"\nloader clip sizes: {sizes}\n")
        self.log_artifact(summary, None)
