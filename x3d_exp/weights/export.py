"""Export a network for deployment (MINDIR; ONNX with a padding fix) and check that the file reproduces it."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Sequence, Tuple

import numpy as np
from mindspore import Parameter, nn, ops

from x3d_exp.errors import WeightsError

EXPORT_FORMATS = {"MINDIR": ".mindir", "ONNX": ".onnx"}
# The versions setup.cfg's [onnx] extra pins: a bare `pip install onnx` pulls NumPy 2, which breaks MindSpore 2.10.
ONNX_EXTRA = 'pip install -e ".[onnx]"'


def missing_onnx_packages(need_runtime: bool) -> list:
    """The ONNX packages an export needs that do not import (not installed, or built for another NumPy); checked
    before any work."""
    import importlib

    missing = []
    for name in ["onnx"] + (["onnxruntime"] if need_runtime else []):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class ChannelwiseConv3dAsConv2d(nn.Cell):
    """A channelwise nn.Conv3d with temporal stride 1, as a sum of depthwise Conv2d over its temporal taps.

    MindSpore 2.10 compiles a grouped Conv3d for export very slowly (about 13 s and 1.5 GB for one
    432-channel layer; X3D-XS as a whole took 5 minutes and 12 GB) while a depthwise Conv2d exports at once.
    Holds a copy of the Conv3d's weight (the swap must leave the network's own Parameters untouched).
    """

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        channels, _, self.taps, kh, kw = conv.weight.shape
        front, back, top, bottom, left, right = conv.padding
        self.front, self.back = front, back
        self.weight = Parameter(conv.weight.value().copy(), name=conv.weight.name, requires_grad=False)
        self.conv2d = ops.Conv2D(out_channel=channels, kernel_size=(kh, kw), mode=1, pad_mode="pad",
                                 pad=(top, bottom, left, right), stride=tuple(conv.stride[1:]), group=channels)

    def construct(self, x):
        n, c, t, h, w = x.shape
        x = x.transpose(0, 2, 1, 3, 4)
        if self.front or self.back:
            x = ops.concat((ops.zeros((n, self.front, c, h, w), x.dtype), x,
                            ops.zeros((n, self.back, c, h, w), x.dtype)), 1)
        t_out = t + self.front + self.back - self.taps + 1
        out = self.conv2d(x[:, 0:t_out].reshape(n * t_out, c, h, w), self.weight[:, :, 0])
        for k in range(1, self.taps):
            out = out + self.conv2d(x[:, k:k + t_out].reshape(n * t_out, c, h, w), self.weight[:, :, k])
        return out.reshape(n, t_out, c, out.shape[2], out.shape[3]).transpose(0, 2, 1, 3, 4)


def _is_channelwise(cell) -> bool:
    return (isinstance(cell, nn.Conv3d) and cell.group > 1 and cell.group == cell.in_channels == cell.out_channels
            and not cell.has_bias and cell.stride[0] == 1 and tuple(cell.dilation) == (1, 1, 1)
            and cell.pad_mode == "pad" and not isinstance(cell.padding, int))


@contextmanager
def _export_friendly(network):
    """`network` with every channelwise Conv3d swapped for ChannelwiseConv3dAsConv2d, put back afterwards."""
    swapped = []
    for _, parent in list(network.cells_and_names()):
        for name, child in list(parent.name_cells().items()):
            if _is_channelwise(child):
                full_name = child.weight.name
                replacement = ChannelwiseConv3dAsConv2d(child)
                setattr(parent, name, replacement)
                # Assigning a cell prefixes its parameters with the attribute name only: keep the full names.
                replacement.weight.name = full_name
                swapped.append((parent, name, child, full_name))
    try:
        yield network
    finally:
        for parent, name, child, full_name in swapped:
            setattr(parent, name, child)
            child.weight.name = full_name


def _fix_onnx_conv3d_pads(path: str) -> int:
    """MindSpore 2.10 writes Conv3d pads in its own order (d0, d1, h0, h1, w0, w1); ONNX reads them as
    (d0, h0, w0, d1, h1, w1). Reorder them in place; returns how many Conv nodes were rewritten."""
    try:
        import onnx
    except ImportError:
        raise WeightsError(f"export.format=ONNX needs the onnx package: {ONNX_EXTRA} (MindSpore 2.10's "
                           "Conv3d padding has to be corrected in the exported graph)") from None
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

    kernel_cells = sorted({type(cell).__name__ for _, cell in network.cells_and_names()
                           if type(cell).__module__ == "x3d_exp.kernels.ops"})
    if kernel_cells:
        # Their Custom ops live in a local .so no other runtime can load.
        raise WeightsError(f"the network runs on x3d_exp's CPU kernels ({', '.join(kernel_cells)}); build it with "
                           "conv_impl='native' to export (the weights load unchanged; task=export does this)")
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
    with tempfile.TemporaryDirectory(prefix=".export-", dir=folder) as tmp, _export_friendly(network) as friendly:
        # export() adds the suffix itself and wants a plain file name.
        stem = os.path.join(tmp, "model")
        ms.export(friendly, example, file_name=stem, file_format=fmt)
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
            raise WeightsError(f"checking an ONNX export needs onnxruntime: {ONNX_EXTRA}, or set "
                               "export.verify=false") from None

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
