"""Hydra multiruns as one group in MLflow: a parent run per multirun, a child run per job, a summary at the end.

Two pieces, both always on (conf/config.yaml), so ad-hoc sweeps are grouped like those in multirun_sweeps/:

- `MlflowSweepCallback` (a Hydra callback). `on_multirun_start`, in the process the user started and before any job,
  opens the store (a new sqlite file is migrated here once, not by parallel jobs racing each other), creates the
  experiment and the parent run with the base config as params, and writes the parent's id to
  `<sweep dir>/mlflow_parent_run_id` for the jobs. `on_multirun_end` attaches `sweep_summary.csv` and
  `top1_vs_gmacs.png` to the parent, closes it (FAILED if any job failed) and exits with status 1 if any job failed.
  A job folder of this multirun without a child run (the job was killed before it opened one) is a FAILED row.
  Should the multirun itself die (a job's composition error, Ctrl+C), an exit hook still writes the summary and
  closes the parent FAILED.
- `run_job(task, cfg, job)`, which the CLI's task function calls (x3d_exp.cli). In a multirun job it creates the
  job's child run (tag `mlflow.parentRunId`), lets the task log into it (tracking.ADOPT_ENV) and closes it. A
  failing job is recorded and returned as `{"status": "FAILED", "error": ...}` instead of raised: Hydra's
  BasicSweeper re-raises a failed job's exception after its batch, which skips later batches and on_multirun_end,
  and the SystemExit of a user error (cli.run_task exits 2) escapes Hydra's run_job altogether, ending the multirun
  in the middle of a batch. Outside a multirun it only calls the task.

Progressive expansion (X3D's search: expand each axis a step, keep the one with the best accuracy per GMAC, repeat)
fits as a Sweeper plugin (hydra.plugins.sweeper.Sweeper) with this recording unchanged: each round it builds one
override list per axis from the current factors, calls `self.launcher.launch(batch, initial_job_idx)`, reads every
job's `return_value` (run_job's dict: status, run_id, val_top1, gmacs, ...) to choose the axis, and goes on from the
expanded factors. The parent run spans the whole multirun, so every round's jobs become its children and the final
summary and plot cover the whole path.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from x3d_exp.config import FACTORS, JobContext, flatten
from x3d_exp.errors import Interrupted
from x3d_exp.tracking.plots import plot_top1_vs_gmacs
from x3d_exp.tracking.runs import ADOPT_ENV, create_run, git_commit, log_params, open_run, view_command

log = logging.getLogger("x3d_exp.tracking.sweeps")

PARENT_FILE = "mlflow_parent_run_id"
SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_PLOT = "top1_vs_gmacs.png"
# A search sweeper's own account of the sweep (x3d_exp.tracking.search), which the sweep's last line begins with.
SEARCH_RESULT = "search_result.json"
# Tags of a search candidate's child run, from the job's sweep.step and sweep.axis.
STEP_TAG, AXIS_TAG = "sweep.step", "sweep.axis"
# Tasks that record an MLflow run of their own (summary, convert, export and infer do not).
TRACKED_TASKS = ("train", "test")


def _first_line(text: str) -> str:
    # MindSpore's errors run to dozens of lines of C++ stack; the first says what happened.
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _describe_failure(err: BaseException) -> str:
    # cli.run_task turns a user error into sys.exit(2) inside its except block, so the error is the context.
    if isinstance(err, SystemExit) and isinstance(err.__context__, Exception):
        err = err.__context__
    return f"{type(err).__name__}: {_first_line(str(err))}"


def run_job(task: Callable[[DictConfig], Any], cfg: DictConfig, context: JobContext):
    """Run one task; in a multirun job, as a child run of the sweep's parent and never raising its failure."""
    if not context.multirun:
        return task(cfg)
    parent_file = Path(context.sweep_dir) / PARENT_FILE
    parent = parent_file.read_text().strip() if parent_file.is_file() else None
    client = run_id = None
    previous = os.environ.get(ADOPT_ENV)
    job = context.job_num
    if parent and cfg.task in TRACKED_TASKS and cfg.mlflow.enabled:
        client = MlflowClient(cfg.mlflow.tracking_uri)
        changed = _changed({k: str(v) for k, v in flatten(cfg).items()}, client.get_run(parent).data.params)
        tags = {"mlflow.parentRunId": parent, "sweep.job": str(job)}
        for tag, key in ((STEP_TAG, "step"), (AXIS_TAG, "axis")):
            if cfg.sweep.get(key) is not None:
                tags[tag] = str(cfg.sweep[key])
        run_id = create_run(client, cfg, context.output_dir, context, tags=tags,
                            name=cfg.mlflow.run_name or f"{job}: {changed or '(base)'}"[:250])
        os.environ[ADOPT_ENV] = run_id
    outcome = {"status": "FINISHED", "run_id": run_id, "job": job}
    try:
        outcome.update(task(cfg) or {})
    except Interrupted as err:
        # A signal stops the whole multirun, not just this job: the job's run is KILLED, as a single run's would be.
        if client is not None:
            client.set_tag(run_id, "error", str(err))
            client.set_terminated(run_id, "KILLED")
        raise
    except BaseException as err:  # noqa: B902 - a user error arrives as SystemExit, Ctrl+C as KeyboardInterrupt
        outcome.update(status="FAILED", error=_describe_failure(err))
        if not isinstance(err, SystemExit):
            log.exception("sweep job %d failed", job)
        if client is not None:
            client.set_tag(run_id, "error", outcome["error"][:5000])
            client.set_terminated(run_id, "FAILED")
        if isinstance(err, KeyboardInterrupt):
            raise
        log.error("sweep job %d failed: %s", job, outcome["error"])
    finally:
        if previous is None:
            os.environ.pop(ADOPT_ENV, None)
        else:
            os.environ[ADOPT_ENV] = previous
    if client is not None and outcome["status"] == "FINISHED":
        client.set_terminated(run_id, "FINISHED")
    return outcome


def best_val_top1(client, run_id: str) -> Optional[float]:
    """The best val/top1 a run logged (None before its first validation)."""
    values = [m.value for m in client.get_metric_history(run_id, "val/top1")]
    return max(values) if values else None


def as_float(value) -> Optional[float]:
    """An MLflow param (a string) as a number, None when it is missing or not one."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _changed(params: dict, base: dict) -> str:
    """`key=value` for every config value where the job differs from the multirun's base config (the sweep's own
    bookkeeping, such as a search's step, aside)."""
    keys = [k for k in params if k in base and params[k] != base[k] and not k.startswith("sweep.")]
    return " ".join(f"{k.removeprefix('model.')}={params[k]}" for k in sorted(keys))


def summary_table(client, children: List, base_params: dict):
    """One row per child run: job, status, what it changed, factors, size, cost, accuracy, error."""
    import pandas as pd

    rows = []
    for run in children:
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        row = {"job": int(tags.get("sweep.job", -1)), "status": run.info.status,
               "changed": _changed(params, base_params) or "(base)", "model": params.get("model.name")}
        row.update({f: as_float(params.get(f"model.{f}")) for f in FACTORS})
        row.update(clip=params.get("clip"), params=as_float(params.get("model_params")),
                   gmacs=as_float(params.get("model_gmacs")), gmacs_nominal=as_float(params.get("model_gmacs_nominal")),
                   val_top1=best_val_top1(client, run.info.run_id), test_top1=metrics.get("test/top1"),
                   test_top5=metrics.get("test/top5"), error=_first_line(tags.get("error", "")),
                   overrides=tags.get("hydra_overrides", ""), run_id=run.info.run_id)
        rows.append(row)
    columns = ["job", "status", "changed", "model", *FACTORS, "clip", "params", "gmacs", "gmacs_nominal", "val_top1",
               "test_top1", "test_top5", "error", "overrides", "run_id"]
    return pd.DataFrame(rows, columns=columns).sort_values("job", kind="stable").reset_index(drop=True)


def lost_jobs(sweep_dir: Path, known_jobs, since: float) -> List[dict]:
    """Summary rows for the job folders this multirun made (modified since `since`) that have no child run: jobs
    that died before they opened one (killed by the OOM killer or a scheduler, or a lost node)."""
    rows = []
    for folder in sweep_dir.iterdir():
        if folder.name.isdigit() and folder.is_dir() and int(folder.name) not in known_jobs \
                and folder.stat().st_mtime >= since:
            overrides = folder / ".hydra" / "overrides.yaml"
            given = OmegaConf.load(overrides) if overrides.is_file() else []
            rows.append({"job": int(folder.name), "status": "FAILED",
                         "error": "the job ended before it opened its MLflow run (killed?)",
                         "overrides": " ".join(str(o) for o in given)})
    return rows


class MlflowSweepCallback(Callback):
    """Parent run and summary of a multirun (see the module docstring)."""

    def __init__(self) -> None:
        self.client = None
        self.parent: Optional[str] = None
        self.sweep_dir: Optional[Path] = None
        self.base_params: dict = {}
        self.name = "multirun"
        self.tracking_uri = ""
        self.optimized_metric: Optional[str] = None
        self.allow_failed_jobs = False
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        base = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        self.name = str(OmegaConf.select(base, "sweep.name", default=None) or "multirun")
        self.optimized_metric = OmegaConf.select(base, "sweep.optimized_metric", default=None)
        self.allow_failed_jobs = bool(OmegaConf.select(base, "sweep.allow_failed_jobs", default=False))
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = str(config.mlflow.tracking_uri)
        self.client = MlflowClient(self.tracking_uri)
        (self.sweep_dir / SEARCH_RESULT).unlink(missing_ok=True)
        if OmegaConf.select(base, "sweep.resumable", default=False) and self._reopen_parent():
            atexit.register(self._finish, aborted=True)
            return
        overrides = " ".join(config.hydra.overrides.task)
        tags = {"sweep": self.name, "sweep.dir": str(self.sweep_dir), "hydra_overrides": overrides,
                "task": str(base.task)}
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        self.parent = open_run(self.client, str(config.mlflow.experiment_name), f"{self.name}: {overrides}"[:250],
                               tags)
        self.base_params = {k: str(v) for k, v in flatten(base).items()}
        log_params(self.client, self.parent, self.base_params)
        (self.sweep_dir / PARENT_FILE).write_text(self.parent)
        atexit.register(self._finish, aborted=True)
        log.info("MLflow parent run %s for the sweep in %s", self.parent, self.sweep_dir)

    def _reopen_parent(self) -> bool:
        """A resumable sweep run again in its own sweep dir continues its parent run. Children that did not finish
        (killed, or failed) are deleted: the sweeper trains them again."""
        parent_file = self.sweep_dir / PARENT_FILE
        if not parent_file.is_file():
            return False
        try:
            run = self.client.get_run(parent_file.read_text().strip())
        except Exception:  # noqa: BLE001 - the id of another store, or a deleted run: start a new parent
            return False
        self.parent = run.info.run_id
        self.base_params = dict(run.data.params)
        self.client.update_run(self.parent, status="RUNNING")
        experiment = run.info.experiment_id
        for child in self.client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{self.parent}'",
                                             max_results=50000):
            if child.info.status != "FINISHED":
                self.client.delete_run(child.info.run_id)
        log.info("MLflow parent run %s continued for the sweep in %s", self.parent, self.sweep_dir)
        return True

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = self._finish(aborted=False)
        if failed:
            print(f"error: {failed}", file=sys.stderr)
            sys.exit(1)

    def _finish(self, aborted: bool) -> str:
        """Summarise and close the parent once; returns a one-line account of failed jobs ('' if none)."""
        if self.parent is None:
            return ""
        parent, self.parent = self.parent, None
        atexit.unregister(self._finish)
        experiment = self.client.get_run(parent).info.experiment_id
        children = self.client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                                           max_results=50000)
        for child in children:
            if child.info.status == "RUNNING":
                # The multirun is over, so nothing will close it any more: its job was killed.
                self.client.set_tag(child.info.run_id, "error", "the job ended without closing its run (killed?)")
                self.client.set_terminated(child.info.run_id, "FAILED")
        children = [self.client.get_run(c.info.run_id) for c in children]
        table = summary_table(self.client, children, self.base_params)
        lost = lost_jobs(self.sweep_dir, set(table.job), self.started)
        if lost:
            import pandas as pd

            table = pd.concat([table, pd.DataFrame(lost)]).sort_values("job", kind="stable").reset_index(drop=True)
        csv = self.sweep_dir / SUMMARY_CSV
        table.to_csv(csv, index=False)
        self.client.log_artifact(parent, str(csv))
        plot = plot_top1_vs_gmacs(table, self.name, self.sweep_dir / SUMMARY_PLOT, SUMMARY_CSV)
        self.client.log_artifact(parent, str(plot))
        bad = table[table.status != "FINISHED"]
        best = table.test_top1.max() if table.test_top1.notna().any() else math.nan
        metrics = {"sweep/jobs": len(table), "sweep/failed": len(bad)}
        if not math.isnan(best):
            metrics["sweep/best_test_top1"] = float(best)
        self._record_best(parent, table, metrics)
        for key, value in metrics.items():
            self.client.log_metric(parent, key, value)
        failed = len(bad) and not self.allow_failed_jobs
        self.client.set_terminated(parent, "FAILED" if aborted or failed else "FINISHED")
        search = self.sweep_dir / SEARCH_RESULT
        account = json.loads(search.read_text())["line"] + "; " if search.is_file() else ""
        print(f"sweep {self.name}: {account}{len(table) - len(bad)} of {len(table)} jobs finished; summary {csv}; "
              f"view: {view_command(self.client, self.tracking_uri, parent)}", flush=True)
        if not failed:
            return ""
        return "; ".join(f"sweep job {r.job} ({r.changed}) failed: {r.error}" for r in bad.itertuples())

    def _record_best(self, parent: str, table, metrics: dict) -> None:
        """With sweep.optimized_metric (a column of the summary), the best finished job on the parent: its value as
        sweep/best_<metric>, and its job, run id and changed settings as tags."""
        metric = self.optimized_metric
        if not metric or metric not in table.columns:
            return
        scored = table[(table.status == "FINISHED") & table[metric].notna()]
        if scored.empty:
            return
        best = scored.loc[scored[metric].astype(float).idxmax()]
        metrics[f"sweep/best_{metric}"] = float(best[metric])
        for key, value in {"best_job": best.job, "best_run_id": best.run_id, "best_changed": best.changed}.items():
            self.client.set_tag(parent, f"sweep.{key}", str(value))
