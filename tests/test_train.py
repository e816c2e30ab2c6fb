"""task=train and task=test through the real CLI: what a finished and a tested run leave behind (a killed and
resumed one: tests/test_spool.py, with the tracking server down at the kill)."""

from __future__ import annotations

import re

import pytest

from tests.cli_helpers import SHALLOW, TINY, artifact_paths, final_json, metric_steps, run_cli, runs_of, store_uri


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
    for expected in (".hydra/config.yaml", ".hydra/overrides.yaml", "plots/learning_curves.png",
                     "plots/per_class_accuracy.png", "model_summary.txt", "per_class_accuracy.json"):
        assert expected in artifacts, artifacts
    # The checkpoints stay in the run dir; MLflow holds the trained model (tests/test_serving.py), not their copies.
    assert not [path for path in artifacts if path.endswith(".ckpt")], artifacts


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
    done = run_cli(TINY + SHALLOW + ["task=test", f"ckpt={best}", f"hydra.run.dir={tmp_path / 'run'}",
                                     f"mlflow.tracking_uri={store_uri(tmp_path)}"], cwd=tmp_path, cache=cache)
    assert done.returncode == 0, done.stderr[-3000:]
    tested = final_json(done.stdout)
    assert tested["task"] == "test" and tested["test_top1"] == pytest.approx(result["test_top1"])
    (run,) = runs_of(store_uri(tmp_path))
    assert run.info.status == "FINISHED" and run.data.metrics["test/top1"] == pytest.approx(result["test_top1"])


def test_a_full_disk_stops_the_run_with_one_line_the_complete_checkpoints_and_a_resume_command(
        small_disk, cache, tmp_path):
    run_dir = small_disk / "run"
    done = run_cli(TINY + SHALLOW + ["trainer.epochs=2", f"hydra.run.dir={run_dir}",
                                     f"mlflow.tracking_uri={store_uri(tmp_path)}"], cwd=tmp_path, cache=cache)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # Foreseen at the start: the run's checkpoints need more than the disk has.
    assert re.search(r"the checkpoints of this run need up to \d+ MB, but the disk of .* has \d+ MB free", done.stdout)
    errors = [line for line in done.stderr.splitlines() if line.startswith(("error:", "resume with:"))]
    assert len(errors) == 2, done.stderr[-3000:]
    assert re.match(r"error: no space left on the disk of .*/checkpoints to write (best|epoch0002)\.ckpt "
                    r"\(22 MB needed, \d+ MB free\): free space there or lower trainer.keep_last", errors[0]), errors[0]
    assert errors[1].endswith(f"resume=auto hydra.run.dir={run_dir}"), errors[1]
    # No half-written file is left, and the checkpoint written before is whole.
    ckpt_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.ckpt", "epoch0001.ckpt", "history.json"]
    import mindspore as ms

    assert int(ms.load_checkpoint(str(ckpt_dir / "epoch0001.ckpt"))["epoch"].asnumpy()) == 1
    (run,) = runs_of(store_uri(tmp_path))
    assert run.info.status == "FAILED" and "no space left" in run.data.tags["error"]
    # Epoch 2 was validated before its checkpoint found the disk full.
    assert metric_steps(store_uri(tmp_path), run.info.run_id, "val/top1") == [4, 8]
