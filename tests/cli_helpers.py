"""Running the real `run.py` CLI in tests: tiny settings, a private data cache and a private sqlite store."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]

# The synthetic set shrunk to 16 short training videos; the clip still follows the model (for sweeps over it).
TINY_DATA = ["data.synthetic.train_per_class=4", "data.synthetic.val_per_class=2", "data.synthetic.test_per_class=2",
             "data.synthetic.frames=24", "data.batch_size=4", "data.num_workers=0", "data.test_num_clips=1",
             "trainer.log_every=1"]
# X3D-XS unchanged, on 32x32 crops of that set, so a job takes seconds.
TINY = TINY_DATA + ["data.synthetic.size=40", "data.crop_size=32", "data.test_crop_size=32", "data.train_scale=[32,40]"]
# For jobs that check orchestration (sweeps, msrun) rather than the network: X3D-XS at depth factor 1 instead of 2.2
# (11 blocks instead of 26). MindSpore's graph compile, most of a tiny job's time, shrinks with the block count.
SHALLOW = ["model.gamma_d=1.0"]


def cli_env(cache: Path) -> dict:
    env = dict(os.environ)
    env["X3D_EXP_CACHE"] = str(cache)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: List[str], *, cwd: Path, cache: Path, timeout: float = 600,
            env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """`run.py args` in `cwd` with the test cache (and the variables of `env` on top of ours)."""
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env={**cli_env(cache), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def multirun(work: Path, cache: Path, *args: str, shallow: bool = True,
             clip_follows_model: bool = False) -> subprocess.CompletedProcess:
    """`run.py -m` with the tiny settings (and the shallow XS unless told), one epoch, sweep dir `work/sweep`.
    `clip_follows_model`: the tiny set without the 32x32 crops, for sweeps whose jobs differ in their clips."""
    tiny = TINY_DATA if clip_follows_model else TINY
    return run_cli(["-m", *tiny, *(SHALLOW if shallow else []), "trainer.epochs=1", f"hydra.sweep.dir={work / 'sweep'}",
                    f"mlflow.tracking_uri={store_uri(work)}", *args], cwd=work, cache=cache, timeout=900)


def final_json(stdout: str) -> dict:
    """The JSON object on the last non-empty stdout line (every task ends with one)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output on stdout"
    return json.loads(lines[-1])


def store_uri(directory: Path) -> str:
    """A private sqlite store in `directory`. A new one starts as a copy of an empty store that MLflow created
    (schema migrations and all) once per test process: MLflow takes 1.5-8 s to migrate a new file, and the suite
    makes dozens."""
    db = Path(directory) / "mlflow.db"
    if not db.exists():
        Path(directory).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), db)
    return f"sqlite:///{db}"


_EMPTY_STORE: Optional[Path] = None


def _empty_store() -> Path:
    global _EMPTY_STORE
    if _EMPTY_STORE is None:
        from mlflow.tracking import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="x3d-exp-empty-store-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()  # creates and migrates the file
        _EMPTY_STORE = folder / "mlflow.db"
    return _EMPTY_STORE


def runs_of(uri: str, experiment: str = "x3d-exp", filter_string: str = "") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {uri}"
    return client.search_runs([found.experiment_id], filter_string=filter_string, max_results=1000)


def metric_steps(uri: str, run_id: str, key: str) -> List[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


def artifact_paths(uri: str, run_id: str, path: Optional[str] = None) -> List[str]:
    """Every artifact file of a run, recursively, as relative paths."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(artifact_paths(uri, run_id, info.path) if info.is_dir else [info.path])
    return out


def compose_config(*overrides: str, return_hydra_config: bool = False):
    """The run's config as run.py composes it from conf/ (with the schema registered), for tests that need no CLI."""
    from hydra import compose, initialize_config_dir

    from x3d_exp.config import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf"), job_name="test"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_answers(server: subprocess.Popen, url: str, timeout: float = 120, output=None) -> None:
    """Wait for `url` to answer while `server` runs; fail with its output (`output()`, else its stderr pipe) if it
    ends first."""
    deadline = time.time() + timeout
    while True:
        assert server.poll() is None, output() if output else server.stderr.read().decode()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert time.time() < deadline, f"{url} did not answer within {timeout} s"
            time.sleep(0.5)


class MlflowServer:
    """A real `mlflow server` over the store `uri` on one loopback port, which can be killed and started again on
    the same port (a restart, a maintenance window). Its output goes to `mlflow_server.log` in `cwd`."""

    def __init__(self, uri: str, cwd: Path, port: int = 0):
        self.uri, self.cwd, self.port = uri, Path(cwd), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "MlflowServer":
        log = open(self.cwd / "mlflow_server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.uri,
                                      "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                                     cwd=self.cwd, stdout=log, stderr=log, start_new_session=True)
        log.close()
        wait_until_answers(self.proc, f"{self.url}/health", 180,
                           output=lambda: (self.cwd / "mlflow_server.log").read_text()[-3000:])
        return self

    def stop(self) -> None:
        """The server and its workers at once (its own process group), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@contextmanager
def mlflow_server(uri: str, cwd: Path, port: int = 0):
    """A real `mlflow server` on a free loopback port over the store `uri`; yields its base URL once it answers."""
    with running(MlflowServer(uri, cwd, port)) as server:
        yield server.url


@contextmanager
def running(server: MlflowServer):
    """The server started, and stopped at the end whatever happened."""
    try:
        yield server.start()
    finally:
        server.stop()
