"""The MLflow spool: records written to disk first, delivered in order and once, a tracking outage never fatal.

The fast tests deliver to a real sqlite store in process; the slow ones train through the real CLI against a real
`mlflow server` that is stopped, killed and restarted under the job.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.cli_helpers import (REPO, SHALLOW, TINY, MlflowServer, cli_env, compose_config, final_json, free_port,
                               metric_steps, run_cli, running, runs_of, store_uri)
from x3d_exp.config import JobContext
from x3d_exp.errors import Interrupted, NoSpace
from x3d_exp.tracking import Tracker
from x3d_exp.tracking.delivery import Delivery, sync
from x3d_exp.tracking.runs import close_orphaned_runs, spool_run
from x3d_exp.tracking.spool import OPS, Spool, register_op


def deliver_all(spool: Spool, uri: str) -> Delivery:
    delivery = Delivery(spool, uri)
    while delivery.step():
        pass
    return delivery


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One sqlite store for the module's in-process tests (creating one takes seconds); each test has its runs."""
    return store_uri(tmp_path_factory.mktemp("store"))


def spooled_run(tmp_path, steps=5, experiment="spool-tests") -> Spool:
    spool = Spool.in_dir(tmp_path / "run")
    spool_run(spool, "unused", experiment, "spooled", {"task": "train"})
    for step in range(1, steps + 1):
        spool.append("log_metrics", metrics=[["train/loss", 1.0 / step, 1000 + step, step]])
    return spool


def history(uri, run_id, key="train/loss"):
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_records_are_read_back_in_order_and_delivered_in_order(tmp_path, uri):
    spool = spooled_run(tmp_path)
    records, damaged = spool.read()
    assert [r.op for r in records] == ["create_run"] + ["log_metrics"] * 5 and damaged == []
    assert spool.metric_steps() == {"train/loss": 5}
    delivery = deliver_all(spool, uri)
    assert history(uri, delivery.run_id) == [(s, 1.0 / s) for s in range(1, 6)]
    assert spool.pending(uri) == 0 and deliver_all(spool, uri).run_id == delivery.run_id  # nothing sent twice
    assert history(uri, delivery.run_id) == [(s, 1.0 / s) for s in range(1, 6)]


def test_a_record_cut_short_mid_write_is_not_read_and_is_cut_off_before_the_next_append(tmp_path, capsys):
    spool = spooled_run(tmp_path, steps=2)
    with open(spool.path, "ab") as f:
        f.write(b'{"op": "log_metrics", "args": {"metr')
    assert len(spool.read()[0]) == 3
    spool.repair_tail()
    assert "cut short mid-write" in capsys.readouterr().err
    spool.append("log_metrics", metrics=[["train/loss", 0.25, 1003, 3]])
    records, damaged = spool.read()
    assert len(records) == 4 and damaged == [] and records[-1].args["metrics"][0][3] == 3


def test_a_full_disk_stops_spooling_with_one_line_and_keeps_every_whole_record(small_disk, uri):
    spool = spooled_run(small_disk, steps=2)
    filler = small_disk / "filler"
    with pytest.raises(OSError), open(filler, "wb") as f:
        while True:  # to the last byte: the file system's own ENOSPC
            f.write(b"\0" * 4096)
            f.flush()
    steps = [1, 2]
    with pytest.raises(NoSpace, match=r"^no space left on the disk of .*/mlflow_spool\.jsonl to record to MLflow"):
        for step in range(3, 300):  # the spool's last page has room for a few records more
            spool.append("log_metrics", metrics=[["train/loss", 1 / step, 1000 + step, step]])
            steps.append(step)
    filler.unlink()
    spool.repair_tail()  # what was written of the refused record is cut off
    step = steps[-1] + 1
    spool.append("log_metrics", metrics=[["train/loss", 1 / step, 1000 + step, step]])
    records, damaged = spool.read()
    assert damaged == [] and [r.args["metrics"][0][3] for r in records[1:]] == steps + [step]
    assert history(uri, deliver_all(spool, uri).run_id) == [(s, 1.0 / s) for s in steps + [step]]


def test_a_damaged_record_is_reported_in_one_line_and_the_rest_is_delivered(tmp_path, uri, capsys):
    spool = spooled_run(tmp_path, steps=2)
    with open(spool.path, "ab") as f:
        f.write(b"\x00garbage{\n")
    spool.append("log_metrics", metrics=[["train/loss", 0.25, 1003, 3]])
    delivery = deliver_all(spool, uri)
    err = [line for line in capsys.readouterr().err.splitlines() if "damaged record" in line]
    assert len(err) == 1 and str(spool.path) in err[0]
    assert [s for s, _ in history(uri, delivery.run_id)] == [1, 2, 3]


def test_a_kill_between_delivering_and_saving_the_offset_delivers_nothing_twice(tmp_path, uri):
    spool = spooled_run(tmp_path, steps=3, experiment="killed-between")
    delivery = deliver_all(spool, uri)
    # As if killed after the store took every record but before the offset was saved: the run is found again by
    # its key, and the metrics already there are not sent again.
    spool.state_path.write_text(json.dumps({uri: {"delivered": 0}}))
    spool.append("log_metrics", metrics=[["train/loss", 0.25, 1004, 4]])
    again = deliver_all(spool, uri)
    assert again.run_id == delivery.run_id
    assert [s for s, _ in history(uri, delivery.run_id)] == [1, 2, 3, 4]
    assert len(runs_of(uri, "killed-between")) == 1


def test_an_op_registers_in_one_line_and_is_delivered_with_the_run_id(tmp_path, uri):
    seen = []
    register_op("test_note", lambda client, run_id, **args: seen.append((run_id, args)))
    try:
        spool = spooled_run(tmp_path, steps=0)
        spool.append("test_note", text="hello", n=[1, 2])
        delivery = deliver_all(spool, uri)
        assert seen == [(delivery.run_id, {"text": "hello", "n": [1, 2]})]
    finally:
        del OPS["test_note"]


def tracker_config(tmp_path, uri, *overrides):
    return compose_config(f"mlflow.tracking_uri={uri}", "mlflow.drain_timeout=1", *overrides)


def test_with_the_server_away_logging_returns_at_once_and_sync_delivers_it_all_later(tmp_path, uri, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = tracker_config(tmp_path, dead)
    run_dir = tmp_path / "run"
    with Tracker(cfg, run_dir, JobContext(output_dir=run_dir)) as tracker:
        started = time.perf_counter()
        for step in range(1, 21):
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
        per_call = (time.perf_counter() - started) / 20
    err = capsys.readouterr().err.splitlines()
    warning = [line for line in err if line.startswith("warning: MLflow at")]
    assert len(warning) == 1 and "records wait in" in warning[0] and f"sync.path={run_dir.resolve()}" in warning[0]
    assert per_call < 0.1, f"{per_call * 1000:.1f} ms per logging call while the server is away"
    spool = Spool.in_dir(run_dir)
    sent, left, run_id = sync(spool, uri, timeout=30)
    assert left == 0 and sent == len(spool.read()[0])
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "x3d_xs"
    assert [s for s, _ in history(uri, run_id)] == list(range(1, 21))
    assert sync(spool, uri, timeout=30)[:2] == (0, 0)  # idempotent


def test_a_signal_ends_the_run_killed_and_an_error_failed(tmp_path, uri):
    cfg = tracker_config(tmp_path, uri)
    for name, error, status in (("a", Interrupted("SIGINT"), "KILLED"), ("b", RuntimeError("boom"), "FAILED")):
        run_dir = tmp_path / name
        with pytest.raises(type(error)):
            with Tracker(cfg, run_dir, JobContext(output_dir=run_dir)):
                raise error
        run = MlflowClient(uri).get_run((run_dir / "mlflow_run_id").read_text())
        assert run.info.status == status
        assert run.data.tags["error"] == ("stopped by SIGINT" if status == "KILLED" else "RuntimeError: boom")


def test_a_resume_skips_the_steps_the_killed_job_spooled_even_undelivered(tmp_path, uri):
    cfg = tracker_config(tmp_path, uri)
    run_dir = tmp_path / "run"
    spool = Spool.in_dir(run_dir)
    first = Tracker(cfg, run_dir, JobContext(output_dir=run_dir))
    first.__enter__()
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": 1.0 / step}, step)
    first.sender.stop()  # killed: nothing closes the run; steps 1-3 may or may not be delivered
    first.sender.lock.release()
    with Tracker(cfg, run_dir, JobContext(output_dir=run_dir), resume=True) as resumed:
        for step in (2, 3, 4):  # training replays 2 and 3 from its last checkpoint
            resumed.log_metrics({"train/loss": 1.0 / step}, step)
    run_id = (run_dir / "mlflow_run_id").read_text()
    assert [s for s, _ in history(uri, run_id)] == [1, 2, 3, 4]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert [r.op for r in spool.read()[0]].count("create_run") == 1


def test_a_sweep_job_gets_its_child_run_as_a_value_and_its_user_error_is_recorded(tmp_path, uri):
    from x3d_exp.errors import ConfigError
    from x3d_exp.tracking.sweeps import run_job

    cfg = tracker_config(tmp_path, uri)
    sweep = tmp_path / "sweep"
    parent = Spool.in_dir(sweep)
    spool_run(parent, uri, "x3d-exp", "the sweep", {})
    parent.append("log_params", params={"model.gamma_d": "2.2"})
    parent_id = deliver_all(parent, uri).run_id
    seen = []

    def task(composed, job):
        seen.append(job.adopted_run)
        raise ConfigError("model.gamma_d=-1.0: must be > 0")

    outcome = run_job(task, cfg, JobContext(output_dir=sweep / "0", multirun=True, job_num=0, sweep_dir=sweep))
    assert seen == [sweep / "0" / "mlflow_spool.jsonl"]
    assert outcome["status"] == "FAILED" and outcome["error"] == "ConfigError: model.gamma_d=-1.0: must be > 0"
    run = MlflowClient(uri).get_run(outcome["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.tags["error"] == outcome["error"]


# --- a real mlflow server, stopped and restarted under a real training job -------------------------------------

def train(work: Path, cache: Path, url: str, *extra: str) -> subprocess.Popen:
    args = [*TINY, *SHALLOW, f"hydra.run.dir={work / 'run'}", f"mlflow.tracking_uri={url}", *extra]
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=work, env=cli_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def spooled_steps(run_dir: Path, key="train/loss") -> list:
    """(step, value, record time) of each value of `key` the job spooled: step metrics, and the test and val metrics
    that the trained model's record links to it (step 0)."""
    steps = []
    for r in Spool.in_dir(run_dir).read()[0]:
        if r.op == "log_metrics":
            steps += [(m[3], m[1], r.time) for m in r.args["metrics"] if m[0] == key]
        elif r.op == "log_trained_model" and key in r.args["metrics"]:
            steps.append((0, r.args["metrics"][key], r.time))
    return steps


def wait_for_steps(proc, run_dir: Path, count: int, timeout: float = 600):
    deadline = time.time() + timeout
    while len(spooled_steps(run_dir)) < count:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the job logged too few steps"
        time.sleep(0.2)


def step_seconds(run_dir: Path, start: float, end: float) -> tuple:
    """Median seconds per step (from the job's own train/clips_per_s, batch 4) inside and outside [start, end]."""
    import statistics

    rows = [(t, 4.0 / v) for _, v, t in spooled_steps(run_dir, "train/clips_per_s")]
    inside = [s for t, s in rows if start <= t <= end]
    outside = [s for t, s in rows[1:] if not start <= t <= end]  # the first step includes the graph compile
    assert inside, f"no step was spooled during the outage: the {len(rows)} steps were all before or after it"
    return statistics.median(inside), statistics.median(outside), len(inside), len(outside)


@pytest.mark.slow
def test_a_server_stopped_mid_run_for_longer_than_the_client_retries_loses_nothing(tmp_path, cache):
    work = tmp_path
    uri = store_uri(work)
    with running(MlflowServer(uri, work)) as srv:
        # 6 epochs of 4 steps: the job has steps left after the stop even when this process polls late under load
        # (once, with 4 epochs, every step was spooled before the stop and none fell inside the outage).
        proc = train(work, cache, srv.url, "trainer.epochs=6", "mlflow.drain_timeout=600")
        wait_for_steps(proc, work / "run", 7)
        down = time.time()
        srv.stop()
        # The client's own budget is no retry (x3d_exp.env); MLflow's default is 7 retries, minutes.
        wait_for_steps(proc, work / "run", 10)
        time.sleep(max(0.0, 20 - (time.time() - down)))
        up = time.time()
        srv.start()
        out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    (run,) = runs_of(uri)
    assert run.info.status == "FINISHED"
    steps = [s for s, _, _ in spooled_steps(work / "run")]
    assert sorted(steps) == list(range(1, 25))  # 16 videos / batch 4 = 4 steps per epoch, 6 epochs
    for key in ("train/loss", "train/lr", "val/top1"):
        got = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, key)]
        assert len(got) == len(set(got)), f"{key}: a step delivered twice: {got}"
    assert [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")] == steps
    assert final_json(out)["run_id"] == run.info.run_id
    during, normal, n_in, n_out = step_seconds(work / "run", down, up)
    print(f"\nstep time: {during:.3f} s median over {n_in} steps with the server down, {normal:.3f} s over {n_out} "
          f"with it up (outage {up - down:.0f} s)")
    assert during < 3 * normal + 1.0


@pytest.mark.slow
def test_a_server_that_never_returns_costs_one_warning_and_sync_to_a_new_server_delivers_everything(tmp_path,
                                                                                                 cache):
    work = tmp_path
    with running(MlflowServer(store_uri(work), work)) as srv:
        proc = train(work, cache, srv.url, "trainer.epochs=2", "mlflow.drain_timeout=3")
        wait_for_steps(proc, work / "run", 2)
        srv.stop()
        out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if line.startswith("warning: MLflow at")]
    assert len(warnings) == 1, err[-3000:]
    command = warnings[0].split("deliver them with: ")[1]
    assert command == f"python run.py task=sync sync.path={(work / 'run').resolve()}"
    fresh = work / "fresh"
    fresh.mkdir()
    with running(MlflowServer(store_uri(fresh), fresh)) as new:
        done = run_cli(["task=sync", f"sync.path={work / 'run'}", f"mlflow.tracking_uri={new.url}",
                        f"hydra.run.dir={work / 'sync'}"], cwd=work, cache=cache)
        assert done.returncode == 0, done.stderr[-3000:]
        again = run_cli(["task=sync", f"sync.path={work}", f"mlflow.tracking_uri={new.url}",
                         f"hydra.run.dir={work / 'sync2'}"], cwd=work, cache=cache)
        assert again.returncode == 0 and final_json(again.stdout)["delivered"] == 0, again.stderr[-3000:]
        (run,) = runs_of(new.url)
        client = MlflowClient(new.url)  # artifacts are served by the server only
        assert {"model_summary.txt", "per_class_accuracy.json"} <= {a.path for a in client.list_artifacts(
            run.info.run_id)}
    assert run.info.status == "FINISHED"
    client = MlflowClient(store_uri(fresh))
    for key in ("train/loss", "train/clips_per_s", "val/top1", "test/top1"):
        spooled = [(s, v) for s, v, _ in spooled_steps(work / "run", key)]
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] == spooled, key


def _store_has_a_step(client) -> bool:
    experiment = client.get_experiment_by_name("x3d-exp")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "train/loss"))


@pytest.mark.slow
def test_a_job_killed_during_an_outage_is_closed_killed_and_its_resume_finishes_the_run_with_every_step_once(
        tmp_path, cache):
    """kill -9 mid-run while the server is down. The store holds the run as the sender left it, RUNNING, with the
    dead process as its owner; the next run opened in the experiment closes it KILLED. `resume=auto` then finishes
    the planned epochs in the same run: the steps the killed job spooled but never delivered arrive, those it
    logged past its last checkpoint are replayed but not logged twice, one value per step, no gap."""
    work = tmp_path
    uri = store_uri(work)
    client = MlflowClient(uri)
    with running(MlflowServer(uri, work)) as srv:
        proc = train(work, cache, srv.url, "trainer.epochs=3")
        # The run and its first steps reach the store before the outage.
        deadline = time.time() + 600
        while not _store_has_a_step(client):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        srv.stop()
        while not list((work / "run" / "checkpoints").glob("epoch0001.ckpt")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        wait_for_steps(proc, work / "run", 5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        killed_at = spooled_steps(work / "run")
        assert not (work / "run" / "checkpoints" / "epoch0003.ckpt").exists(), "the run finished before the kill"
        (killed,) = runs_of(uri)
        assert killed.info.status == "RUNNING" and killed.data.tags["owner_pid"] == str(proc.pid)
        delivered = [m.step for m in client.get_metric_history(killed.info.run_id, "train/loss")]
        assert len(delivered) < len(killed_at), "nothing was left undelivered by the outage"
        assert close_orphaned_runs(client, killed.info.experiment_id) == [killed.info.run_id]
        (closed,) = runs_of(uri)
        assert closed.info.status == "KILLED" and f"process {proc.pid}" in closed.data.tags["error"]
        srv.start()
        resumed = train(work, cache, srv.url, "trainer.epochs=3", "resume=auto")
        out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from" in out
    result = final_json(out)
    assert result["epochs"] == 3 and result["run_id"] == killed.info.run_id
    (run,) = runs_of(uri)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert "error" not in run.data.tags and run.data.tags["owner_pid"] != str(proc.pid)
    for key in run.data.metrics:
        steps = metric_steps(uri, run.info.run_id, key)
        assert len(steps) == len(set(steps)), f"{key} has two values at one step: {sorted(steps)}"
    # 16 videos / batch 4 = 4 steps an epoch, 3 epochs: the killed job's and the resume's, each once.
    assert metric_steps(uri, run.info.run_id, "train/loss") == list(range(1, 13))
    assert sorted(metric_steps(uri, run.info.run_id, "val/top1")) == [4, 8, 12]
    history = json.loads((work / "run" / "checkpoints" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert len(killed_at) >= 5
