"""Engine tests: real training steps through the real CLI, a real sqlite MLflow store, a real `mlflow server`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from tests.cli_helpers import (REPO, TINY, artifact_paths, cli_env, final_json, metric_steps, run_cli, runs_of,
                               store_uri)
from x3d_exp.config import register_configs, validate

register_configs()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """One finished 2-epoch training run, shared by the tests that inspect what it left behind."""
    work = tmp_path_factory.mktemp("train")
    done = run_cli(TINY + ["trainer.epochs=2", "schedule.warmup_epochs=1", "trainer.precise_bn_batches=2",
                           f"hydra.run.dir={work / 'run'}", f"mlflow.tracking_uri={store_uri(work)}"],
                   cwd=work, cache=cache)
    assert done.returncode == 0, done.stderr[-3000:]
    return work, final_json(done.stdout), done


def test_train_run_is_finished_with_params_metrics_and_artifacts(trained):
    work, result, done = trained
    for key in ("task", "run_id", "model", "params", "val_top1", "test_top1", "test_top5", "epochs", "seconds",
                "world_size"):
        assert key in result
    assert result["task"] == "train" and result["epochs"] == 2 and result["model"] == "x3d_xs"
    assert "mlflow ui --backend-store-uri sqlite:///" in done.stdout
    assert (done.stdout + done.stderr).count("BN statistics from 2 training batches") == 2  # once per epoch
    uri = store_uri(work)
    (run,) = runs_of(uri)
    assert run.info.run_id == result["run_id"] and run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.gamma_w"] == "1.0" and params["optim.lr"] == "0.05" and params["data.batch_size"] == "4"
    assert int(params["model_params"]) == result["params"] and float(params["model_gmacs"]) > 0
    assert run.data.tags["task"] == "train" and "data.batch_size=4" in run.data.tags["hydra_overrides"]
    # 16 training videos in batches of 4, logged every step: one loss per step over both epochs.
    assert metric_steps(uri, run.info.run_id, "train/loss") == list(range(1, 9))
    assert metric_steps(uri, run.info.run_id, "val/top1") == [4, 8]
    for key in ("train/lr", "train/clips_per_s", "val/loss", "val/top5", "data/bad_videos"):
        assert key in run.data.metrics
    assert run.data.metrics["test/top1"] == pytest.approx(result["test_top1"])
    artifacts = artifact_paths(uri, run.info.run_id)
    for expected in (".hydra/config.yaml", ".hydra/overrides.yaml", "checkpoints/best.ckpt",
                     "checkpoints/epoch0002.ckpt", "plots/learning_curves.png", "plots/per_class_accuracy.png",
                     "model_summary.txt", "per_class_accuracy.json"):
        assert expected in artifacts, artifacts


def test_learning_rate_follows_warmup_then_cosine(trained):
    work, result, _ = trained
    from mlflow.tracking import MlflowClient

    rates = [m.value for m in sorted(MlflowClient(store_uri(work)).get_metric_history(result["run_id"], "train/lr"),
                                     key=lambda m: m.step)]
    # One warmup epoch (4 steps) from lr/10 up to lr, then a falling half-cosine.
    assert rates[0] == pytest.approx(0.005)
    assert rates[:5] == sorted(rates[:5]) and rates[4] == pytest.approx(0.05)
    assert rates[4:] == sorted(rates[4:], reverse=True) and rates[-1] < 0.05


def test_test_task_on_the_best_checkpoint_reproduces_the_final_test(trained, cache, tmp_path):
    work, result, _ = trained
    best = work / "run" / "checkpoints" / "best.ckpt"
    done = run_cli(TINY + ["task=test", f"ckpt={best}", f"hydra.run.dir={tmp_path / 'run'}",
                           f"mlflow.tracking_uri={store_uri(tmp_path)}"], cwd=tmp_path, cache=cache)
    assert done.returncode == 0, done.stderr[-3000:]
    tested = final_json(done.stdout)
    assert tested["task"] == "test" and tested["test_top1"] == pytest.approx(result["test_top1"])
    (run,) = runs_of(store_uri(tmp_path))
    assert run.info.status == "FINISHED" and run.data.metrics["test/top1"] == pytest.approx(result["test_top1"])


def test_resume_after_kill_finishes_the_planned_epochs_in_the_same_run(cache, tmp_path):
    run_dir = tmp_path / "run"
    uri = store_uri(tmp_path)
    args = TINY + ["trainer.epochs=3", f"hydra.run.dir={run_dir}", f"mlflow.tracking_uri={uri}"]
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=tmp_path, env=cli_env(cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    first = run_dir / "checkpoints" / "epoch0001.ckpt"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read().decode()[-3000:]
    assert not (run_dir / "checkpoints" / "epoch0003.ckpt").exists(), "the run finished before it was killed"
    (killed,) = runs_of(uri)
    # kill -9 leaves no chance to close it; the next run opened in the experiment sees its process is gone.
    assert killed.info.status == "RUNNING" and killed.data.tags["owner_pid"] == str(proc.pid)
    from mlflow.tracking import MlflowClient
    from x3d_exp.tracking import close_orphaned_runs

    assert close_orphaned_runs(MlflowClient(uri), killed.info.experiment_id) == [killed.info.run_id]
    (closed,) = runs_of(uri)
    assert closed.info.status == "KILLED" and f"process {proc.pid}" in closed.data.tags["error"]

    done = run_cli(args + ["resume=auto"], cwd=tmp_path, cache=cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    result = final_json(done.stdout)
    assert result["epochs"] == 3 and result["run_id"] == killed.info.run_id
    (run,) = runs_of(uri)
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed") == "true"
    assert "error" not in run.data.tags and run.data.tags["owner_pid"] != str(proc.pid)
    # Steps may repeat where the killed epoch is replayed, but the axis has no gap and reaches the planned end.
    assert sorted(set(metric_steps(uri, run.info.run_id, "train/loss"))) == list(range(1, 13))
    assert sorted(set(metric_steps(uri, run.info.run_id, "val/top1"))) == [4, 8, 12]
    history = json.loads((run_dir / "checkpoints" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch*.ckpt")) == ["epoch0002.ckpt",
                                                                                     "epoch0003.ckpt"]
    # The optimizer's step counter, which indexes the per-iteration lr, came back from the checkpoint too.
    import mindspore as ms

    state = ms.load_checkpoint(str(run_dir / "checkpoints" / "epoch0003.ckpt"))
    assert state["global_step"].asnumpy().item() == 12 and state["epoch"].asnumpy().item() == 3


def test_resume_auto_in_a_new_run_dir_names_the_newest_unfinished_run(tmp_path, capsys):
    from x3d_exp.engine import resolve_resume

    day = tmp_path / "outputs" / "2026-11-26"

    def run_dir(name, saved, planned, mtime):
        run = day / name
        (run / ".hydra").mkdir(parents=True)
        (run / "checkpoints").mkdir()
        (run / ".hydra" / "config.yaml").write_text(f"trainer:\n  epochs: {planned}\n")
        ckpt = run / "checkpoints" / f"epoch{saved:04d}.ckpt"
        ckpt.write_bytes(b"")
        os.utime(ckpt, (mtime, mtime))
        return run

    older = run_dir("05-00-00", 3, 20, 1000)
    finished = run_dir("05-10-00", 20, 20, 3000)
    newer = run_dir("05-20-00", 7, 20, 2000)
    fresh = day / "05-30-00"
    assert resolve_resume("auto", fresh) == (fresh, None)
    said = capsys.readouterr().out
    assert "starting from scratch" in said and f"resume={newer} " in said and "epoch 7 of 20" in said
    assert str(older) not in said and str(finished) not in said


def test_only_runs_whose_process_is_gone_from_this_host_are_closed_killed(tmp_path):
    from mlflow.tracking import MlflowClient
    from x3d_exp.tracking import close_orphaned_runs, experiment_id, open_run

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
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *TINY, "trainer.epochs=50",
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


@pytest.mark.parametrize("overrides, named", [
    (["model=x3d_q"], "model=x3d_q"),
    (["optim.lr=-0.1"], "optim.lr"),
    (["data.batch_size=0"], "data.batch_size"),
    (["model.gamma_d=abc"], "model.gamma_d"),
    (["model.gamma_d=-1"], "model.gamma_d"),
    (["model.no_such_key=1"], "model.no_such_key"),
    (["optim.clip_grad_norm=0"], "optim.clip_grad_norm"),
    (["data=k400"], "data.root"),
    (["data=k400", "data.root=/no/such/k400"], "/no/such/k400"),
])
def test_bad_overrides_exit_non_zero_with_one_line(overrides, named, cache, tmp_path):
    done = run_cli(overrides + [f"hydra.run.dir={tmp_path / 'run'}", f"mlflow.tracking_uri={store_uri(tmp_path)}"],
                   cwd=tmp_path, cache=cache, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    if overrides[0] == "model=x3d_q":
        assert "x3d_xs" in errors[0]  # the valid options are listed


def test_every_group_option_composes_and_validates():
    options = {group: sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
               for group in ("model", "data", "optim", "schedule", "launcher")}
    assert {"x2d", "x3d_xs", "x3d_s", "x3d_m", "x3d_l", "x3d_xl"} <= set(options["model"])
    assert {"synthetic", "k400", "k600", "ucf101"} <= set(options["data"])
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        default = compose("config")
        assert (default.model.name, default.data.name, default.optim.name, default.schedule.name,
                default.launcher.name, default.task) == ("x3d_xs", "synthetic", "sgd", "cosine_warmup", "local",
                                                         "train")
        for group, names in options.items():
            for name in names:
                cfg = compose("config", overrides=[f"{group}={name}"])
                validate(cfg)
                assert cfg[group].name == name


def test_kinetics_preset_is_pyslowfasts_recipe_and_yields_to_the_command_line():
    from x3d_exp.engine import build_optimizer
    from x3d_exp.models import build_model

    network = build_model("x3d_xs", num_classes=4)
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=["experiment=pyslowfast_kinetics", "model=x3d_m", "data.root=/data/k400"])
        validate(cfg)
        assert (cfg.model.name, cfg.data.name, cfg.launcher.name, cfg.optim.name) == ("x3d_m", "k400",
                                                                                     "distributed_gpu", "sgd")
        assert cfg.data.batch_size * cfg.launcher.nproc == 128 and cfg.trainer.epochs == 300
        assert (cfg.data.test_num_clips, cfg.data.test_num_crops) == (10, 3)
        _, rates = build_optimizer(cfg, network, steps_per_epoch=10, world_size=cfg.launcher.nproc)
        # 35 warmup epochs from 0.01 to 0.1, then cosine to 0 at epoch 300.
        assert len(rates) == 3000 and rates[0] == pytest.approx(0.01) and rates[350] == pytest.approx(0.1)
        assert max(rates) == pytest.approx(0.1) and rates[-1] < 1e-5
        # Half the GPUs: the lr follows the global batch; and a group chosen on the command line beats the preset's.
        cfg = compose("config", overrides=["experiment=pyslowfast_kinetics", "launcher.nproc=4", "data=k600",
                                           "data.root=/data/k600"])
        _, rates = build_optimizer(cfg, network, steps_per_epoch=10, world_size=cfg.launcher.nproc)
        assert cfg.data.name == "k600" and max(rates) == pytest.approx(0.05)


def test_smoke_preset_runs_one_tiny_epoch_in_its_own_data_folder(cache, tmp_path):
    done = run_cli(["debug=smoke", f"hydra.run.dir={tmp_path / 'run'}", f"mlflow.tracking_uri={store_uri(tmp_path)}"],
                   cwd=tmp_path, cache=cache)
    assert done.returncode == 0, done.stderr[-3000:]
    result = final_json(done.stdout)
    assert result["epochs"] == 1 and result["test_videos"] == 8
    (run,) = runs_of(store_uri(tmp_path))
    assert run.info.status == "FINISHED" and run.data.params["data.crop_size"] == "32"
    assert run.data.params["data.root"] == str(cache / "synthetic_smoke")
    assert (cache / "synthetic_smoke" / "synthetic.json").is_file()


def test_optimizer_has_no_weight_decay_on_bn_and_biases():
    from x3d_exp.engine import build_optimizer
    from x3d_exp.models import build_model

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config")
    network = build_model("x3d_xs", num_classes=4)
    optimizer, rates = build_optimizer(cfg, network, steps_per_epoch=5)
    assert len(rates) == cfg.trainer.epochs * 5
    decay = dict(zip([p.name for p in optimizer.parameters], optimizer.decay_flags))
    assert decay and all(not decay[n] for n in decay if n.endswith(("gamma", "beta", "bias")))
    assert all(decay[n] for n in decay if n.endswith("weight"))


@pytest.mark.parametrize("impl", ["native", "custom"])
def test_precise_bn_sets_the_mean_of_the_batch_statistics(impl):
    import mindspore as ms
    from mindspore import dataset as ds
    from mindspore import nn

    from x3d_exp.engine import precise_batchnorm_statistics
    from x3d_exp.models.x3d import _bn

    rng = np.random.default_rng(0)
    scale, shift = np.array([1, 2, 3]).reshape(3, 1, 1, 1), np.array([0, 5, -1]).reshape(3, 1, 1, 1)
    clips = (rng.normal(size=(24, 3, 2, 5, 5)) * scale + shift).astype(np.float32)

    class Batches:  # what precise BN reads of a Loader
        dataset = ds.NumpySlicesDataset({"clip": clips}, shuffle=False).batch(6)

    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        bn = _bn(3, impl=impl)
        # What the running averages held before must not matter.
        bn.bn2d.moving_mean.set_data(ms.Tensor(np.full(3, 7.0, np.float32)))
        assert precise_batchnorm_statistics(nn.SequentialCell([bn]), Batches, num_batches=3) == 3
    finally:
        ms.set_context(mode=previous)
    # The first three batches of 6, per channel over batch, time and space; unbiased variance, as BN keeps it.
    per_batch = clips[:18].reshape(3, 6, 3, -1).transpose(0, 2, 1, 3).reshape(3, 3, -1)
    np.testing.assert_allclose(bn.bn2d.moving_mean.asnumpy(), per_batch.mean(-1).mean(0), atol=1e-5)
    np.testing.assert_allclose(bn.bn2d.moving_variance.asnumpy(), per_batch.var(-1, ddof=1).mean(0), rtol=1e-5)


def test_clipped_step_scales_the_update_to_the_norm_bound_and_keeps_checkpoint_names():
    import mindspore as ms
    from mindspore import nn
    from mindspore.train import Model

    from x3d_exp.engine import ClippedTrainStep

    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.normal(size=(8, 16)).astype(np.float32) * 10)
    y = ms.Tensor(rng.integers(0, 4, 8).astype(np.int32))
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        moved = {}
        for max_norm in (None, 0.01):
            ms.set_seed(0)
            net = nn.Dense(16, 4)
            before = [p.asnumpy().copy() for p in net.trainable_params()]
            optimizer = nn.SGD(net.trainable_params(), learning_rate=0.1)
            step = (ClippedTrainStep(nn.WithLossCell(net, loss_fn), optimizer, max_norm) if max_norm
                    else nn.TrainOneStepCell(nn.WithLossCell(net, loss_fn), optimizer))
            step(x, y)
            moved[max_norm] = np.sqrt(sum(((p.asnumpy() - b) ** 2).sum()
                                          for p, b in zip(net.trainable_params(), before)))
        names = {}
        for clipped in (False, True):
            net = nn.Dense(16, 4)
            optimizer = nn.SGD(net.trainable_params(), learning_rate=0.1, momentum=0.9)
            model = (Model(ClippedTrainStep(nn.WithLossCell(net, loss_fn), optimizer, 1.0)) if clipped
                     else Model(net, loss_fn, optimizer))
            names[clipped] = sorted(p.name for p in model.train_network.get_parameters())
    finally:
        ms.set_context(mode=previous)
    # Unclipped, the update's norm is lr x |g| (well above 0.001 here); clipped, exactly lr x max_norm.
    assert moved[None] > 0.01 and moved[0.01] == pytest.approx(0.1 * 0.01, rel=1e-3)
    assert names[True] == names[False] and any(n.startswith("accum.") for n in names[True])


def test_video_metrics_average_softmax_over_views():
    from x3d_exp.engine import video_metrics

    # Video 0: one confident wrong view, two milder right ones: the average is right, the most confident view is not.
    prob_sum = {0: np.array([0.9, 0.1, 0.0]) + np.array([0.2, 0.8, 0.0]) + np.array([0.2, 0.8, 0.0]),
                1: np.array([0.2, 0.3, 0.5]) * 3}
    metrics = video_metrics(prob_sum, {0: 1, 1: 1}, loss_sum=6.0, views=6, num_classes=3)
    assert metrics["top1"] == 0.5 and metrics["top5"] == 1.0 and metrics["loss"] == 1.0
    assert metrics["per_class"][1] == 0.5 and np.isnan(metrics["per_class"][0])


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
