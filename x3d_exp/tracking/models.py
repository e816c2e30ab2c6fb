"""The trained network as an MLflow model: saved in the run dir by the job, then logged, linked and registered.

A train job saves its best network with `save_trained_model` to `<run dir>/mlflow_model/`, an MLflow pyfunc model
that exists whether or not the tracking server is reachable:

    mlflow_model/
      MLmodel, python_env.yaml, requirements.txt    pinned to the versions this project runs on
      artifacts/weights.ckpt                        the network's parameters (no optimizer state)
      artifacts/x3d_model.json                      the model config, the class names, the clip and the test views
      code/x3d_exp/                                 this package, put on sys.path when the model loads
      input_example.json, serving_input_example.json

`log_trained_model(client, run_id, ...)` then makes it an MLflow 3 LoggedModel of the run: created, its files
uploaded, finalized READY, the val and test metrics linked to it (the Models tab compares by them), and, with
`mlflow.registered_model`, a new version in the Model Registry. It takes only JSON-serialisable arguments, so it
can be replayed later from a record, and it is idempotent: the LoggedModel carries the local model's uuid as a tag
and a second call finds it instead of creating another.

`VideoClassifier` is the pyfunc: a DataFrame column `video` of file paths or base64-encoded files (bytes in
process) -> per video the top k (`label`, `index`, `prob`), k=5 unless `params={"k": n}`. Each video is decoded as
the test split decodes it (data.test_num_clips x data.test_num_crops views, softmax averaged). A bad row raises
an MlflowException with INVALID_PARAMETER_VALUE, which MLflow's scoring server answers with HTTP 400.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Optional

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS, ErrorCode

from x3d_exp.tracking.runs import RUN_ID_FILE
from x3d_exp.tracking.spool import register_op
from x3d_exp.weights.mlflow_model import DESCRIPTION, WEIGHTS

MODEL_DIR = "mlflow_model"
# Beside MODEL_DIR once the LoggedModel is delivered: log_trained_model's result (model id, URI, registered version).
LOGGED_MODEL_FILE = "mlflow_logged_model.json"
TOP_K = 5
COLUMN = "video"
# The LoggedModel's tag holding the uuid of the local model it was made from (what makes logging idempotent).
SOURCE_TAG = "x3d_exp.source_model_uuid"
# What the model needs at load time, pinned to the installed versions (setup.cfg's install_requires, less the
# sweep plugins).
SERVING_PACKAGES = ("mindspore", "numpy", "hydra-core", "omegaconf", "decord", "av", "mlflow", "pandas", "matplotlib",
                    "tqdm", "psutil")
# Above this size the input example names the file instead of holding it (the example travels with every copy).
EXAMPLE_INLINE_BYTES = 2 << 20


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


@contextmanager
def _video_file(value, row: int):
    """A local file holding the row's video: the path itself, or a temporary copy of its bytes or base64."""
    if isinstance(value, str) and value and os.path.isfile(value):
        yield value
        return
    if isinstance(value, str):
        if not value.strip():
            raise _bad_input(f"row {row}: empty `{COLUMN}` value: give a file path or the file's bytes in base64")
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_input(f"row {row}: `{COLUMN}` is neither an existing file nor base64 of a video "
                             f"file") from None
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise _bad_input(f"row {row}: `{COLUMN}` must be a file path or the file's bytes, got "
                         f"{type(value).__name__}{' (empty)' if isinstance(value, (bytes, bytearray)) else ''}")
    # A fresh name per request: the decoder caches frame sizes by path.
    path = os.path.join(tempfile.gettempdir(), f"x3d-exp-video-{uuid.uuid4().hex}")
    try:
        Path(path).write_bytes(bytes(value))
        yield path
    finally:
        Path(path).unlink(missing_ok=True)


class VideoClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc of a trained X3D (see the module docstring). The network is built and loaded once, in
    load_context, and runs in PyNative mode: no graph compile before the first answer."""

    def load_context(self, context):
        import mindspore as ms

        from x3d_exp.engine.build import resolve_device
        from x3d_exp.kernels import resolve_conv_impl
        from x3d_exp.models import build_from_config
        from x3d_exp.models.fuse import inference_network
        from x3d_exp.weights import load_params, read_params

        self.spec = json.loads(Path(context.artifacts["description"]).read_text())
        device = resolve_device("auto")
        ms.set_context(mode=ms.PYNATIVE_MODE, device_target=device)
        network = build_from_config(self.spec["model"], int(self.spec["num_classes"]),
                                    conv_impl=resolve_conv_impl("auto", device))
        load_params(network, read_params(context.artifacts["weights"]))
        network.set_train(False)
        self.network = inference_network(network)

    # Annotated as a DataFrame, the input is taken as it comes (MLflow infers no schema from that hint; the
    # signature is the model's own) and MLflow does not warn at import that predict has no type hints.
    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None):
        import numpy as np
        import mindspore as ms

        from x3d_exp.data import DataError, load_video_views
        from x3d_exp.data.video import BadVideo, count_frames
        from x3d_exp.engine.evaluate import softmax, top_k

        k = int((params or {}).get("k", TOP_K))
        if k < 1:
            raise _bad_input(f"params k={k}: must be >= 1")
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if COLUMN not in frame.columns:
            raise _bad_input(f"no `{COLUMN}` column (got {', '.join(map(str, frame.columns)) or 'none'})")
        values = list(frame[COLUMN])
        if not values:
            raise _bad_input(f"the `{COLUMN}` column is empty: give one video per row")
        views_args = self.spec["views"]
        names = self.spec["class_names"]
        out = []
        for row, value in enumerate(values):
            with _video_file(value, row) as path:
                shown = path if path == value else f"row {row}"
                try:
                    views = load_video_views(path, **views_args)
                    frames = count_frames(path)
                except (DataError, BadVideo) as err:
                    raise _bad_input(str(err).replace(path, shown)) from None
            if frames < views_args["num_frames"]:
                raise _bad_input(f"{shown}: too short, {frames} frames; one clip of this model needs "
                                 f"{views_args['num_frames']}")
            logits = self.network(ms.Tensor(views)).asnumpy().astype(np.float64)
            out.append({"top_k": top_k(softmax(logits).mean(axis=0), names, k)})
        return pd.DataFrame(out)


def model_spec(cfg, network, sizes: dict, class_names) -> dict:
    """What `VideoClassifier` rebuilds the network and its test views from: the resolved model config, the class
    names, the clip trained on and the test views."""
    from omegaconf import OmegaConf

    data = cfg.data
    return {"model": OmegaConf.to_container(cfg.model, resolve=True),
            "num_classes": int(network.spec.num_classes), "class_names": list(class_names),
            "clip": [3, sizes["num_frames"], sizes["crop_size"], sizes["crop_size"]],
            "views": {"num_frames": sizes["num_frames"], "sampling_rate": sizes["sampling_rate"],
                      "test_crop_size": sizes["test_crop_size"], "num_clips": int(data.test_num_clips),
                      "num_crops": int(data.test_num_crops), "target_fps": float(data.target_fps)}}


def pinned_requirements(names=SERVING_PACKAGES) -> list:
    """`name==version` of each installed package of `names` (one that is missing is left out: the job must not
    fail at its end over a requirement list)."""
    pinned = []
    for name in names:
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pinned


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    entry = Object([Property("label", "string", required=False), Property("index", "long"),
                    Property("prob", "double")])
    return ModelSignature(inputs=Schema([ColSpec("string", COLUMN)]), outputs=Schema([ColSpec(Array(entry), "top_k")]),
                          params=ParamSchema([ParamSpec("k", "long", TOP_K)]))


def _input_example(video: Optional[str]):
    if video is None:
        return None
    value = (base64.b64encode(Path(video).read_bytes()).decode("ascii")
             if os.path.getsize(video) <= EXAMPLE_INLINE_BYTES else str(Path(video).resolve()))
    return pd.DataFrame({COLUMN: [value]}), {"k": TOP_K}


def _package_copy(into: Path) -> str:
    """This package without caches, for the model's code/ folder."""
    package = Path(__file__).resolve().parents[1]
    target = into / package.name
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    return str(target)


def save_trained_model(model_dir: Path, network, spec: dict, example_video: Optional[str] = None) -> Path:
    """Write `network` (its parameters only) and `spec` (see model_spec) as an MLflow pyfunc model at `model_dir`,
    replacing what is there only once the new one is complete."""
    model_dir = Path(model_dir)
    partial = model_dir.with_name(f".{model_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".model-", dir=model_dir.parent) as staging:
            _save_pyfunc(Path(staging), partial, network, spec, example_video)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a full disk, say: no half-written model is left
        raise
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(partial, model_dir)
    return model_dir


def _save_pyfunc(staging: Path, partial: Path, network, spec: dict, example_video: Optional[str]) -> None:
    from x3d_exp.weights import save_params

    save_params({p.name: p.asnumpy() for p in network.get_parameters()}, str(staging / WEIGHTS))
    (staging / DESCRIPTION).write_text(json.dumps(spec, indent=1))
    # The model from code (pyfunc_entry.py), not a pickled VideoClassifier: loading it deserializes no pickle.
    mlflow.pyfunc.save_model(str(partial), python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                             artifacts={"weights": str(staging / WEIGHTS), "description": str(staging / DESCRIPTION)},
                             code_paths=[_package_copy(staging)], signature=signature(),
                             input_example=_input_example(example_video), pip_requirements=pinned_requirements(),
                             metadata={"class_names": spec["class_names"], "clip": spec["clip"],
                                       "x3d_model": spec["model"]["name"]})


def log_trained_model(client, run_id: str, *, model_dir: str, name: str, metrics: dict,
                      registered_model: Optional[str], tags: dict, params: Optional[dict] = None) -> dict:
    """The local pyfunc model at `model_dir` as a READY LoggedModel of the run, `metrics` logged to the run linked
    to it, and a new version of `registered_model` when given. Safe to call again: each step checks what is there.
    Returns {"model_id", "model_uri", "registered_version"}."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model

    local = Model.load(os.path.join(model_dir, "MLmodel"))
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models([experiment], filter_string=f"tags.`{SOURCE_TAG}` = '{local.model_uuid}'",
                                        max_results=1)
    if found:
        model = found[0]
    else:
        model = client._create_logged_model(experiment, name=name, source_run_id=run_id,
                                            tags={**tags, SOURCE_TAG: local.model_uuid},
                                            params={k: str(v) for k, v in (params or {}).items()},
                                            flavor="onnx" if "onnx" in local.flavors else "python_function")
    if model.status != LoggedModelStatus.READY:
        with tempfile.TemporaryDirectory() as tmp:
            upload = Path(tmp) / "model"
            shutil.copytree(model_dir, upload)
            # The MLmodel file names the LoggedModel and run it belongs to, as mlflow.pyfunc.log_model writes it.
            local.run_id, local.model_id, local.artifact_path = run_id, model.model_id, model.artifact_location
            local.save(str(upload / "MLmodel"))
            client.log_model_artifacts(model.model_id, str(upload))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        model = client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    linked = {m.key for m in model.metrics or []}
    now = int(time.time() * 1000)
    todo = [Metric(k, float(v), now, 0, model_id=model.model_id) for k, v in metrics.items()
            if v is not None and k not in linked]
    if todo:
        client.log_batch(run_id, metrics=todo)
    version = None
    if registered_model:
        try:
            client.create_registered_model(registered_model)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        # A sqlite registry does not return a version's model_id; its source names the model.
        versions = [v for v in client.search_model_versions(f"name = '{registered_model}'")
                    if v.source == f"models:/{model.model_id}"]
        if versions:
            version = versions[0].version
        else:
            from mlflow.tracking._tracking_service.utils import _use_tracking_uri

            # A sqlite registry (MLflow 3.17) looks a models:/<id> source up through the global tracking URI.
            with _use_tracking_uri(client.tracking_uri):
                version = client.create_model_version(registered_model, source=f"models:/{model.model_id}",
                                                      run_id=run_id, tags=tags, model_id=model.model_id).version
    return {"model_id": model.model_id, "model_uri": f"models:/{model.model_id}",
            "registered_version": None if version is None else int(version)}


def _deliver_trained_model(client, run_id: str, **args) -> None:
    """The spool's `log_trained_model` record: the LoggedModel, and its ids beside the model for the job's result."""
    logged = log_trained_model(client, run_id, **args)
    (Path(args["model_dir"]).parent / LOGGED_MODEL_FILE).write_text(json.dumps(logged))


register_op("log_trained_model", _deliver_trained_model)


def delivered_model(run_dir: Path) -> dict:
    """What `_deliver_trained_model` left in `run_dir` ({} while the record waits for the store)."""
    path = Path(run_dir) / LOGGED_MODEL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_onnx_model(model_dir: Path, onnx_path: str, input_shape: list, class_names) -> Path:
    """An exported ONNX file as an mlflow.onnx model at `model_dir` (replaced once complete): served by onnxruntime,
    no MindSpore. Input `clip` [N, 3, T, H, W] float32 (normalised as the test split does), output `logits`
    [N, classes]; the class names are in its metadata."""
    import numpy as np
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model_dir = Path(model_dir)
    partial = model_dir.with_name(f".{model_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    proto = onnx.load(onnx_path)
    graph_input, graph_output = proto.graph.input[0].name, proto.graph.output[0].name
    shape = [-1, *input_shape[1:]]
    sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), shape, graph_input)]),
                         outputs=Schema([TensorSpec(np.dtype(np.float32), [-1, len(class_names or []) or -1],
                                                    graph_output)]))
    mlflow.onnx.save_model(proto, str(partial), signature=sig,
                           pip_requirements=pinned_requirements(("onnx", "onnxruntime", "numpy", "mlflow")),
                           metadata={"class_names": list(class_names) if class_names else None,
                                     "input_shape": list(input_shape)})
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(partial, model_dir)
    return model_dir


def source_run_id(client, ckpt: str, weights: str) -> Optional[str]:
    """The MLflow run a checkpoint came from, in the store of `client`: a logged model's run (its MLmodel names
    it), else the `mlflow_run_id` file of the train job's run dir the file sits in; None when there is none."""
    from mlflow.models import Model

    candidates = []
    mlmodel = Path(weights).parents[1] / "MLmodel"
    if mlmodel.is_file() and Model.load(str(mlmodel)).run_id:
        candidates.append(Model.load(str(mlmodel)).run_id)
    for folder in list(Path(os.path.abspath(ckpt)).parents)[:3]:
        if (folder / RUN_ID_FILE).is_file():
            candidates.append((folder / RUN_ID_FILE).read_text().strip())
    for run_id in candidates:
        try:
            return client.get_run(run_id).info.run_id
        except MlflowException:  # a run of another store
            continue
    return None
