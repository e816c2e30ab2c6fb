"""The trained network as an MLflow model: logged with its metrics, registered, loaded, served by the real
`mlflow models serve`, exported to ONNX and served without MindSpore. All on the shared `trained` CLI run."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.cli_helpers import TINY, cli_env, final_json, free_port, run_cli, store_uri, wait_until_answers
from tests.conftest import REGISTERED_MODEL
from tests.data_helpers.layouts import write_video
from x3d_exp.tracking.models import log_trained_model

pytestmark = pytest.mark.slow

CLASSES = ["moving_down", "moving_sideways", "moving_up", "standing_still"]


def generated_videos(cache: Path) -> list:
    found = sorted(cache.glob("synthetic/*/test/*.mp4"))
    assert found, f"no generated test videos under {cache}"
    return [str(p) for p in found]


def logged_model(work: Path, run_id: str):
    client = MlflowClient(store_uri(work))
    experiment = client.get_run(run_id).info.experiment_id
    (model,) = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    return client, model


def artifact_bytes(client, run_id: str, path=None) -> int:
    total = 0
    for info in client.list_artifacts(run_id, path):
        total += artifact_bytes(client, run_id, info.path) if info.is_dir else info.file_size
    return total


def test_a_training_run_logs_its_best_network_as_a_model_with_its_metrics_and_registers_it(trained):
    work, result, _ = trained
    client, model = logged_model(work, result["run_id"])
    assert model.model_id == result["model_id"] and model.status.to_proto() == model.status.READY.to_proto()
    assert model.name == "x3d_xs" and model.params["gamma_d"] == "1.0"  # the shallow X3D-XS of `trained`
    metrics = {m.key: m.value for m in model.metrics}
    assert metrics["test/top1"] == pytest.approx(result["test_top1"])
    assert metrics["val/best_top1"] == pytest.approx(result["val_top1"])
    # Delivering it again (a replayed record) finds what is there: no second model, metric or version.
    again = log_trained_model(client, result["run_id"], model_dir=str(work / "run" / "mlflow_model"), name="x3d_xs",
                              metrics={"test/top1": result["test_top1"]}, registered_model=REGISTERED_MODEL,
                              tags={"model": "x3d_xs"})
    assert again == {"model_id": model.model_id, "model_uri": f"models:/{model.model_id}", "registered_version": 1}
    assert len(client.search_logged_models([model.experiment_id])) == 1
    # The run holds them too (the sweep summaries read them there), once each.
    assert [m.value for m in client.get_metric_history(result["run_id"], "test/top1")] == [result["test_top1"]]
    assert client.get_run(result["run_id"]).outputs.model_outputs[0].model_id == model.model_id

    (version,) = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    assert str(version.version) == "1" and version.run_id == result["run_id"] and version.source == f"models:/{model.model_id}"
    assert version.tags["model"] == "x3d_xs" and version.tags["data"] == "synthetic" and version.tags["git_commit"]

    # Artifacts beside the store, not in ./mlruns of the directory the job ran in; and MLflow keeps the model, not
    # copies of checkpoints: the run's artifacts and its model's together within 1.2x one checkpoint.
    artifacts = work / "mlartifacts"
    assert model.artifact_location.startswith(artifacts.as_uri()) and not (work / "mlruns").exists()
    stored = sum(f.stat().st_size for f in artifacts.rglob("*") if f.is_file())
    assert stored == artifact_bytes(client, result["run_id"]) + sum(
        f.stat().st_size for f in Path(model.artifact_location.removeprefix("file://")).rglob("*") if f.is_file())
    checkpoint = (work / "run" / "checkpoints" / "best.ckpt").stat().st_size
    assert stored <= 1.2 * checkpoint, (stored, checkpoint)


def test_the_registered_model_predicts_the_top_classes_of_video_files_and_fine_tunes(trained, cache, monkeypatch):
    import mlflow
    import pandas as pd

    from x3d_exp.models import build_model
    from x3d_exp.weights import load_pretrained

    work, result, _ = trained
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: store_uri(work))
    mlflow.set_tracking_uri(store_uri(work))
    try:
        model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}/1")
        videos = generated_videos(cache)[:2]
        out = model.predict(pd.DataFrame({"video": videos}))
        assert len(out) == 2
        for row in out["top_k"]:
            # Four classes, so the top 5 holds all four, most probable first.
            assert sorted(e["label"] for e in row) == CLASSES
            assert [e["prob"] for e in row] == sorted((e["prob"] for e in row), reverse=True)
            assert sum(e["prob"] for e in row) == pytest.approx(1.0, abs=1e-6)
            assert all(CLASSES[e["index"]] == e["label"] for e in row)
        # k through params; the file's bytes (base64 as over REST, or raw in process) give the same answer.
        encoded = base64.b64encode(Path(videos[0]).read_bytes()).decode()
        raw = Path(videos[0]).read_bytes()
        for value in (encoded, raw):
            (same,) = model.predict(pd.DataFrame({"video": [value]}), params={"k": 2})["top_k"]
            assert same == out["top_k"][0][:2]
    finally:
        mlflow.set_tracking_uri(None)

    # ckpt= takes the model URI for fine-tuning (and task=test/infer/export): the weights are the best network's.
    net = build_model("x3d_xs", num_classes=4, conv_impl="native", gamma_d=1.0)  # the shallow X3D-XS of `trained`
    assert load_pretrained(net, f"runs:/{result['run_id']}/x3d_xs", store_uri(work)) == []
    saved = json.loads((work / "run" / "mlflow_model" / "artifacts" / "x3d_model.json").read_text())
    assert saved["class_names"] == CLASSES and saved["clip"] == result["clip"]


def post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mlflow_models_serve_answers_with_the_top_5_and_rejects_bad_requests(trained, cache, tmp_path):
    work, result, _ = trained
    port = free_port()
    env = {**cli_env(cache), "MLFLOW_TRACKING_URI": store_uri(work)}
    env.pop("PYTHONPATH")  # the model brings its own copy of x3d_exp
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{REGISTERED_MODEL}/1",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(server, f"{base}/ping", timeout=240)

        video = Path(generated_videos(cache)[0])
        good = {"dataframe_split": {"columns": ["video"], "data": [[base64.b64encode(video.read_bytes()).decode()]]}}
        status, body = post(f"{base}/invocations", good)
        assert status == 200, body
        (top,) = body["predictions"]
        assert [e["label"] for e in top["top_k"]] and sorted(e["label"] for e in top["top_k"]) == CLASSES

        short = tmp_path / "short.mp4"
        write_video(short, 100, frames=2)  # the model's clip needs 4 frames
        bad = {"not base64": "@@ not base64 @@", "not a video": base64.b64encode(b"just some text").decode(),
               "empty value": "", "too short": base64.b64encode(short.read_bytes()).decode()}
        reasons = {"not base64": "neither an existing file nor base64", "not a video": "not a readable video",
                   "empty value": "empty `video` value", "too short": "too short, 2 frames"}
        for case, value in bad.items():
            status, body = post(f"{base}/invocations", {"dataframe_split": {"columns": ["video"], "data": [[value]]}})
            assert status == 400, (case, body)
            assert reasons[case] in body["message"], (case, body["message"][-500:])
        status, body = post(f"{base}/invocations", {"dataframe_split": {"columns": ["video"], "data": []}})
        assert 400 <= status < 500, body
        # The server is still up and answers the good request again.
        assert post(f"{base}/invocations", good) == (200, {"predictions": [top]})
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def test_the_onnx_export_is_logged_to_the_run_and_served_without_mindspore(trained, cache, tmp_path):
    work, result, _ = trained
    done = run_cli(TINY + ["task=export", "export.format=ONNX", "export.log_model=true",
                           f"ckpt=models:/{REGISTERED_MODEL}/1", f"mlflow.tracking_uri={store_uri(work)}",
                           f"hydra.run.dir={tmp_path / 'export'}"], cwd=tmp_path, cache=cache)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = final_json(done.stdout)
    # The clip the checkpoint was trained on, not the model's nominal 4x160x160.
    assert exported["input_shape"] == [1, *result["clip"]]
    assert exported["run_id"] == result["run_id"]
    client = MlflowClient(store_uri(work))
    onnx_model = client.get_logged_model(exported["model_id"])
    assert onnx_model.source_run_id == result["run_id"] and onnx_model.name == "x3d_xs-onnx"

    script = (
        "import json, sys, mlflow, numpy as np\n"
        f"mlflow.set_tracking_uri({store_uri(work)!r})\n"
        f"model = mlflow.pyfunc.load_model({exported['model_uri']!r})\n"
        f"clip = np.zeros({exported['input_shape']!r}, np.float32)\n"
        "out = model.predict(clip)\n"
        "logits = next(iter(out.values())) if isinstance(out, dict) else np.asarray(out)\n"
        "print(json.dumps({'shape': list(np.shape(logits)), 'mindspore': 'mindspore' in sys.modules,\n"
        "                  'names': model.metadata.metadata['class_names']}))\n")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    ran = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    served = json.loads(ran.stdout.strip().splitlines()[-1])
    assert served == {"shape": [1, 4], "mindspore": False, "names": CLASSES}


def test_task_infer_takes_the_registered_model_and_its_class_names(trained, cache, tmp_path):
    work, _, _ = trained
    video = generated_videos(cache)[0]
    uri = f"models:/{REGISTERED_MODEL}/1"
    done = run_cli(TINY + ["task=infer", f"ckpt={uri}", f"infer.inputs=[{video}]", "infer.output=json",
                           f"mlflow.tracking_uri={store_uri(work)}", f"hydra.run.dir={tmp_path / 'infer'}"],
                   cwd=tmp_path, cache=cache)
    assert done.returncode == 0, done.stderr[-3000:]
    record, summary = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")][-2:]
    assert record["video"] == video and sorted(e["label"] for e in record["top5"]) == CLASSES
    assert summary["labels"] == uri and summary["failed"] == 0
