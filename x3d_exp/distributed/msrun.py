"""`launcher=distributed_cpu|distributed_gpu`: run.py starts itself again under MindSpore's msrun.

The process the user started (the launcher) owns the MLflow run and the exit status: it opens the run, hands its
spool to rank 0 (x3d_exp.env.ADOPTED_RUN_ENV: rank 0 appends its records there and the launcher's sender delivers
them), starts msrun with the same overrides and one pinned `hydra.run.dir`, and
closes the run FINISHED only when msrun reports that every rank exited 0. msrun itself kills all ranks as soon as
one fails; the launcher stops msrun and everything below it shortly after that (msrun would go on waiting for its
scheduler) and in any case once `launcher.timeout` seconds have passed, so no failure leaves the command hanging.
Rank 0 leaves its result in `<run dir>/result.json`, which the launcher returns.

Multi-node: the same command on every node with its own `launcher.node_rank`; msrun's scheduler runs on the node
whose address is `launcher.master_addr`, and only node 0's launcher records the run in MLflow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from x3d_exp.config import JobContext
from x3d_exp.distributed import RESULT_FILE
from x3d_exp.engine.build import check_device
from x3d_exp.engine.checkpoint import INTERRUPT_CKPT, resolve_resume
from x3d_exp.engine.interrupt import StopSignals
from x3d_exp.env import ADOPTED_RUN_ENV
from x3d_exp.errors import Interrupted, LaunchError, UserError
from x3d_exp.tracking import Tracker

# msrun starts each worker as `python <script> <args>`: the script must be run.py, the only entry point that
# composes the config. It sits next to the package in the repository (the project is installed editable).
ENTRY = Path(__file__).resolve().parents[2] / "run.py"
LOG_DIR = "msrun_logs"
# Hydra settings a worker should share with the launcher; the others (mode, sweep dirs, hydra/launcher) would
# make a worker another multirun.
FORWARDED_HYDRA = ("hydra.verbose", "hydra.job_logging", "hydra/job_logging", "hydra.hydra_logging",
                   "hydra/hydra_logging")
# After SIGTERM, how long msrun and the ranks get to close their logs and the MLflow run before SIGKILL.
STOP_GRACE_S = 5


def world_size(cfg: DictConfig) -> int:
    return int(cfg.launcher.nproc) * int(cfg.launcher.nnodes)


def check_launcher(cfg: DictConfig) -> None:
    lc = cfg.launcher
    problems = []
    if lc.nnodes < 1:
        problems.append(f"launcher.nnodes={lc.nnodes}: must be >= 1")
    if not 0 <= lc.node_rank < lc.nnodes:
        problems.append(f"launcher.node_rank={lc.node_rank}: must be in [0, launcher.nnodes={lc.nnodes})")
    if not 1024 <= lc.master_port <= 65535:
        problems.append(f"launcher.master_port={lc.master_port}: must be in [1024, 65535]")
    if lc.timeout < 0:
        problems.append(f"launcher.timeout={lc.timeout}: must be >= 0 (0: no limit)")
    if lc.device is not None and cfg.device not in ("auto", lc.device):
        problems.append(f"device={cfg.device} conflicts with launcher={lc.name}, which runs on {lc.device}")
    if problems:
        raise UserError("; ".join(problems))
    check_device(cfg)
    if not ENTRY.is_file():
        raise UserError(f"launcher={lc.name} restarts {ENTRY}, which does not exist (install the repository "
                        f"with `pip install -e .`)")


def worker_args(job: JobContext, run_dir: Path) -> list:
    """run.py's arguments for every rank: the launcher's config source and overrides, one pinned run dir.

    `hydra.output_subdir=null`: the launcher already saved `.hydra/` there, and N ranks rewriting it at once
    could leave a truncated file.
    """
    args = [f"--config-name={job.config_name}"]
    args += [f"--config-dir={path}" for path in job.config_dirs]
    args += list(job.task_overrides)
    args += [o for o in job.hydra_overrides if o.lstrip("+~").startswith(FORWARDED_HYDRA)]
    return args + [f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]


def msrun_command(cfg: DictConfig, job: JobContext, run_dir: Path) -> list:
    lc = cfg.launcher
    return [sys.executable, "-m", "mindspore.parallel.cluster.run",
            f"--worker_num={world_size(cfg)}", f"--local_worker_num={lc.nproc}",
            f"--master_addr={lc.master_addr}", f"--master_port={lc.master_port}", f"--node_rank={lc.node_rank}",
            f"--log_dir={run_dir / LOG_DIR}", "--join=True",
            # Building the cluster waits for late nodes no longer than the whole run may take (-1: forever).
            f"--cluster_time_out={lc.timeout if lc.timeout > 0 else -1}",
            # The console follows this node's first rank; every rank's output is in its own log file.
            f"--tail_worker_log={lc.node_rank * lc.nproc}",
            str(ENTRY), *worker_args(job, run_dir)]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to msrun and every process below it (ranks run in sessions of their own), SIGKILL if still alive."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


class _MsrunStderr(threading.Thread):
    """Passes msrun's stderr through and notes when msrun reports a rank that exited non-zero."""

    FAILED_RANK = re.compile(r"Worker process (\d+) exit with exception\. Error code: (-?\d+)")

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.failure: Optional[str] = None
        self.failed_at: Optional[float] = None
        # Set once a stop signal was passed on: msrun's own traceback about the ranks' exits would bury the
        # three lines that say where the run stopped (every rank's output stays in its log).
        self.quiet = False

    def run(self):
        for line in self.stream:
            if not self.quiet:
                sys.stderr.write(line)
            found = self.FAILED_RANK.search(line)
            if found and self.failure is None:
                self.failure = f"rank process {found.group(1)} exited with status {found.group(2)}"
                self.failed_at = time.time()


def _wait(proc: subprocess.Popen, stderr: _MsrunStderr, deadline: Optional[float]) -> Optional[int]:
    """msrun's exit status, or None when it had to be stopped after reporting a failed rank.

    msrun kills the other ranks as soon as one fails, but then waits for its scheduler, which takes its node
    timeout (30-120 s seen here) to give up on ranks that were killed rather than left the cluster.
    """
    while (code := proc.poll()) is None:
        now = time.time()
        if deadline is not None and now > deadline:
            raise subprocess.TimeoutExpired(proc.args, deadline)
        if stderr.failed_at is not None and now - stderr.failed_at > STOP_GRACE_S:
            _stop(proc)
            return None
        time.sleep(0.5)
    return code


def _signal_ranks(proc: subprocess.Popen, signum: int) -> None:
    """Pass a stop signal on to the rank processes below msrun (not msrun, whose SIGINT handler kills every rank at
    once, nor its scheduler): each stops after the same step (x3d_exp.engine.interrupt)."""
    import psutil

    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in below:
        try:
            if child.environ().get("MS_ROLE") == "MS_WORKER":
                child.send_signal(signum)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _first_error(log_dir: Path) -> str:
    """The last error line of the first rank log that has one (ranks msrun killed afterwards have none)."""
    pattern = re.compile(r"^(error: |[\w.]*(Error|Exception|Interrupt)\b)")
    for path in sorted(log_dir.glob("worker_*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0)):
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if pattern.match(line)]
        if lines:
            return f"{path.name}: {lines[-1]}"
    return "no error line in the worker logs"


def launch(cfg: DictConfig, job: JobContext) -> dict:
    """Run this task under msrun; returns rank 0's result (node 0) or this node's summary (other nodes)."""
    check_launcher(cfg)
    started = time.time()
    run_dir = job.output_dir.resolve()
    # The ranks get the same `resume` and resolve it to the same directory.
    out_dir, resume_from = resolve_resume(cfg.resume, run_dir) if cfg.task == "train" else (run_dir, None)
    result_path = out_dir / RESULT_FILE
    result_path.unlink(missing_ok=True)
    main_node = cfg.launcher.node_rank == 0
    cmd = msrun_command(cfg, job, run_dir)
    timeout = cfg.launcher.timeout or None
    with Tracker(cfg, out_dir, job, resume=resume_from is not None, active=main_node,
                 print_link=False) as tracker:
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        if tracker.active:
            env[ADOPTED_RUN_ENV] = str(tracker.spool.path)
        print(f"launcher={cfg.launcher.name}: {world_size(cfg)} ranks ({cfg.launcher.nproc} on node "
              f"{cfg.launcher.node_rank}), logs in {run_dir / LOG_DIR}", flush=True)
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True,
                                errors="replace")
        stderr = _MsrunStderr(proc.stderr)
        stderr.start()
        # msrun runs in a session of its own, so a Ctrl+C reaches this process only: it goes on to the ranks,
        # which stop together after a step, rank 0 having saved the state; then msrun ends and so does this.

        def pass_on(signum: int) -> None:
            stderr.quiet = True
            _signal_ranks(proc, signum)

        signals = StopSignals(on_request=pass_on, before_quit=lambda: _stop(proc))
        signals.deferring = True
        try:
            with signals:
                code = _wait(proc, stderr, started + timeout if timeout else None)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise LaunchError(f"launcher.timeout={cfg.launcher.timeout}s passed: stopped msrun and its ranks; "
                              f"logs in {run_dir / LOG_DIR}") from None
        except BaseException:
            _stop(proc)
            raise
        stderr.join(timeout=5)
        if signals.requested:
            err = Interrupted(signals.requested)
            saved = out_dir / "checkpoints" / INTERRUPT_CKPT
            if saved.is_file() and saved.stat().st_mtime >= started:
                err.checkpoint, err.run_dir, err.position = saved, out_dir, "a step boundary"
            raise err
        if code != 0:
            cause = stderr.failure or f"msrun exit status {code}"
            raise LaunchError(f"distributed run failed ({cause}): {_first_error(run_dir / LOG_DIR)}; "
                              f"logs in {run_dir / LOG_DIR}")
        if not main_node:
            return {"task": cfg.task, "node_rank": int(cfg.launcher.node_rank), "world_size": world_size(cfg),
                    "seconds": round(time.time() - started, 1)}
        if not result_path.is_file():
            raise LaunchError(f"all ranks exited 0 but rank 0 left no {result_path}")
        result = json.loads(result_path.read_text())
        result.update(run_id=tracker.run_id, seconds=round(time.time() - started, 1))
    return result
