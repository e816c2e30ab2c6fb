"""Tasks on the network alone: `task=summary` (size and cost), `task=convert` (PyTorch weights in) and
`task=export` (MINDIR or ONNX out)."""

from __future__ import annotations

import os

import numpy as np
from omegaconf import DictConfig

from x3d_exp.config import JobContext, input_sizes, model_kwargs, train_clip
from x3d_exp.engine.memory import estimate_memory
from x3d_exp.errors import CheckpointError, UserError, WeightsError
from x3d_exp.models import build_model
from x3d_exp.models.summary import format_summary, trace_network
from x3d_exp.weights.convert import (FORMATS, checkpoint_num_classes, convert_state_dict, detect_format,
                                     extract_state_dict, load_params, read_params, save_params)
from x3d_exp.weights.export import EXPORT_FORMATS, export_model, verify_export
from x3d_exp.weights.torch_pickle import load_torch_checkpoint

# Float32 graphs in another runtime reorder sums: allow that much, relative to the largest logit.
EXPORT_TOLERANCE = 1e-4


def task_summary(cfg: DictConfig, job: JobContext = JobContext()) -> dict:
    """Parameter count and GMACs of the `model=` network at its training and test input (no weights needed)."""
    net = build_model(cfg.model.name, num_classes=cfg.data.num_classes, **model_kwargs(cfg))
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


def _option(cfg: DictConfig, section: str, key: str, default=None):
    value = cfg.get(section, {}).get(key, default)
    return default if value is None else value


def _build(cfg: DictConfig, num_classes: int):
    # MindSpore's own Conv3d: custom CPU kernels would tie an exported file to a local .so (and rename nothing).
    return build_model(cfg.model.name, num_classes=num_classes, **{**model_kwargs(cfg), "conv_impl": "native"})


def task_convert(cfg: DictConfig, job: JobContext = JobContext()) -> dict:
    """PyTorch X3D checkpoint (`convert.src`) -> MindSpore .ckpt (`convert.dst`) for the model `model=` builds.

    The class count is the checkpoint's own (its classifier's rows), not `data.num_classes`: a Kinetics-400
    checkpoint converts to a 400-class model whatever dataset is configured.
    """
    src = _option(cfg, "convert", "src")
    if not src:
        raise UserError("convert.src: give the PyTorch checkpoint to convert (convert.src=X3D_M.pyth)")
    if not os.path.isfile(src):
        raise UserError(f"convert.src={src}: no such file")
    dst = _option(cfg, "convert", "dst") or os.path.splitext(src)[0] + ".ckpt"
    fmt = str(_option(cfg, "convert", "format", "auto"))
    try:
        state = extract_state_dict(load_torch_checkpoint(src))
        fmt = detect_format(state) if fmt == "auto" else fmt
        if fmt not in FORMATS:
            raise WeightsError(f"convert.format={fmt}: choose auto or one of {', '.join(FORMATS)}")
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


def task_export(cfg: DictConfig, job: JobContext = JobContext()) -> dict:
    """Network of `model=` with the weights of `ckpt` -> `export.dst` (MINDIR or ONNX), checked by running it.

    With `ckpt` the class count is the checkpoint's; without, `data.num_classes` (and random weights).
    `export.input_shape` defaults to one clip at the training crop: [1, 3, T, crop, crop].
    """
    fmt = str(_option(cfg, "export", "format", "MINDIR")).upper()
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"export.format={fmt}: choose one of {', '.join(EXPORT_FORMATS)}")
    ckpt = cfg.get("ckpt")
    try:
        if ckpt and not os.path.isfile(ckpt):
            raise WeightsError("no such file")
        params = read_params(ckpt) if ckpt else None
        num_classes = params["head.proj.weight"].shape[0] if params and "head.proj.weight" in params else None
        network = _build(cfg, num_classes or int(cfg.data.num_classes))
        if params is not None:
            load_params(network, params)
        spec = network.spec
        shape = [int(d) for d in _option(cfg, "export", "input_shape",
                                         [1, 3, spec.num_frames, spec.crop_size, spec.crop_size])]
        if len(shape) != 5 or shape[1] != 3 or min(shape) < 1:
            raise UserError(f"export.input_shape={shape}: must be [N, 3, T, H, W]")
        dst = _option(cfg, "export", "dst") or (os.path.splitext(ckpt)[0] if ckpt else cfg.model.name)
        path = export_model(network, shape, dst, fmt)
        result = {"task": "export", "format": fmt, "dst": path, "model": cfg.model.name, "ckpt": ckpt,
                  "num_classes": int(spec.num_classes), "input_shape": shape}
        if _option(cfg, "export", "verify", True):
            inputs = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            diff, scale = verify_export(network, path, inputs)
            result["max_abs_diff"] = diff
            if diff > EXPORT_TOLERANCE * max(1.0, scale):
                raise WeightsError(f"{path} gives outputs {diff:.3g} away from the network's")
    except (CheckpointError, WeightsError, OSError) as err:
        raise UserError(f"ckpt={ckpt}: {err}" if ckpt else str(err)) from None
    return result
