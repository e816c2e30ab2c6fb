"""Signals stop a training at a step boundary with its state saved; the printed command resumes it to the full step
count. Also the pieces in process: the mid-epoch skip of the loader's sampler and the resume command."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_helpers import (REPO, SHALLOW, TINY, cli_env, compose_config, final_json, metric_steps, runs_of,
                               store_uri)

# 16 training videos at batch 4: 4 steps an epoch.
EPOCHS, STEPS_PER_EPOCH = 3, 4


def _start(tmp_path: Path, cache: Path, *extra: str) -> subprocess.Popen:
    args = [*TINY, *SHALLOW, f"trainer.epochs={EPOCHS}", f"hydra.run.dir={tmp_path / 'run'}",
            f"mlflow.tracking_uri={store_uri(tmp_path)}", *extra]
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=tmp_path, env=cli_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(tmp_path: Path, proc: subprocess.Popen, steps: int) -> None:
    """Until the job has logged `steps` training steps (trainer.log_every=1): read from its MLflow spool, which the
    training thread writes before it goes on (the store gets them later, from the background sender)."""
    from x3d_exp.tracking.spool import Spool

    deadline = time.time() + 600
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        records = Spool.in_dir(tmp_path / "run").read()[0] if (tmp_path / "run").is_dir() else []
        logged = {m[3] for r in records if r.op == "log_metrics" for m in r.args["metrics"] if m[0] == "train/loss"}
        if len(logged) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not log its steps in time")


def _message(stderr: str) -> list:
    """stderr without MindSpore's own C++ log lines ([WARNING] ...) and MLflow's (2026/12/07 04:02:27 INFO ..., such
    as its creating a new store's tables at the start)."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith("[") and not re.match(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", line)]


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_at_a_step_and_the_printed_command_resumes_to_the_full_step_count(cache, tmp_path, sig,
                                                                                         status):
    proc = _start(tmp_path, cache)
    _wait_for_steps(tmp_path, proc, STEPS_PER_EPOCH + 2)  # mid-way through epoch 2
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == status, stderr[-3000:]
    lines = _message(stderr)
    assert "Traceback" not in stderr and len(lines) <= 3, lines
    # Mid-run, at a step boundary (the signal is sent after step STEPS_PER_EPOCH + 2; a loaded machine may have gone
    # a few steps further before the job sees it).
    assert any(re.search(rf"stopped by {sig.name} at (epoch \d of {EPOCHS}, step \d+ of {STEPS_PER_EPOCH}|the end of "
                         rf"epoch \d)", line) for line in lines), lines
    uri = store_uri(tmp_path)
    (run,) = runs_of(uri)
    assert run.info.status == "KILLED" and run.data.tags["error"] == f"stopped by {sig.name}"
    assert (tmp_path / "run" / "checkpoints" / "interrupted.ckpt").is_file()

    (command,) = [line.split("resume with: ", 1)[1] for line in lines if line.startswith("resume with: ")]
    argv = shlex.split(command)
    assert argv[:2] == ["python", str(REPO / "run.py")] and "resume=auto" in argv
    done = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=cli_env(cache), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert final_json(done.stdout)["run_id"] == run.info.run_id
    (run,) = runs_of(uri)
    assert run.info.status == "FINISHED"
    # Every step's metric exactly once, across the interruption.
    assert metric_steps(uri, run.info.run_id, "train/loss") == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert not (tmp_path / "run" / "checkpoints" / "interrupted.ckpt").exists()


@pytest.mark.slow
def test_a_plain_log_gives_the_whole_run_estimate_on_each_epoch_line_and_no_carriage_return(cache, tmp_path):
    proc = _start(tmp_path, cache)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    epoch_lines = [line for line in stdout.splitlines() if f"/{EPOCHS}: {{" in line]
    assert len(epoch_lines) == EPOCHS
    assert all(" left" in line and "; run " in line for line in epoch_lines), epoch_lines
    assert "\r" not in stdout and "\r" not in stderr
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines[-2].startswith("test top-1 ") and "run dir" in lines[-2] and "view: " in lines[-2]
    assert any(line.startswith("run dir ") and "memory per process about" in line for line in lines)


def test_the_sampler_of_a_partial_epoch_yields_the_rest_of_the_same_order():
    from x3d_exp.data.loader import EpochSampler

    whole = EpochSampler(10, seed=3, shard_id=1, num_shards=2)
    whole.epoch = 2
    uninterrupted = list(whole)
    rest = EpochSampler(10, seed=3, shard_id=1, num_shards=2, skip=2)
    rest.epoch = 2
    assert list(rest) == uninterrupted[2:] and rest.get_num_samples() == len(uninterrupted) - 2


def test_the_resume_command_keeps_the_overrides_and_replaces_resume_and_the_run_dir(monkeypatch):
    from x3d_exp.cli import resume_command
    from x3d_exp.config import JobContext

    monkeypatch.setattr(sys, "argv", ["/repo/run.py"])
    job = JobContext(output_dir=Path("/runs/a"),
                     task_overrides=("model=x3d_m", "resume=false", "data.train_scale=[32,40]"),
                     hydra_overrides=("hydra.run.dir=/runs/a", "hydra.job_logging=none"))
    argv = shlex.split(resume_command(job, Path("/runs/a")))
    assert argv == ["python", "/repo/run.py", "model=x3d_m", "data.train_scale=[32,40]", "hydra.job_logging=none",
                    "resume=auto", "hydra.run.dir=/runs/a"]


def test_exit_status_is_128_plus_the_signal_number():
    from x3d_exp.engine.interrupt import exit_status

    assert (exit_status("SIGINT"), exit_status("SIGTERM"), exit_status("SIGUSR1")) == (130, 143, 138)


@pytest.mark.slow
def test_an_interrupted_run_is_killed_not_failed_in_the_tracker(tmp_path):
    from x3d_exp.config import JobContext
    from x3d_exp.errors import Interrupted
    from x3d_exp.tracking import Tracker

    cfg = compose_config(f"mlflow.tracking_uri={store_uri(tmp_path)}")
    with pytest.raises(Interrupted):
        with Tracker(cfg, tmp_path / "run", JobContext()):
            raise Interrupted("SIGUSR1")
    (run,) = runs_of(store_uri(tmp_path))
    assert run.info.status == "KILLED" and run.data.tags["error"] == "stopped by SIGUSR1"
    assert run.info.end_time is not None


def test_a_first_signal_is_kept_for_the_step_boundary_and_a_second_ctrl_c_quits_at_once(tmp_path):
    script = ("import os, signal, time\n"
              "from x3d_exp.engine.interrupt import StopSignals\n"
              "with StopSignals() as signals:\n"
              "    signals.deferring = True\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(0.2)\n"
              "    print('kept', signals.requested, flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(5)\n"
              "print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=cli_env(tmp_path / "cache"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 130
    assert done.stdout.split() == ["kept", "SIGTERM"]
    assert "quitting without saving" in done.stderr and "Traceback" not in done.stderr
