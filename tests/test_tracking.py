"""MLflow records: run ownership, failed and interrupted runs, orphans, and a real `mlflow server` serving them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.cli_helpers import REPO, SHALLOW, TINY, cli_env, run_cli, runs_of, store_uri


def test_only_runs_whose_process_is_gone_from_this_host_are_closed_killed(tmp_path):
    from mlflow.tracking import MlflowClient
    from x3d_exp.tracking.runs import close_orphaned_runs, experiment_id, open_run

    client = MlflowClient(store_uri(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    experiment = experiment_id(client, "orphans")
    orphan = client.create_run(experiment, tags={"owner_host": socket.gethostname(), "owner_pid": str(gone.pid)})
    remote = client.create_run(experiment, tags={"owner_host": "another-host", "owner_pid": str(gone.pid)})
    live = open_run(client, "orphans", "live", {})
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert client.get_run(remote.info.run_id).info.status == "RUNNING"  # cannot be checked from here
    assert client.get_run(live).info.status == "RUNNING"
    assert client.get_run(live).data.tags["owner_pid"] == str(os.getpid())
    assert close_orphaned_runs(client, experiment) == []


def test_a_run_that_fails_is_marked_failed(cache, tmp_path):
    done = run_cli(TINY + ["trainer.epochs=1", f"ckpt={tmp_path / 'no_such.ckpt'}", f"hydra.run.dir={tmp_path / 'run'}",
                           f"mlflow.tracking_uri={store_uri(tmp_path)}"], cwd=tmp_path, cache=cache)
    assert done.returncode != 0
    assert "no_such.ckpt" in done.stderr.strip().splitlines()[-1] and "Traceback" not in done.stderr
    (run,) = runs_of(store_uri(tmp_path))
    assert run.info.status == "FAILED" and "no_such.ckpt" in run.data.tags["error"]


def test_an_interrupted_run_is_marked_failed(cache, tmp_path):
    uri = store_uri(tmp_path)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *TINY, *SHALLOW, "trainer.epochs=50",
                             f"hydra.run.dir={run_dir}", f"mlflow.tracking_uri={uri}"],
                            cwd=tmp_path, env=cli_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "epoch0001.ckpt").exists() and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) != 0
    (run,) = runs_of(uri)
    assert run.info.status == "FAILED" and "KeyboardInterrupt" in run.data.tags["error"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_server_serves_the_run_and_its_test_top1(trained, tmp_path):
    work, result, _ = trained
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri(work),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/experiments/get-by-name?experiment_name=x3d-exp", timeout=2) as r:
                    experiment = json.load(r)["experiment"]
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not come up"
                time.sleep(0.5)
        query = json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode()
        request = urllib.request.Request(f"{base}/runs/search", data=query,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            runs = json.load(r)["runs"]
        (run,) = [r for r in runs if r["info"]["run_id"] == result["run_id"]]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert run["info"]["status"] == "FINISHED"
        assert metrics["test/top1"] == pytest.approx(result["test_top1"])
    finally:
        server.terminate()
        server.wait(timeout=30)
