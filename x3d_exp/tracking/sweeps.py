"""Hydra multiruns as one group in MLflow: a parent run per multirun, a child run per job, a summary at the end.

Two pieces, both always on (conf/config.yaml), so ad-hoc sweeps are grouped like those in multirun_sweeps/:

- `MlflowSweepCallback` (a Hydra callback). `on_multirun_start`, in the process the user started and before any job,
  spools the parent run with the base config as params into `<sweep dir>/mlflow_spool.jsonl` and starts its sender,
  which creates the experiment and the run (a new sqlite file is migrated there once, not by parallel jobs racing
  each other) and writes the parent's id to `<sweep dir>/mlflow_parent_run_id`. `on_multirun_end` attaches
  `sweep_summary.csv` and `top1_vs_gmacs.png` to the parent, closes it (FAILED if any job failed) and exits with
  status 1 if any job failed. A job folder of this multirun without a child run (the job was killed before it opened
  one) is a FAILED row. Should the multirun itself die (a job's composition error, Ctrl+C), an exit hook still
  writes the summary and closes the parent FAILED.
- `run_job(task, cfg, job)`, which the CLI's task function calls for each multirun job (x3d_exp.cli). It spools the
  job's child run (tag `mlflow.parentRunId`) in the job's folder, runs the task with that spool as its
  `JobContext.adopted_run`, and closes the run. A failing job is recorded and returned as
  `{"status": "FAILED", "error": ...}` instead of raised: Hydra's BasicSweeper re-raises a failed job's exception
  after its batch, which skips later batches and on_multirun_end.

Everything written to MLflow goes through spools (x3d_exp.tracking.spool), so a sweep goes on while the tracking
server is away: a child run is created once its parent is, and a job waits at most `mlflow.drain_timeout` at its
end. What needs to read the store (the summary, a resumed search's finished candidates) is skipped with one
warning line while it is away; `python run.py task=sync sync.path=<sweep dir>` delivers the rest later.

A search sweeper (x3d_exp.search, X3D's progressive expansion) launches its jobs through the same two pieces: every
candidate is a child run, its run_job dict tells the sweeper how it did, and the sweeper's own account
(SEARCH_RESULT) opens the sweep's last line.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from x3d_exp.config import FACTORS, JobContext, flatten
from x3d_exp.errors import Interrupted, UserError
from x3d_exp.tracking.delivery import Sender, finish_delivery, first_line, sync_command
from x3d_exp.tracking.plots import plot_top1_vs_gmacs
from x3d_exp.tracking.runs import (RUN_ID_FILE, display_uri, git_commit, owner_tags, spool_new_run, spool_run,
                                   view_command)
from x3d_exp.tracking.spool import Spool, register_op

log = logging.getLogger("x3d_exp.tracking.sweeps")

PARENT_FILE = "mlflow_parent_run_id"
SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_PLOT = "top1_vs_gmacs.png"
# A search sweeper's own account of the sweep (x3d_exp.search.progressive), which the sweep's last line begins with.
SEARCH_RESULT = "search_result.json"
# Tags of a search candidate's child run, from the job's sweep.step and sweep.axis.
STEP_TAG, AXIS_TAG = "sweep.step", "sweep.axis"
# Tasks that record an MLflow run of their own (summary, convert, export and infer do not).
TRACKED_TASKS = ("train", "test")


# How long a sweep job waits for its child run to be created when it starts, so that its result names the run.
# Only while the server is away does it wait this long.
START_WAIT_S = 5.0


def _first_line(text: str) -> str:
    # MindSpore's errors run to dozens of lines of C++ stack; the first says what happened.
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def base_params(sweep_dir: Path) -> dict:
    """The sweep's base config as its parent run's params, read from the sweep's spool (no server needed)."""
    params = [r.args["params"] for r in Spool.in_dir(sweep_dir).read()[0] if r.op == "log_params"]
    # A null is spooled as null (and not logged); compared as the job's own config spells it.
    return {k: str(v) for k, v in params[-1].items()} if params else {}


def run_job(task: Callable[[DictConfig, JobContext], Any], cfg: DictConfig, context: JobContext) -> dict:
    """Run one multirun job as a child run of the sweep's parent, never raising its failure (bar an interrupt)."""
    job = context.job_num
    parent_key = Spool.in_dir(context.sweep_dir).run_key() if context.sweep_dir else None
    sender = None
    if parent_key and cfg.task in TRACKED_TASKS and cfg.mlflow.enabled:
        spool = Spool.in_dir(context.output_dir)
        sender = Sender(spool, str(cfg.mlflow.tracking_uri), context.output_dir / RUN_ID_FILE)
        sender.start()
        params = {k: str(v) for k, v in flatten(cfg).items()}
        # A resumed sweep's base comes from an older spool: a key it lacks was null there.
        changed = _changed(params, {**{k: "None" for k in params}, **base_params(context.sweep_dir)})
        tags = {"sweep.job": str(job)}
        for tag, key in ((STEP_TAG, "step"), (AXIS_TAG, "axis")):
            if cfg.sweep.get(key) is not None:
                tags[tag] = str(cfg.sweep[key])
        spool_new_run(spool, cfg, context.output_dir, context, tags=tags,
                      name=cfg.mlflow.run_name or f"{job}: {_short_numbers(changed) or '(base)'}"[:250],
                      parent_key=parent_key)
        context = dataclasses.replace(context, adopted_run=spool.path)
        sender.drain(START_WAIT_S)
    outcome = {"status": "FINISHED", "run_id": None, "job": job}
    interrupted = None
    try:
        outcome.update(task(cfg, context) or {})
    except UserError as err:
        outcome.update(status="FAILED", error=f"{type(err).__name__}: {_first_line(str(err))}")
    except Interrupted as err:
        outcome.update(status="KILLED", error=str(err))
        interrupted = err
    except KeyboardInterrupt as err:
        outcome.update(status="FAILED", error=f"KeyboardInterrupt: {err}")
        interrupted = err
    except Exception as err:  # noqa: BLE001 - one job's failure is recorded; the sweep goes on
        outcome.update(status="FAILED", error=f"{type(err).__name__}: {_first_line(str(err))}")
        log.exception("sweep job %d failed", job)
    if outcome["status"] != "FINISHED" and interrupted is None:
        log.error("sweep job %d failed: %s", job, outcome["error"])
    if sender is not None:
        sender.spool.append("terminate", status=outcome["status"], error=outcome.get("error"))
        sender.notify()
        finish_delivery(sender, float(cfg.mlflow.drain_timeout), announce=False)
        outcome["run_id"] = sender.run_id
    if interrupted is not None:
        raise interrupted
    return outcome


def _close_running_children(client: MlflowClient, parent: str) -> None:
    """Spool op of the parent run: the multirun is over, so nothing will close a child left RUNNING any more (its
    job was killed)."""
    experiment = client.get_run(parent).info.experiment_id
    for child in client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                                    "attributes.status = 'RUNNING'", max_results=50000):
        client.set_tag(child.info.run_id, "error", "the job ended without closing its run (killed?)")
        client.set_terminated(child.info.run_id, "FAILED")


def _delete_unfinished_children(client: MlflowClient, parent: str) -> None:
    """Spool op of a resumed sweep's parent: children that did not finish are deleted, the sweeper trains them
    again."""
    experiment = client.get_run(parent).info.experiment_id
    for child in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=50000):
        if child.info.status != "FINISHED" and child.info.lifecycle_stage == "active":
            client.delete_run(child.info.run_id)


register_op("close_running_children", _close_running_children)
register_op("delete_unfinished_children", _delete_unfinished_children)


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


def _short_numbers(text: str) -> str:
    """Numbers of more than 4 significant digits rounded to 4, for run names (the params keep them whole):
    `lr=0.04064540627628723` reads `lr=0.04065`."""
    return re.sub(r"(?<![\w.])-?\d+\.\d{4,}(?:e[-+]?\d+)?", lambda m: f"{float(m.group()):.4g}", text)


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


def job_folders(sweep_dir: Path, since: float) -> List[Path]:
    """The job folders this multirun made: numbered, modified since `since` (older ones are an earlier attempt's)."""
    return [folder for folder in sweep_dir.iterdir()
            if folder.name.isdigit() and folder.is_dir() and folder.stat().st_mtime >= since]


def lost_jobs(sweep_dir: Path, known_jobs, since: float) -> List[dict]:
    """Summary rows for the job folders this multirun made that have no child run: jobs that died before they
    opened one (killed by the OOM killer or a scheduler, or a lost node)."""
    rows = []
    for folder in job_folders(sweep_dir, since):
        if int(folder.name) not in known_jobs:
            overrides = folder / ".hydra" / "overrides.yaml"
            # Hydra opens the job's log file a moment before it saves the overrides: a job killed in between
            # leaves none.
            given = " ".join(str(o) for o in OmegaConf.load(overrides)) if overrides.is_file() else \
                "(unknown: the job died before Hydra saved its overrides)"
            rows.append({"job": int(folder.name), "status": "FAILED",
                         "error": "the job ended before it opened its MLflow run (killed?)", "overrides": given})
    return rows


def jobs_name(sweep: str, jobs: int) -> str:
    """A sweep parent's name: `expand_one_axis (7 jobs)`."""
    return f"{sweep} ({jobs} job{'s' if jobs != 1 else ''})"


class MlflowSweepCallback(Callback):
    """Parent run and summary of a multirun (see the module docstring)."""

    def __init__(self) -> None:
        self.client = None
        self.sender: Optional[Sender] = None
        self.sweep_dir: Optional[Path] = None
        self.base_params: dict = {}
        self.name = "multirun"
        self.tracking_uri = ""
        self.drain_timeout = 60.0
        self.optimized_metric: Optional[str] = None
        self.allow_failed_jobs = False
        self.started = 0.0

    def __getstate__(self) -> dict:
        # Hydra's joblib launcher pickles the callbacks into its worker processes, which never close the sweep: the
        # sender (a thread and a lock) stays in this process.
        return {**self.__dict__, "sender": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        base = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        self.name = str(OmegaConf.select(base, "sweep.name", default=None) or "multirun")
        self.optimized_metric = OmegaConf.select(base, "sweep.optimized_metric", default=None)
        self.allow_failed_jobs = bool(OmegaConf.select(base, "sweep.allow_failed_jobs", default=False))
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = str(config.mlflow.tracking_uri)
        self.drain_timeout = float(config.mlflow.drain_timeout)
        self.client = MlflowClient(self.tracking_uri)
        (self.sweep_dir / SEARCH_RESULT).unlink(missing_ok=True)
        spool = Spool.in_dir(self.sweep_dir)
        self.sender = Sender(spool, self.tracking_uri, self.sweep_dir / PARENT_FILE)
        self.sender.start()
        atexit.register(self._finish, aborted=True)
        if OmegaConf.select(base, "sweep.resumable", default=False) and spool.creates_run():
            # A resumable sweep run again in its own sweep dir continues its parent run; its children that did not
            # finish (killed, or failed) are deleted: the sweeper trains them again.
            spool.append("reopen_run", tags={**owner_tags(), "resumed": "true"},
                         tracking_uri=display_uri(self.tracking_uri))
            spool.append("delete_unfinished_children")
            self.base_params = base_params(self.sweep_dir)
            log.info("MLflow parent run continued for the sweep in %s", self.sweep_dir)
        else:
            overrides = " ".join(config.hydra.overrides.task)
            tags = {"sweep": self.name, "sweep.dir": str(self.sweep_dir), "hydra_overrides": overrides,
                    "command": f"python run.py -m {overrides}".strip(), "task": str(base.task)}
            commit = git_commit()
            if commit:
                tags["git_commit"] = commit
            # Named briefly; the job count is added at the end (the full command is the `command` tag).
            spool_run(spool, self.tracking_uri, str(config.mlflow.experiment_name), self.name, tags)
            flat = flatten(base)
            self.base_params = {k: str(v) for k, v in flat.items()}
            spool.append("log_params", params={k: None if v is None else str(v) for k, v in flat.items()})
        self.sender.notify()
        # Before any job: a new sqlite store is migrated here once, not by parallel jobs racing each other, and a
        # resumed search reads the parent's id. A server away at the start holds the sweep up to the drain timeout.
        if self.sender.drain(self.drain_timeout) == 0:
            log.info("MLflow parent run %s for the sweep in %s", self.sender.run_id, self.sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = self._finish(aborted=False)
        if failed:
            print(f"error: {failed}", file=sys.stderr)
            sys.exit(1)

    def _finish(self, aborted: bool) -> str:
        """Summarise and close the parent once; returns a one-line account of failed jobs ('' if none)."""
        if self.sender is None:
            return ""
        sender, self.sender = self.sender, None
        atexit.unregister(self._finish)
        spool = sender.spool
        spool.append("close_running_children")
        sender.notify()
        account, failed = "", ""
        status = "FAILED" if aborted else "FINISHED"
        if sender.drain(self.drain_timeout) == 0 and sender.run_id:
            try:
                account, failed = self._summarise(spool, sender.run_id)
            except Exception as err:  # noqa: BLE001 - the store went away: the jobs and their runs are intact
                log.warning("the sweep summary is skipped: MLflow at %s failed (%s)", self.tracking_uri,
                            first_line(err))
            if failed:
                status = "FAILED"
        else:
            log.warning("the sweep summary is skipped: MLflow at %s did not answer; after `%s`, the runs are all "
                        "there", self.tracking_uri, sync_command(self.sweep_dir))
            jobs = len(job_folders(self.sweep_dir, self.started))
            spool.append("set_tags", tags={"mlflow.runName": jobs_name(self.name, jobs)})
        spool.append("terminate", status=status)
        sender.notify()
        finish_delivery(sender, self.drain_timeout, announce=False)
        if account:
            print(account, flush=True)
        return failed

    def _summarise(self, spool: Spool, parent: str):
        """The summary table of the children, its csv and plot and the sweep's metrics on the parent (through the
        spool); returns (the sweep's last line, a one-line account of failed jobs or '')."""
        experiment = self.client.get_run(parent).info.experiment_id
        children = self.client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                                           max_results=50000)
        table = summary_table(self.client, children, self.base_params)
        lost = lost_jobs(self.sweep_dir, set(table.job), self.started)
        if lost:
            import pandas as pd

            table = pd.concat([table, pd.DataFrame(lost)]).sort_values("job", kind="stable").reset_index(drop=True)
        csv = self.sweep_dir / SUMMARY_CSV
        table.to_csv(csv, index=False)
        spool.append("log_artifact", path=str(csv))
        plot = plot_top1_vs_gmacs(table, self.name, self.sweep_dir / SUMMARY_PLOT, SUMMARY_CSV)
        spool.append("log_artifact", path=str(plot))
        bad = table[table.status != "FINISHED"]
        spool.append("set_tags", tags={"mlflow.runName": jobs_name(self.name, len(table))})
        best = table.test_top1.max() if table.test_top1.notna().any() else math.nan
        metrics = {"sweep/jobs": len(table), "sweep/failed": len(bad)}
        if not math.isnan(best):
            metrics["sweep/best_test_top1"] = float(best)
        self._record_best(spool, table, metrics)
        now = int(time.time() * 1000)
        spool.append("log_metrics", metrics=[[key, float(value), now, 0] for key, value in metrics.items()])
        search = self.sweep_dir / SEARCH_RESULT
        account = json.loads(search.read_text())["line"] + "; " if search.is_file() else ""
        line = (f"sweep {self.name}: {account}{len(table) - len(bad)} of {len(table)} jobs finished; summary {csv}; "
                f"view: {view_command(self.client, self.tracking_uri, parent)}")
        if not len(bad) or self.allow_failed_jobs:
            return line, ""
        return line, "; ".join(f"sweep job {r.job} ({r.changed}) failed: {r.error}" for r in bad.itertuples())

    def _record_best(self, spool: Spool, table, metrics: dict) -> None:
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
        spool.append("set_tags", tags={f"sweep.{key}": str(value) for key, value in
                                       {"best_job": best.job, "best_run_id": best.run_id,
                                        "best_changed": best.changed}.items()})
