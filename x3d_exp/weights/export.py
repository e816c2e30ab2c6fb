"""Export a network for deployment (MINDIR; ONNX with a padding fix) and check that the file reproduces it."""

from __future__ import annotations

import os
import tempfile
from typing import Sequence, Tuple

import numpy as np

from x3d_exp.weights.convert import WeightsError

EXPORT_FORMATS = {"MINDIR": ".mindir", "ONNX": ".onnx"}


def _fix_onnx_conv3d_pads(path: str) -> int:
    """MindSpore 2.10 writes Conv3d pads in its own order (d0, d1, h0, h1, w0, w1); ONNX reads them as
    (d0, h0, w0, d1, h1, w1). Reorder them in place; returns how many Conv nodes were rewritten."""
    try:
        import onnx
    except ImportError:
        raise WeightsError("export.format=ONNX needs the onnx package (pip install onnx): MindSpore 2.10's "
                           "Conv3d padding has to be corrected in the exported graph") from None
    model = onnx.load(path)
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        for attr in node.attribute:
            if attr.name == "pads" and len(attr.ints) == 6:
                d0, d1, h0, h1, w0, w1 = attr.ints
                attr.ints[:] = [d0, h0, w0, d1, h1, w1]
                fixed += 1
    onnx.save(model, path)
    return fixed


def export_model(network, input_shape: Sequence[int], path: str, fmt: str = "MINDIR") -> str:
    """Export `network` (set to inference mode) for an input of `input_shape`; the file is written atomically.

    `path` gets the format's suffix if it lacks it; the final path is returned.
    """
    import mindspore as ms

    fmt = fmt.upper()
    if fmt not in EXPORT_FORMATS:
        raise WeightsError(f"export format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    suffix = EXPORT_FORMATS[fmt]
    if not path.endswith(suffix):
        path += suffix
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    network.set_train(False)
    example = ms.Tensor(np.zeros(tuple(input_shape), np.float32))
    with tempfile.TemporaryDirectory(prefix=".export-", dir=folder) as tmp:
        # export() adds the suffix itself and wants a plain file name.
        stem = os.path.join(tmp, "model")
        ms.export(network, example, file_name=stem, file_format=fmt)
        if fmt == "ONNX":
            _fix_onnx_conv3d_pads(stem + suffix)
        os.replace(stem + suffix, path)
    return path


def run_exported(path: str, inputs: np.ndarray) -> np.ndarray:
    """Outputs of an exported file: MINDIR through mindspore.load + nn.GraphCell, ONNX through onnxruntime."""
    if path.endswith(".onnx"):
        try:
            import onnxruntime
        except ImportError:
            raise WeightsError("checking an ONNX export needs onnxruntime (pip install onnxruntime), "
                               "or set export.verify=false") from None

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: inputs})[0]
    import mindspore as ms

    cell = ms.nn.GraphCell(ms.load(path))
    return cell(ms.Tensor(inputs)).asnumpy()


def verify_export(network, path: str, inputs: np.ndarray) -> Tuple[float, float]:
    """Max abs difference between the exported file's output and the network's on `inputs`, and the
    network's largest absolute output (the scale to judge the difference by)."""
    import mindspore as ms

    network.set_train(False)
    expected = network(ms.Tensor(inputs)).asnumpy()
    got = run_exported(path, inputs)
    if got.shape != expected.shape:
        raise WeightsError(f"{path}: output shape {got.shape}, network gives {expected.shape}")
    return float(np.abs(got - expected).max()), float(np.abs(expected).max())
