"""`task=ui`: MLflow's UI on the configured store, opened where runs and models are compared.

    python run.py task=ui [mlflow.tracking_uri=sqlite:///elsewhere/mlflow.db]

Starts `mlflow server` on the store, on a free local port, and prints the experiment's address in the model-training
view (MLflow 3's UI otherwise opens on its GenAI overview). Opens a browser where there is a display. Ctrl+C (or
SIGTERM) stops the server; the job then ends with its one result line, exit status 0. The server's own log goes to
`<run dir>/mlflow_server.log`. An `http(s)://` store is a server already: its address is printed, nothing started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import webbrowser

from omegaconf import DictConfig

from x3d_exp.config import JobContext
from x3d_exp.errors import UserError

SERVER_LOG = "mlflow_server.log"
START_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def experiment_address(base: str, experiment: str) -> str:
    return f"{base}/#/experiments/{experiment}?workflowType=machine_learning"


def _has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _wait_until_up(server: subprocess.Popen, base: str, log_path) -> None:
    deadline = time.time() + START_TIMEOUT
    while True:
        if server.poll() is not None:
            lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
            raise UserError(f"mlflow server exited with status {server.returncode}: "
                            f"{lines[-1] if lines else 'no output'} (log: {log_path})")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return
        except OSError:
            if time.time() > deadline:
                raise UserError(f"mlflow server did not answer within {START_TIMEOUT} s (log: {log_path})") from None
            time.sleep(0.5)


def task_ui(cfg: DictConfig, job: JobContext = JobContext()) -> dict:
    from mlflow.tracking import MlflowClient

    from x3d_exp.tracking.runs import display_uri, experiment_id

    uri = str(cfg.mlflow.tracking_uri)
    # The experiment exists before the first run, so the address always opens it (and its artifacts are set).
    experiment = experiment_id(MlflowClient(uri), str(cfg.mlflow.experiment_name))
    if uri.startswith(("http://", "https://")):
        address = experiment_address(uri.rstrip("/"), experiment)
        print(f"MLflow UI of experiment {cfg.mlflow.experiment_name}: {address}", flush=True)
        return {"task": "ui", "url": address, "started_server": False}
    port = free_port()
    address = experiment_address(f"http://127.0.0.1:{port}", experiment)
    job.output_dir.mkdir(parents=True, exist_ok=True)
    log_path = job.output_dir / SERVER_LOG
    started = time.time()
    with open(log_path, "w") as log:
        # Its own session: a Ctrl+C in the terminal reaches this process only, which stops the server in order.
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", display_uri(uri),
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        _wait_until_up(server, f"http://127.0.0.1:{port}", log_path)
        print(f"MLflow UI of experiment {cfg.mlflow.experiment_name}: {address} (Ctrl+C stops it)", flush=True)
        if _has_display():
            webbrowser.open(address)
        server.wait()
        raise UserError(f"mlflow server exited with status {server.returncode} (log: {log_path})")
    except KeyboardInterrupt as interrupt:
        stopped_by = str(interrupt) or "SIGINT"
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return {"task": "ui", "url": address, "stopped_by": stopped_by, "seconds": round(time.time() - started, 1)}
