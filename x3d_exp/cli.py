"""The command line: the one place that reads Hydra's global state and turns user errors into `error:` lines.

run.py calls `check_overrides` (a bad override exits with one line before Hydra prints its own 5-15), then
Hydra calls `main` once per job. `main` reads the job's HydraConfig into a `JobContext` that everything below
receives as plain values and runs the task (inside msrun when the world size is above 1). A single job's user
error becomes one `error:` line and exit status 2 here; a multirun job runs as a child MLflow run of the sweep
(x3d_exp.tracking.sweeps), which records a failure and goes on with the other jobs.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig

from x3d_exp.config import JobContext, validate
from x3d_exp.data import resolve_num_classes
from x3d_exp.engine.progress import summary_line
from x3d_exp.env import adopted_run, under_msrun
from x3d_exp.errors import Interrupted, NoSpace, UserError
from x3d_exp.tasks import DISTRIBUTED_TASKS, task_function


def job_context() -> JobContext:
    """The running job as Hydra describes it; defaults (the current directory) outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return JobContext(adopted_run=adopted_run())
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return JobContext(output_dir=Path(hydra_cfg.runtime.output_dir),
                      task_overrides=tuple(hydra_cfg.overrides.task),
                      hydra_overrides=tuple(hydra_cfg.overrides.hydra),
                      config_name=str(hydra_cfg.job.config_name),
                      config_dirs=tuple(str(source.path) for source in hydra_cfg.runtime.config_sources
                                        if source.provider == "command-line"),
                      multirun=multirun,
                      job_num=int(hydra_cfg.job.num) if multirun else 0,
                      sweep_dir=Path(hydra_cfg.sweep.dir) if multirun else None,
                      adopted_run=adopted_run())


def run_task(cfg: DictConfig, job: JobContext) -> dict:
    """Validate, derive a null `data.num_classes` from the data, run `cfg.task` and print its result as the last stdout
    line. Raises UserError."""
    validate(cfg)
    if cfg.data.num_classes is None:
        # The network's head, the metrics and the MLflow params all read data.num_classes: fixed here, once.
        cfg.data.num_classes = resolve_num_classes(cfg.data)
    world_size = int(cfg.launcher.nproc) * int(cfg.launcher.nnodes)
    if cfg.task in DISTRIBUTED_TASKS and world_size > 1 and not under_msrun():
        from x3d_exp.distributed import msrun

        result = msrun.launch(cfg, job)
    else:
        result = task_function(cfg.task)(cfg, job)
    if isinstance(result, dict) and result.get("task") in ("train", "test") and "test_top1" in result:
        from x3d_exp.tasks.train import run_link

        print(summary_line(result, run_link(cfg, result.get("run_id"))), flush=True)
    print(json.dumps(result), flush=True)
    return result


def resume_command(job: JobContext, run_dir) -> str:
    """The command that continues an interrupted job: its own config source and overrides, resume=auto and its run
    dir (a resume or run-dir override of the original is replaced)."""
    args = [f"--config-name={job.config_name}"] if job.config_name not in ("config", "") else []
    args += [f"--config-dir={path}" for path in job.config_dirs]
    args += [o for o in job.task_overrides if not o.lstrip("+~").startswith("resume=")]
    args += [o for o in job.hydra_overrides
             if not o.lstrip("+~").startswith(("hydra.run.dir=", "hydra.sweep.", "hydra.job.num", "hydra.mode"))]
    args += ["resume=auto", f"hydra.run.dir={run_dir}"]
    return shlex.join(["python", sys.argv[0], *args])


def interrupt_lines(err: Interrupted, job: JobContext) -> list:
    """What stopped the job, where, and the saved state; then the command that resumes it (with the line the signal
    handler printed when the signal came, three lines in all)."""
    checkpoint = getattr(err, "checkpoint", None)
    if checkpoint is None:
        return [f"{err} before a training state was saved: nothing to resume; the same command starts again"]
    return [f"{err} at {err.position}; training state saved in {checkpoint}",
            f"resume with: {resume_command(job, getattr(err, 'run_dir', job.output_dir))}"]


def main(cfg: DictConfig):
    """Hydra's task function (run.py): one job. Returns its result; in a multirun with `sweep.optimized_metric` set
    (an Optuna sweep, say), that value of the result as the objective, NaN when the job failed. A job stopped by a
    signal (`Interrupted`) ends the process, the multirun too, with the shell's status for that signal."""
    from x3d_exp.engine.interrupt import exit_status

    job = job_context()
    try:
        if not job.multirun:
            try:
                return run_task(cfg, job)
            except UserError as err:
                print(f"error: {err}", file=sys.stderr)
                if isinstance(err, NoSpace) and err.run_dir is not None:
                    print(f"resume with: {resume_command(job, err.run_dir)}", file=sys.stderr)
                sys.exit(2)
        from x3d_exp.tracking.sweeps import run_job

        outcome = run_job(run_task, cfg, job)
    except Interrupted as err:
        print("\n".join(interrupt_lines(err, job)), file=sys.stderr, flush=True)
        sys.exit(exit_status(err.signal_name))
    metric = cfg.sweep.get("optimized_metric")
    if not metric:
        return outcome
    value = (outcome or {}).get(metric)
    return float("nan") if value is None else float(value)


def _one_line(err: Exception) -> str:
    """Hydra's composition errors as one line naming the override or key (its own messages span 5-15 lines)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = err.__cause__
    if isinstance(err, MissingConfigException):
        missing = re.search(r"Could not find '([^']+)'", str(err))
        name = missing.group(1) if missing else str(err).splitlines()[0]
        group, _, option = name.rpartition("/")
        if group and err.options:
            return f"{group}={option}: no such option; choose one of {', '.join(sorted(err.options))}"
        return f"could not find config {name!r}"
    if isinstance(err, OverrideParseException):
        return str(err).splitlines()[0] + " (see https://hydra.cc/docs/advanced/override_grammar/basic)"
    key = getattr(cause, "full_key", None)
    if key:
        reason = str(cause).splitlines()[0]
        if "not in" in reason:
            return f"{key}: no such key (to add one, write +{key}=...)"
        override = re.search(r"override (\S+)", str(err))
        return f"{override.group(1) if override else key}: {reason}"
    return " ".join(str(err).split())


def check_overrides(config_dir: str, config_name: str, argv) -> None:
    """Compose the run's config once before Hydra does, so a bad override or value exits with one line.

    Runs only for plain single runs: Hydra's flags (-m, --cfg, ...) and hydra.* overrides are left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(arg.startswith("-") for arg in argv):
        return
    overrides = [arg for arg in argv if not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        with initialize_config_dir(version_base="1.3", config_dir=config_dir, job_name="check"):
            validate(compose(config_name, overrides=overrides))
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
