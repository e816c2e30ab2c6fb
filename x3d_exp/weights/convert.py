"""PyTorch X3D state dicts (PySlowFast, PyTorchVideo, MMAction2) to our MindSpore parameters, and back into nets.

The mapping is generated from our own parameter names: each of our parameters names exactly one source
tensor per format, so a checkpoint converts only if it has every expected key, no other key, and every shape
right. Layout of each format: /work/shared/reference (PySlowFast and PyTorchVideo key lists) and
MMAction2's `mmaction/models/backbones/x3d.py`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from x3d_exp.errors import WeightsError
from x3d_exp.weights.torch_pickle import load_torch_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("slowfast", "pytorchvideo", "mmaction2")
# Our classifier; its row count is the checkpoint's class count.
HEAD_PROJECTION = ("head.proj.weight", "head.proj.bias")

_BN_LEAVES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
_BLOCK = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)")


@dataclass(frozen=True)
class _Layout:
    stem_and_head: Dict[str, str]
    block_prefix: str
    block: Dict[str, str]


_LAYOUTS = {
    "slowfast": _Layout(
        stem_and_head={"stem.conv_xy": "s1.pathway0_stem.conv_xy", "stem.conv_t": "s1.pathway0_stem.conv",
                       "stem.bn": "s1.pathway0_stem.bn", "head.conv": "head.conv_5", "head.bn": "head.conv_5_bn",
                       "head.fc": "head.lin_5", "head.proj": "head.projection"},
        block_prefix="s{stage2}.pathway0_res{block}.",
        block={"shortcut_conv": "branch1", "shortcut_bn": "branch1_bn", "branch.conv_a": "branch2.a",
               "branch.bn_a": "branch2.a_bn", "branch.conv_b": "branch2.b", "branch.bn_b": "branch2.b_bn",
               "branch.se.fc1": "branch2.se.fc1", "branch.se.fc2": "branch2.se.fc2", "branch.conv_c": "branch2.c",
               "branch.bn_c": "branch2.c_bn"},
    ),
    # PyTorchVideo swaps the stem names: its conv_t is the spatial 1x3x3 conv, its conv_xy the temporal one.
    # Its head sits in `blocks` right after the stages: {head} is that index.
    "pytorchvideo": _Layout(
        stem_and_head={"stem.conv_xy": "blocks.0.conv.conv_t", "stem.conv_t": "blocks.0.conv.conv_xy",
                       "stem.bn": "blocks.0.norm", "head.conv": "blocks.{head}.pool.pre_conv",
                       "head.bn": "blocks.{head}.pool.pre_norm", "head.fc": "blocks.{head}.pool.post_conv",
                       "head.proj": "blocks.{head}.proj"},
        block_prefix="blocks.{stage1}.res_blocks.{block}.",
        block={"shortcut_conv": "branch1_conv", "shortcut_bn": "branch1_norm", "branch.conv_a": "branch2.conv_a",
               "branch.bn_a": "branch2.norm_a", "branch.conv_b": "branch2.conv_b", "branch.bn_b": "branch2.norm_b.0",
               "branch.se.fc1": "branch2.norm_b.1.block.0", "branch.se.fc2": "branch2.norm_b.1.block.2",
               "branch.conv_c": "branch2.conv_c", "branch.bn_c": "branch2.norm_c"},
    ),
    "mmaction2": _Layout(
        stem_and_head={"stem.conv_xy": "backbone.conv1_s.conv", "stem.conv_t": "backbone.conv1_t.conv",
                       "stem.bn": "backbone.conv1_t.bn", "head.conv": "backbone.conv5.conv",
                       "head.bn": "backbone.conv5.bn", "head.fc": "cls_head.fc1", "head.proj": "cls_head.fc2"},
        block_prefix="backbone.layer{stage1}.{block}.",
        block={"shortcut_conv": "downsample.conv", "shortcut_bn": "downsample.bn", "branch.conv_a": "conv1.conv",
               "branch.bn_a": "conv1.bn", "branch.conv_b": "conv2.conv", "branch.bn_b": "conv2.bn",
               "branch.se.fc1": "se_module.fc1", "branch.se.fc2": "se_module.fc2", "branch.conv_c": "conv3.conv",
               "branch.bn_c": "conv3.bn"},
    ),
}

# The classifier weight of each format; PyTorchVideo's head index depends on the number of stages.
_PROJECTION_WEIGHT = {"slowfast": r"head\.projection\.weight", "pytorchvideo": r"blocks\.\d+\.proj\.weight",
                      "mmaction2": r"cls_head\.fc2\.weight"}

# Keys whose presence identifies each format.
_SIGNATURES = {
    "slowfast": ("s1.pathway0_stem.",),
    "pytorchvideo": ("blocks.0.conv.",),
    "mmaction2": ("backbone.conv1_", "cls_head."),
}


def source_key(name: str, fmt: str, num_stages: int) -> str:
    """The key in a `fmt` state dict that holds our parameter `name`."""
    layout = _LAYOUTS[fmt]
    if ".bn2d." in name:
        module, leaf = name.split(".bn2d.")
        leaf = _BN_LEAVES[leaf]
    else:
        module, leaf = name.rsplit(".", 1)
    match = _BLOCK.fullmatch(module)
    if match:
        stage, block, part = int(match.group(1)), int(match.group(2)), match.group(3)
        prefix = layout.block_prefix.format(stage1=stage + 1, stage2=stage + 2, block=block)
        return f"{prefix}{layout.block[part]}.{leaf}"
    return f"{layout.stem_and_head[module].format(head=num_stages + 1)}.{leaf}"


def extract_state_dict(obj) -> Dict[str, np.ndarray]:
    """The parameter dict inside a loaded checkpoint: PySlowFast and PyTorchVideo keep it under `model_state`,
    MMAction2 under `state_dict`; a bare state dict is taken as is. A DataParallel `module.` prefix is dropped."""
    state = obj
    for _ in range(2):
        if not isinstance(state, Mapping):
            break
        if state and all(isinstance(v, np.ndarray) for v in state.values()):
            break
        inner = next((state[k] for k in ("model_state", "state_dict", "model") if isinstance(state.get(k), Mapping)),
                     None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not state:
        raise WeightsError(f"no state dict in the checkpoint (top level is {type(obj).__name__}"
                           + (f" with keys {', '.join(map(str, list(obj)[:8]))})" if isinstance(obj, Mapping) else ")"))
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)), None)
    if bad is not None:
        raise WeightsError(f"state dict entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def detect_format(keys) -> str:
    keys = list(keys)
    found = [fmt for fmt, prefixes in _SIGNATURES.items() if any(k.startswith(prefixes) for k in keys)]
    if len(found) != 1:
        raise WeightsError(f"cannot tell the checkpoint format from its keys (first: {', '.join(keys[:3])}); "
                           f"set convert.format to one of {', '.join(CHECKPOINT_FORMATS)}")
    return found[0]


def _identity_bn(shape: Tuple[int, ...], eps: float) -> Dict[str, np.ndarray]:
    """BN statistics that pass x through exactly: var + eps rounds to 1.0 in float32."""
    var = np.float32(1.0) - np.float32(eps)
    assert var + np.float32(eps) == np.float32(1.0)
    return {"gamma": np.ones(shape, np.float32), "beta": np.zeros(shape, np.float32),
            "moving_mean": np.zeros(shape, np.float32), "moving_variance": np.full(shape, var, np.float32)}


def _mismatches(missing, unexpected, wrong_shape) -> list:
    """One phrase per kind of key mismatch, for a WeightsError message."""
    kinds = (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong_shape))
    return [f"{len(keys)} {kind}: {_examples(keys)}" for kind, keys in kinds if keys]


def _examples(items: List[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


@dataclass
class Conversion:
    params: Dict[str, np.ndarray]
    format: str
    identity_bn: List[str]
    dropped: List[str]


def network_shapes(network) -> Dict[str, Tuple[int, ...]]:
    return {p.name: tuple(p.shape) for p in network.get_parameters()}


def _bn_eps(network) -> Dict[str, float]:
    """eps of every BatchNorm, keyed by its parameter prefix (`...shortcut_bn.bn2d.`)."""
    out = {}
    for _, cell in network.cells_and_names():
        if hasattr(cell, "moving_variance") and hasattr(cell, "eps"):
            out[f"{cell.moving_variance.name.rsplit('.', 1)[0]}."] = float(cell.eps)
    return out


def convert_state_dict(state: Mapping[str, np.ndarray], network, fmt: str = "auto") -> Conversion:
    """Our parameter arrays from a PyTorch state dict, checked key by key and shape by shape against `network`."""
    fmt = detect_format(state) if fmt == "auto" else fmt
    if fmt not in CHECKPOINT_FORMATS:
        raise WeightsError(f"unknown checkpoint format {fmt!r}; choose auto or one of {', '.join(CHECKPOINT_FORMATS)}")
    shapes = network_shapes(network)
    num_stages = len(network.stages)
    eps = _bn_eps(network)
    params: Dict[str, np.ndarray] = {}
    identity: List[str] = []
    missing, wrong_shape, used = [], [], set()
    for name, shape in shapes.items():
        key = source_key(name, fmt, num_stages)
        if key not in state:
            bn_prefix = name.rsplit(".", 1)[0] + "."
            if fmt == "pytorchvideo" and ".shortcut_bn." in name and not any(
                    source_key(f"{bn_prefix}{leaf}", fmt, num_stages) in state for leaf in _BN_LEAVES):
                # PyTorchVideo's shortcut is a bare conv where the width does not change (first stage).
                params[name] = _identity_bn(shape, eps[bn_prefix])[name.rsplit(".", 1)[1]]
                identity.append(name)
            else:
                missing.append(f"{key} (for {name})")
            continue
        used.add(key)
        array = state[key]
        # PySlowFast and PyTorchVideo keep the 432->2048 head layer as a 1x1x1 conv: (2048, 432, 1, 1, 1).
        if array.shape != shape and array.shape[:len(shape)] == shape and all(d == 1 for d in array.shape[len(shape):]):
            array = array.reshape(shape)
        if array.shape != shape:
            wrong_shape.append(f"{key} {list(array.shape)} (model {name} wants {list(shape)})")
            continue
        params[name] = np.ascontiguousarray(array, dtype=np.float32)
    dropped = sorted(k for k in state if k not in used and k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    problems = _mismatches(missing, unexpected, wrong_shape)
    if problems:
        raise WeightsError(f"{fmt} checkpoint does not fit this model (another variant or class count?): "
                           + "; ".join(problems))
    return Conversion(params, fmt, identity, dropped)


def checkpoint_num_classes(state: Mapping[str, np.ndarray], fmt: str) -> Optional[int]:
    """Row count of the checkpoint's classifier weight, or None if it has none."""
    pattern = re.compile(_PROJECTION_WEIGHT[fmt])
    rows = {v.shape[0] for k, v in state.items() if pattern.fullmatch(k) and v.ndim == 2}
    return rows.pop() if len(rows) == 1 else None


def save_params(params: Mapping[str, np.ndarray], path: str) -> None:
    """Write a MindSpore .ckpt atomically: a temp file in the same folder, renamed over `path`."""
    import mindspore as ms

    if not path.endswith(".ckpt"):
        raise WeightsError(f"{path}: a MindSpore checkpoint name must end with .ckpt")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # save_checkpoint appends .ckpt to names that lack it, so the temp name keeps the suffix.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=folder)
    os.close(fd)
    try:
        ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def convert_checkpoint(src: str, dst: str, network, fmt: str = "auto") -> Conversion:
    """Read a PyTorch X3D checkpoint, map it onto `network`'s parameters and write them to `dst` (.ckpt)."""
    conversion = convert_state_dict(extract_state_dict(load_torch_checkpoint(src)), network, fmt)
    save_params(conversion.params, dst)
    return conversion


def read_params(path: str) -> Dict[str, np.ndarray]:
    import mindspore as ms

    try:
        loaded = ms.load_checkpoint(path)
    except (ValueError, RuntimeError, OSError) as err:
        hint = (f"; convert PyTorch weights first: task=convert convert.src={path}"
                if path.endswith((".pyth", ".pth", ".pt")) else "")
        raise WeightsError(f"{path}: not a readable MindSpore checkpoint ({err}){hint}") from None
    return {k: v.asnumpy() for k, v in loaded.items()}


def _is_model_param(name: str) -> bool:
    return name.split(".", 1)[0] in ("stem", "stages", "head")


def load_params(network, params: Mapping[str, np.ndarray], skip: Tuple[str, ...] = ()) -> None:
    """Copy `params` into `network`; every parameter not in `skip` must be there with its exact shape."""
    import mindspore as ms

    shapes = network_shapes(network)
    missing = [k for k in shapes if k not in params and k not in skip]
    wrong = [f"{k} {list(params[k].shape)} (model wants {list(s)})" for k, s in shapes.items()
             if k in params and k not in skip and tuple(params[k].shape) != s]
    unexpected = [k for k in params if k not in shapes and _is_model_param(k)]
    problems = _mismatches(missing, unexpected, wrong)
    if problems:
        raise WeightsError("checkpoint does not fit this model (another variant?): " + "; ".join(problems))
    ms.load_param_into_net(network, {k: ms.Parameter(ms.Tensor(params[k]), name=k) for k in shapes
                                     if k not in skip}, strict_load=True)


def params_num_classes(params: Mapping[str, np.ndarray]) -> Optional[int]:
    """The class count of a MindSpore checkpoint's classifier (None when it has none)."""
    weight = params.get(HEAD_PROJECTION[0])
    return None if weight is None else int(weight.shape[0])


def load_pretrained(network, ckpt_path: str, tracking_uri: Optional[str] = None) -> List[str]:
    """Load a .ckpt, or an MLflow model (x3d_exp.weights.mlflow_model: a URI resolved in the store at
    `tracking_uri`), for fine-tuning: everything except a classifier whose class count differs.

    Returns (and logs) the skipped keys. Any other missing, unexpected or mis-shaped parameter is an error
    naming it. Non-model entries (optimizer state saved by training) are ignored.
    """
    from x3d_exp.weights.mlflow_model import local_checkpoint

    params = read_params(local_checkpoint(ckpt_path, tracking_uri))
    shapes = network_shapes(network)
    skipped = [k for k in HEAD_PROJECTION if k in params and k in shapes and tuple(params[k].shape) != shapes[k]]
    load_params(network, params, skip=tuple(skipped))
    if skipped:
        log.info("pretrained %s: kept the new %s (class count %s -> %s)", ckpt_path, ", ".join(skipped),
                 params[HEAD_PROJECTION[0]].shape[0], shapes[HEAD_PROJECTION[0]][0])
    return skipped
