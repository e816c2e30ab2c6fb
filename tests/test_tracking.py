"""MLflow records: run ownership, failed and interrupted runs, orphans, and a real `mlflow server` serving them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.cli_helpers import TINY, run_cli, runs_of, store_uri


@pytest.mark.slow
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


def test_mlflow_server_serves_the_run_and_its_test_top1(trained, trained_server):
    work, result, _ = trained
    api = f"{trained_server}/api/2.0/mlflow"
    with urllib.request.urlopen(f"{api}/experiments/get-by-name?experiment_name=x3d-exp", timeout=10) as r:
        experiment = json.load(r)["experiment"]
    query = json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode()
    request = urllib.request.Request(f"{api}/runs/search", data=query, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        runs = json.load(r)["runs"]
    (run,) = [r for r in runs if r["info"]["run_id"] == result["run_id"]]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert run["info"]["status"] == "FINISHED"
    assert metrics["test/top1"] == pytest.approx(result["test_top1"])


def test_the_run_is_named_for_what_it_is_in_a_model_training_experiment(trained):
    from mlflow.tracking import MlflowClient

    work, result, _ = trained
    client = MlflowClient(store_uri(work))
    experiment = client.get_experiment_by_name("x3d-exp")
    # MLflow 3's UI opens an experiment with this tag in its model-training view, not the GenAI one.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_run(result["run_id"]).info.run_name == "x3d_xs synthetic seed0"


def test_each_split_is_a_dataset_input_with_the_digest_of_its_annotation(trained):
    import hashlib
    from mlflow.tracking import MlflowClient

    work, result, _ = trained
    inputs = MlflowClient(store_uri(work)).get_run(result["run_id"]).inputs.dataset_inputs
    by_split = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert sorted(by_split) == ["test", "train", "val"]
    for split, dataset in by_split.items():
        source = json.loads(dataset.source)
        annotation, root = Path(source["uri"]), Path(source["root"])
        assert dataset.name == "synthetic" and dataset.source_type == "local" and split in annotation.name
        # The root's path, the annotation and the generated set's manifest.
        expected = hashlib.sha256(str(root).encode())
        for part in (annotation, root / "synthetic.json"):
            expected.update(part.read_bytes())
        assert dataset.digest == expected.hexdigest()[:16]


def test_sets_with_the_same_annotation_but_other_videos_have_other_digests(tmp_path):
    from x3d_exp.tracking import dataset_digest

    digests = set()
    for size in (96, 192):
        for copy in ("a", "b"):
            root = tmp_path / copy / f"{size}px"
            root.mkdir(parents=True)
            (root / "synthetic_train.csv").write_text("train/v0.mp4 0\ntrain/v1.mp4 1\n")
            (root / "synthetic.json").write_text(json.dumps({"size": size}))
            digests.add(dataset_digest(root / "synthetic_train.csv", root))
    # Two sizes in two places: four sets, four digests (the same contents in another folder is another set).
    assert len(digests) == 4
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.csv").write_text("a.mp4 0\n")
    first = dataset_digest(folder / "train.csv", folder)
    (folder / "train.csv").write_text("b.mp4 0\n")
    assert dataset_digest(folder / "train.csv", folder) != first


def test_system_metrics_are_sampled_when_asked_for(trained):
    work, result, _ = trained
    (run,) = runs_of(store_uri(work))
    system = {key for key in run.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system


@pytest.mark.slow
def test_an_experiment_made_without_the_kind_gets_it_back_filled(tmp_path):
    from mlflow.tracking import MlflowClient
    from x3d_exp.tracking.runs import experiment_id

    client = MlflowClient(store_uri(tmp_path))
    made = client.create_experiment("older")
    assert "mlflow.experimentKind" not in client.get_experiment(made).tags
    assert experiment_id(client, "older") == made
    assert client.get_experiment(made).tags["mlflow.experimentKind"] == "custom_model_development"
