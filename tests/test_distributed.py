"""Two CPU ranks under a real msrun (mccl), started through the real CLI with `launcher=distributed_cpu`."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.cli_helpers import REPO, SHALLOW, TINY, cli_env, final_json, run_cli, runs_of, store_uri
from x3d_exp.distributed.msrun import STOP_GRACE_S

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distributed(work: Path, *extra: str) -> list:
    return TINY + SHALLOW + ["launcher=distributed_cpu", "launcher.nproc=2", f"launcher.master_port={free_port()}",
                             "trainer.epochs=1", f"hydra.run.dir={work / 'run'}",
                             f"mlflow.tracking_uri={store_uri(work)}", *extra]


@pytest.fixture(scope="session")
def msrun_run(tmp_path_factory, cache):
    work = tmp_path_factory.mktemp("dist")
    # Precise BN on too: each rank takes its shard's statistics, then the ranks average them.
    done = run_cli(distributed(work, "trainer.precise_bn_batches=2"), cwd=work, cache=cache)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work, final_json(done.stdout)


def test_both_ranks_end_with_identical_parameters(msrun_run):
    work, _ = msrun_run
    digests = {json.loads(p.read_text())["rank"]: json.loads(p.read_text())["params_sha256"]
               for p in (work / "run" / "ranks").glob("rank*.json")}
    assert sorted(digests) == [0, 1]
    assert digests[0] == digests[1]
    logs = work / "run" / "msrun_logs"
    assert {p.name for p in logs.iterdir()} >= {"scheduler.log", "worker_0.log", "worker_1.log"}
    assert "rank 1 of 2 joined (mccl)" in (logs / "worker_1.log").read_text()
    assert "BN statistics from 2 training batches" in (logs / "worker_1.log").read_text()


def test_one_finished_mlflow_run_with_world_size_2_and_rank_0_files_only(msrun_run):
    work, result = msrun_run
    assert result["task"] == "train" and result["world_size"] == 2 and result["test_videos"] == 8
    (run,) = runs_of(store_uri(work))
    assert run.info.status == "FINISHED" and run.info.run_id == result["run_id"]
    assert run.data.params["world_size"] == "2" and run.data.params["launcher.name"] == "distributed_cpu"
    assert run.data.metrics["test/top1"] == pytest.approx(result["test_top1"])
    checkpoints = sorted(p.name for p in (work / "run" / "checkpoints").iterdir())
    assert checkpoints == ["best.ckpt", "epoch0001.ckpt", "history.json"]
    # Rank 1 keeps to its msrun log; the run's own log is the launcher's and rank 0's.
    run_log = (work / "run" / "run.log").read_text()
    assert "rank 0 of 2 joined" in run_log and "rank 1" not in run_log


def test_test_top1_equals_a_single_process_test_of_the_checkpoint(msrun_run, cache):
    work, result = msrun_run
    single = work / "single"
    done = run_cli(TINY + SHALLOW + ["task=test", f"ckpt={work / 'run' / 'checkpoints' / 'best.ckpt'}",
                                     f"hydra.run.dir={single}", f"mlflow.tracking_uri={store_uri(single)}"],
                   cwd=work, cache=cache)
    assert done.returncode == 0, done.stderr[-3000:]
    alone = final_json(done.stdout)
    assert alone["world_size"] == 1 and alone["test_videos"] == result["test_videos"]
    assert alone["test_top1"] == result["test_top1"] and alone["test_top5"] == result["test_top5"]
    # The mean log-loss over all views is sensitive to every video's scores, not just to the winning class.
    (two_ranks,), (one,) = runs_of(store_uri(work)), runs_of(store_uri(single))
    assert two_ranks.data.metrics["test/loss"] == pytest.approx(one.data.metrics["test/loss"], rel=1e-5)


def _ranks(launcher: psutil.Process) -> dict:
    """{rank: process} of the ranks msrun started: its children running run.py as MS_WORKER.

    Their own children (the kernel compiler, say) and msrun itself carry the same environment variables.
    """
    found = {}
    for msrun in launcher.children():
        try:
            below = msrun.children()
        except psutil.NoSuchProcess:  # a short-lived child of the launcher, gone between the two listings
            continue
        for proc in below:
            try:
                env, cmdline = proc.environ(), proc.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if env.get("MS_ROLE") == "MS_WORKER" and any(arg.endswith("run.py") for arg in cmdline):
                found[int(env["RANK_ID"])] = proc
    return found


def _start(work: Path, cache: Path, *extra: str):
    """The launcher, and every process below it once both ranks run (to check that none outlives the run)."""
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *distributed(work, *extra)], cwd=work,
                            env=cli_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    launcher = psutil.Process(proc.pid)
    deadline = time.time() + 120
    while len(_ranks(launcher)) < 2:
        assert proc.poll() is None and time.time() < deadline, "msrun did not start two ranks"
        time.sleep(0.2)
    return proc, launcher.children(recursive=True)


def _survivors(tree: list) -> list:
    _, alive = psutil.wait_procs(tree, timeout=5)
    return alive


def test_a_rank_that_dies_fails_the_run_cleanly(tmp_path, cache):
    proc, tree = _start(tmp_path, cache)
    worker_log = tmp_path / "run" / "msrun_logs" / "worker_1.log"
    deadline = time.time() + 300
    while "joined" not in (worker_log.read_text() if worker_log.is_file() else ""):
        assert proc.poll() is None and time.time() < deadline, "rank 1 never joined"
        time.sleep(0.5)
    _ranks(psutil.Process(proc.pid))[1].kill()
    killed = time.time()
    _, err = proc.communicate(timeout=120)
    # msrun's scheduler alone would wait out its node timeout (30-120 s) for the killed rank.
    assert proc.returncode == 2 and time.time() - killed < 30
    assert re.search(r"error: distributed run failed \(rank process \d+ exited with status -9\)", err), err[-2000:]
    (run,) = runs_of(store_uri(tmp_path))
    assert run.info.status == "FAILED" and "exited with status -9" in run.data.tags["error"]
    assert not _survivors(tree)


def test_the_launcher_timeout_stops_every_rank(tmp_path, cache):
    # Long enough for the cluster to form (its start-up is bounded by the same timeout), far shorter than 50 epochs.
    started = time.time()
    proc, tree = _start(tmp_path, cache, "launcher.timeout=30", "trainer.epochs=50")
    _, err = proc.communicate(timeout=300)
    # The timeout, then at most the grace period msrun and the ranks get before SIGKILL, then closing the run.
    assert time.time() - started < 30 + STOP_GRACE_S + 30
    assert proc.returncode == 2 and "launcher.timeout=30s passed" in err
    (run,) = runs_of(store_uri(tmp_path))
    assert run.info.status == "FAILED"
    assert not _survivors(tree)
