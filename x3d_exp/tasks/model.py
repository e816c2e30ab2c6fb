"""Tasks on the network alone: `task=summary` (size and cost), `task=convert` (PyTorch weights in) and
`task=export` (MINDIR or ONNX out)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from x3d_exp.config import JobContext, input_sizes, train_clip
from x3d_exp.engine.checkpoint import trained_clip
from x3d_exp.engine.memory import estimate_memory
from x3d_exp.errors import CheckpointError, UserError, WeightsError
from x3d_exp.models import build_from_config
from x3d_exp.models.summary import format_summary, trace_network
from x3d_exp.weights.convert import (CHECKPOINT_FORMATS, checkpoint_num_classes, convert_state_dict, detect_format,
                                     extract_state_dict, load_params, params_num_classes, read_params, save_params)
from x3d_exp.weights.export import (EXPORT_FORMATS, ONNX_EXTRA, export_model, missing_onnx_packages,
                                    verify_export)
from x3d_exp.weights.mlflow_model import local_checkpoint, model_description
from x3d_exp.weights.torch_pickle import load_torch_checkpoint

# Float32 graphs in another runtime reorder sums: allow that much, relative to the largest logit.
EXPORT_TOLERANCE = 1e-4


def task_summary(cfg: DictConfig, job: JobContext = JobContext()) -> dict:
    """Parameter count and GMACs of the `model=` network at its training and test input (no weights needed)."""
    net = build_from_config(cfg.model, int(cfg.data.num_classes))
    count = trace_network(net, net.spec.input_shape)
    test_input = [3, net.spec.num_frames, net.spec.test_crop_size, net.spec.test_crop_size]
    test_count = trace_network(net, test_input)
    clip = train_clip(input_sizes(cfg, net.spec))
    memory = estimate_memory(net, clip, int(cfg.data.batch_size), str(cfg.optim.name))
    print(format_summary(cfg.model.name, count))
    print(f"test crop {test_input}: {test_count.gmacs:.3f} GMACs")
    print(f"training memory per process at the loader's clip {clip}: {memory.describe()}")
    return {"task": "summary", "model": cfg.model.name, "params": count.params, "gmacs": round(count.gmacs, 4),
            "test_gmacs": round(test_count.gmacs, 4), "input": list(count.input_shape),
            "num_classes": int(cfg.data.num_classes), "memory_gb": round(memory.total / 1e9, 2)}


def _build(cfg: DictConfig, num_classes: int):
    # MindSpore's own Conv3d: custom CPU kernels would tie an exported file to a local .so (and rename nothing).
    return build_from_config(cfg.model, num_classes, conv_impl="native")


def task_convert(cfg: DictConfig, job: JobContext = JobContext()) -> dict:
    """PyTorch X3D checkpoint (`convert.src`) -> MindSpore .ckpt (`convert.dst`) for the model `model=` builds.

    The class count is the checkpoint's own (its classifier's rows), not `data.num_classes`: a Kinetics-400
    checkpoint converts to a 400-class model whatever dataset is configured.
    """
    src = cfg.convert.src
    if not src:
        raise UserError("convert.src: give the PyTorch checkpoint to convert (convert.src=X3D_M.pyth)")
    if not os.path.isfile(src):
        raise UserError(f"convert.src={src}: no such file")
    dst = cfg.convert.dst or os.path.splitext(src)[0] + ".ckpt"
    fmt = str(cfg.convert.format)
    try:
        state = extract_state_dict(load_torch_checkpoint(src))
        fmt = detect_format(state) if fmt == "auto" else fmt
        if fmt not in CHECKPOINT_FORMATS:
            raise WeightsError(f"convert.format={fmt}: choose auto or one of {', '.join(CHECKPOINT_FORMATS)}")
        num_classes = checkpoint_num_classes(state, fmt)
        network = _build(cfg, num_classes or int(cfg.data.num_classes))
        conversion = convert_state_dict(state, network, fmt)
    except (CheckpointError, WeightsError, OSError) as err:
        raise UserError(f"convert.src={src}: {err}") from None
    try:
        save_params(conversion.params, dst)
    except (WeightsError, OSError) as err:
        raise UserError(f"convert.dst={dst}: {err}") from None
    return {"task": "convert", "src": src, "dst": dst, "format": conversion.format, "model": cfg.model.name,
            "num_classes": int(network.spec.num_classes), "params": len(conversion.params),
            "identity_bn": conversion.identity_bn, "dropped": len(conversion.dropped)}


def _default_input_shape(spec, params, described) -> list:
    """One clip as the checkpoint was trained on it (its MLflow model's description, else the checkpoint's own
    metadata), else at the model's own training crop: [1, 3, T, crop, crop]."""
    if described and described.get("clip"):
        frames, crop = described["clip"][1], described["clip"][2]
    else:
        frames, crop = (params and trained_clip(params)) or (spec.num_frames, spec.crop_size)
    return [1, 3, int(frames), int(crop), int(crop)]


def task_export(cfg: DictConfig, job: JobContext = JobContext()) -> dict:
    """Network of `model=` with the weights of `ckpt` -> `export.dst` (MINDIR or ONNX), checked by running it.

    `ckpt` is a .ckpt or an MLflow model (models:/..., runs:/..., a train job's mlflow_model folder). With it the
    class count is the checkpoint's; without, `data.num_classes` (and random weights). `export.input_shape` defaults
    to one clip as the checkpoint was trained on, else at the model's training crop: [1, 3, T, crop, crop].
    `export.log_model=true` (ONNX) logs the file as an mlflow.onnx model of the checkpoint's run, or of a new run.
    """
    fmt = str(cfg.export.format).upper()
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"export.format={fmt}: choose one of {', '.join(EXPORT_FORMATS)}")
    verify, log_model = bool(cfg.export.verify), bool(cfg.export.log_model)
    if log_model and fmt != "ONNX":
        raise UserError(f"export.log_model=true logs an ONNX model: set export.format=ONNX (not {fmt})")
    missing = missing_onnx_packages(need_runtime=verify or log_model) if fmt == "ONNX" else []
    if missing:
        # Before any work: building and exporting the network takes the better part of a minute.
        raise UserError(f"export.format=ONNX needs {' and '.join(missing)}: {ONNX_EXTRA}")
    ckpt = cfg.ckpt
    try:
        weights = local_checkpoint(ckpt, cfg.mlflow.tracking_uri) if ckpt else None
        params = read_params(weights) if weights else None
        described = model_description(weights) if weights else None
        num_classes = params_num_classes(params) if params else None
        if described:  # an MLflow model carries the model config it was trained with
            cfg = OmegaConf.merge(cfg, {"model": described["model"]})
        network = _build(cfg, num_classes or int(cfg.data.num_classes))
        if params is not None:
            load_params(network, params)
        spec = network.spec
        shape = [int(d) for d in cfg.export.input_shape or _default_input_shape(spec, params, described)]
        if len(shape) != 5 or shape[1] != 3 or min(shape) < 1:
            raise UserError(f"export.input_shape={shape}: must be [N, 3, T, H, W]")
        stem = os.path.splitext(ckpt)[0] if ckpt and os.path.isfile(ckpt) else str(job.output_dir / cfg.model.name)
        dst = cfg.export.dst or stem
        path = export_model(network, shape, dst, fmt)
        result = {"task": "export", "format": fmt, "dst": path, "model": cfg.model.name, "ckpt": ckpt,
                  "num_classes": int(spec.num_classes), "input_shape": shape}
        if verify:
            inputs = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            diff, scale = verify_export(network, path, inputs)
            result["max_abs_diff"] = diff
            if diff > EXPORT_TOLERANCE * max(1.0, scale):
                raise WeightsError(f"{path} gives outputs {diff:.3g} away from the network's")
    except (CheckpointError, WeightsError, OSError) as err:
        raise UserError(f"ckpt={ckpt}: {err}" if ckpt else str(err)) from None
    if log_model:
        from x3d_exp.tasks.infer import dataset_labels

        names = described["class_names"] if described else dataset_labels(cfg.data, int(spec.num_classes))[0]
        result.update(_log_onnx(cfg, job, path, shape, names, ckpt, weights))
    return result


def _log_onnx(cfg: DictConfig, job: JobContext, path: str, shape: list, class_names, ckpt, weights) -> dict:
    """The ONNX file as an mlflow.onnx model, saved beside it and logged to the checkpoint's run (else a new
    run)."""
    from mlflow.tracking import MlflowClient

    from x3d_exp.tracking import Tracker
    from x3d_exp.tracking.models import delivered_model, log_trained_model, save_onnx_model, source_run_id
    from x3d_exp.tracking.runs import git_commit

    model_dir = save_onnx_model(Path(os.path.splitext(path)[0] + "_mlflow"), path, shape, class_names)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run_id = source_run_id(client, ckpt, weights) if ckpt else None
    tags = {"model": str(cfg.model.name), "data": str(cfg.data.name), "format": "ONNX"}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    model = dict(model_dir=str(model_dir), name=f"{cfg.model.name}-onnx", metrics={}, registered_model=None, tags=tags)
    if run_id is not None:
        logged = log_trained_model(client, run_id, **model)
    else:
        # A run of its own, recorded like a job's (through the spool: FAILED or KILLED if the export dies).
        with Tracker(cfg, job.output_dir, job) as tracker:
            tracker.record("log_trained_model", **model)
        run_id, logged = tracker.run_id, delivered_model(model_dir.parent)
    return {"mlflow_model_dir": str(model_dir), "run_id": run_id, **logged}
