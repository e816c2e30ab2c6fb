"""One MLflow run per run.py job: flattened config, metrics, artifacts, and never left RUNNING."""

from __future__ import annotations

import logging
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


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(".")


class Tracker:
    """Context manager around an MLflow run; the run ends FAILED on any exception, KeyboardInterrupt included."""

    def __init__(self, cfg: DictConfig, run_dir: Path, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.tracking_uri = cfg.mlflow.tracking_uri
        self.client = MlflowClient(self.tracking_uri)
        self.run_id: Optional[str] = None

    @property
    def display_uri(self) -> str:
        """The store's URI with a relative sqlite path made absolute, so the printed command works anywhere."""
        prefix = "sqlite:///"
        if self.tracking_uri.startswith(prefix) and not self.tracking_uri.startswith(prefix + "/"):
            return prefix + str(Path(self.tracking_uri[len(prefix):]).resolve())
        return self.tracking_uri

    def __enter__(self):
        id_file = self.run_dir / "mlflow_run_id"
        if self.resume and id_file.is_file():
            # A resumed run continues its own MLflow run: same params, one continuous step axis.
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "resumed", "true")
            return self
        self.run_id = self._create_run()
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id)
        params = {k: str(v)[:MLFLOW_PARAM_LIMIT] for k, v in flatten(self.cfg).items()}
        items = list(params.items())
        for start in range(0, len(items), 90):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[start:start + 90]])
        hydra_dir = _hydra_output_dir() / ".hydra"
        if hydra_dir.is_dir():
            self.client.log_artifacts(self.run_id, str(hydra_dir), ".hydra")
        return self

    def _create_run(self) -> str:
        from hydra.core.hydra_config import HydraConfig

        experiment = self.client.get_experiment_by_name(self.cfg.mlflow.experiment_name)
        experiment_id = (experiment.experiment_id if experiment
                         else self.client.create_experiment(self.cfg.mlflow.experiment_name))
        overrides = " ".join(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ""
        tags = {"task": self.cfg.task, "model": self.cfg.model.name, "data": self.cfg.data.name,
                "hydra_overrides": overrides, "run_dir": str(self.run_dir.resolve())}
        commit = _git_commit()
        if commit:
            tags["git_commit"] = commit
        return self.client.create_run(experiment_id, run_name=self.cfg.mlflow.run_name, tags=tags).info.run_id

    def __exit__(self, exc_type, exc, tb):
        status = "FINISHED" if exc_type is None else "FAILED"
        if exc_type is not None:
            self.client.set_tag(self.run_id, "error", f"{exc_type.__name__}: {exc}"[:5000])
        self.client.set_terminated(self.run_id, status)
        return False

    def log_metrics(self, metrics: dict, step: Optional[int]):
        entities = [mlflow.entities.Metric(k, float(v), int(time.time() * 1000), step or 0)
                    for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=entities)

    def log_artifact(self, path, artifact_path: Optional[str]):
        if path is not None and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, network, sizes: dict):
        from x3d_exp.models.summary import format_summary, trace_network

        count = trace_network(network, network.spec.input_shape)
        self.client.log_param(self.run_id, "model_params", count.params)
        self.client.log_param(self.run_id, "model_gmacs", round(count.gmacs, 4))
        summary = self.run_dir / "model_summary.txt"
        summary.write_text(format_summary(self.cfg.model.name, count) + f"\nloader clip sizes: {sizes}\n")
        self.log_artifact(summary, None)
