"""MLflow runs: creation with the standard tags and params, ownership, closing the orphans of killed jobs, and the
spool ops (x3d_exp.tracking.spool) that record all of it.

A run has one owner, the process that opens it, which alone closes it FINISHED. An outer process can open the run
and hand its spool to the process that trains (`JobContext.adopted_run`): the msrun launcher to rank 0, the sweep
job wrapper (x3d_exp.tracking.sweeps) to the task. The adopting Tracker appends to that spool, marks the run FAILED
on an error and otherwise leaves closing it to the owner, which knows whether every other rank or step succeeded too.

A process killed with SIGKILL (or the OOM killer) cannot close its run. Every run therefore carries its owner's
host and pid, and whenever a run is opened in an experiment, RUNNING runs there whose owner on this host is gone
are closed KILLED (`close_orphaned_runs`); a resume re-opens its own run afterwards.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import uuid
from pathlib import Path
from typing import List, Optional

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from x3d_exp.config import JobContext, flatten
from x3d_exp.tracking.spool import RUN_KEY_TAG, NotYet, Spool, register_op

log = logging.getLogger("x3d_exp.tracking")
MLFLOW_PARAM_LIMIT = 6000
# The run's id in its run dir, written once the store has created the run.
RUN_ID_FILE = "mlflow_run_id"
# The experiment's kind as MLflow 3 records it (model training, not GenAI). MLflow 3.17's UI reads it only when its
# global GenAI / Model training switch is off, which it never is there: see view_command.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The artifact folder beside a sqlite store (artifact_root).
ARTIFACTS_DIR = "mlartifacts"


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def display_uri(uri: str) -> str:
    """The store's URI with a relative sqlite path made absolute, so a printed command works anywhere."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def view_command(client: MlflowClient, tracking_uri: str, run_id: str) -> str:
    """How to see a run: the `mlflow ui` command for the store and the run's page at its default address. MLflow
    3.17's UI takes its view (GenAI or model training) from a global switch, not from the experiment's tag, so the
    address selects the model-training view itself."""
    experiment = client.get_run(run_id).info.experiment_id
    return (f"mlflow ui --backend-store-uri {display_uri(tracking_uri)}, then open "
            f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning")


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """Every param that is set (a null is left out: it says nothing) as a string cut to MLflow's limit; log_batch
    takes at most 100 at a time."""
    items = [(k, str(v)[:MLFLOW_PARAM_LIMIT]) for k, v in params.items() if v is not None]
    for start in range(0, len(items), 90):
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[start:start + 90]])


def artifact_root(tracking_uri: str) -> Optional[str]:
    """Where a new experiment keeps its artifacts: `mlartifacts/` beside a sqlite store's file, not MLflow's default
    `./mlruns` of whatever directory the command ran in. None (the server's choice) for other stores."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return (Path(tracking_uri[len(prefix):]).resolve().parent / ARTIFACTS_DIR).as_uri()


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created if missing (parallel sweep jobs may race to create it, and one wins), its
    artifacts beside the store, and marked as model training so MLflow 3's UI opens it in that view rather than the
    GenAI one."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older x3d-exp, or by hand
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def run_name(cfg: DictConfig) -> str:
    """What the run is, e.g. `x3d_xs synthetic seed0` (`test x3d_m k400 seed0` for task=test), unless
    mlflow.run_name gives one."""
    if cfg.mlflow.run_name:
        return str(cfg.mlflow.run_name)
    prefix = "" if cfg.task == "train" else f"{cfg.task} "
    return f"{prefix}{cfg.model.name} {cfg.data.name} seed{cfg.seed}"


def owner_tags() -> dict:
    return {"owner_host": socket.gethostname(), "owner_pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def close_orphaned_runs(client: MlflowClient, experiment: str) -> list:
    """Close KILLED the experiment's RUNNING runs whose owner process on this host no longer exists.

    Runs owned on other hosts are left alone: their processes cannot be checked from here. A reused pid keeps a
    dead run RUNNING, the safe side of the error.
    """
    host = socket.gethostname()
    runs = client.search_runs([experiment], max_results=1000,
                              filter_string=f"attributes.status = 'RUNNING' and tags.owner_host = '{host}'")
    closed = []
    for run in runs:
        pid = run.data.tags.get("owner_pid", "")
        if pid.isdigit() and not _alive(int(pid)):
            client.set_tag(run.info.run_id, "error", f"its process {pid} on {host} ended without closing it "
                                                     f"(killed?)")
            client.set_terminated(run.info.run_id, "KILLED")
            log.warning("MLflow run %s was left RUNNING by process %s, which is gone: marked KILLED",
                        run.info.run_id, pid)
            closed.append(run.info.run_id)
    return closed


def open_run(client: MlflowClient, experiment_name: str, name: Optional[str], tags: dict) -> str:
    """A new RUNNING run, after closing the experiment's orphaned runs; owned by this process unless `tags` name
    another owner (a run created from a spool names the process that wrote it)."""
    experiment = experiment_id(client, experiment_name)
    close_orphaned_runs(client, experiment)
    return client.create_run(experiment, run_name=name, tags={**owner_tags(), **tags}).info.run_id


def spool_new_run(spool: Spool, cfg: DictConfig, run_dir: Path, job: JobContext, tags: Optional[dict] = None,
                  name: Optional[str] = None, parent_key: Optional[str] = None) -> str:
    """Spool a RUNNING run with the standard tags, the flattened config as params and the job's `.hydra/` files;
    returns its key (`parent_key`: the key of the sweep's parent run, whose child it is)."""
    overrides = " ".join(job.task_overrides)
    all_tags = {"task": cfg.task, "model": cfg.model.name, "data": cfg.data.name,
                "hydra_overrides": overrides, "run_dir": str(Path(run_dir).resolve())}
    commit = git_commit()
    if commit:
        all_tags["git_commit"] = commit
    all_tags.update(tags or {})
    key = spool_run(spool, cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name, name or run_name(cfg), all_tags,
                    parent_key)
    spool.append("log_params", params={k: None if v is None else str(v) for k, v in flatten(cfg).items()})
    hydra_dir = job.output_dir / ".hydra"
    if hydra_dir.is_dir():
        spool.append("log_artifact", path=str(hydra_dir.resolve()), artifact_path=".hydra")
    return key


def spool_run(spool: Spool, tracking_uri: str, experiment: str, name: str, tags: dict,
              parent_key: Optional[str] = None) -> str:
    """Spool the creation of a run owned by this process; returns the key that names it until the store gives it
    an id."""
    key = uuid.uuid4().hex
    spool.append("create_run", key=key, experiment=experiment, name=name, tags={**tags, **owner_tags()},
                 parent_key=parent_key, tracking_uri=display_uri(tracking_uri))
    return key


def run_by_key(client: MlflowClient, experiment: str, key: str) -> Optional[str]:
    found = client.search_runs([experiment], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
    return found[0].info.run_id if found else None


# The spool ops (x3d_exp.tracking.spool): each applies one record to the store and may run twice (a kill between
# delivering a record and saving how far the spool is delivered), so each is idempotent.

def _create_run(client: MlflowClient, run_id, *, key: str, experiment: str, name: str, tags: dict,
                parent_key: Optional[str] = None, tracking_uri: str = "") -> str:
    """Open the run (closing the experiment's orphans first), unless a delivery that died made it already."""
    found = experiment_id(client, experiment)
    existing = run_by_key(client, found, key)
    if existing:
        return existing
    tags = {**tags, RUN_KEY_TAG: key}
    if parent_key:
        parent = run_by_key(client, found, parent_key)
        if parent is None:
            raise NotYet("the sweep's parent run is not created yet")
        tags["mlflow.parentRunId"] = parent
    return open_run(client, experiment, name, tags)


def _reopen_run(client: MlflowClient, run_id: str, *, tags: dict, tracking_uri: str = "") -> None:
    """A resumed job continues its run: orphans closed (its own among them), then RUNNING again without the error
    its interruption recorded."""
    close_orphaned_runs(client, client.get_run(run_id).info.experiment_id)
    client.update_run(run_id, status="RUNNING")
    if "error" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, "error")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def _log_metrics(client: MlflowClient, run_id: str, *, metrics: List[list]) -> None:
    """`metrics`: [key, value, timestamp ms, step] each."""
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), int(ms), int(step))
                                          for k, v, ms, step in metrics[start:start + 1000]])


def _set_tags(client: MlflowClient, run_id: str, *, tags: dict) -> None:
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value)[:5000])


def _log_artifact(client: MlflowClient, run_id: str, *, path: str, artifact_path: Optional[str] = None) -> None:
    """The file (or folder) as it is when delivered; one deleted since it was spooled is reported and passed over."""
    if not Path(path).exists():
        log.warning("artifact %s no longer exists: not logged to run %s", path, run_id)
        return
    if Path(path).is_dir():
        client.log_artifacts(run_id, path, artifact_path)
    else:
        client.log_artifact(run_id, path, artifact_path)


def _log_inputs(client: MlflowClient, run_id: str, *, datasets: List[dict]) -> None:
    """`datasets`: {name, digest, source_type, source, context} each; MLflow keeps one input per dataset."""
    inputs = [mlflow.entities.DatasetInput(
        mlflow.entities.Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"]),
        [mlflow.entities.InputTag("mlflow.data.context", d["context"])]) for d in datasets]
    client.log_inputs(run_id, datasets=inputs)


def _terminate(client: MlflowClient, run_id: str, *, status: str, error: Optional[str] = None) -> None:
    """End the run; FINISHED also drops an `error` tag left by an orphan closing that ran while it was pending."""
    if error:
        client.set_tag(run_id, "error", error[:5000])
    elif status == "FINISHED" and "error" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, "error")
    client.set_terminated(run_id, status)


register_op("create_run", _create_run)
register_op("reopen_run", _reopen_run)
register_op("log_params", lambda client, run_id, *, params: log_params(client, run_id, params))
register_op("log_metrics", _log_metrics)
register_op("set_tags", _set_tags)
register_op("log_artifact", _log_artifact)
register_op("log_inputs", _log_inputs)
register_op("terminate", _terminate)
