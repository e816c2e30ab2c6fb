"""Parameter and multiply-add counts taken from a built network.

Two ways, which the tests hold equal:
- `trace_network` walks the built cells and applies each conv's own kernel,
  stride and padding to the shape flowing in. Instant, even for X3D-L.
- `count_network` hooks every Conv3d and Dense during one real PyNative
  forward of a single clip. Slow on the CPU (a minute for X3D-L), so it is
  the check, not the default.
One multiply-add counts as 1 MAC; BN, activations and pooling are not counted
(the convention of the X3D paper and fvcore).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import nn


@dataclass
class LayerCount:
    name: str
    kind: str
    in_shape: tuple
    out_shape: tuple
    params: int
    macs: int


@dataclass
class NetworkCount:
    input_shape: tuple
    params: int
    layers: List[LayerCount] = field(default_factory=list)
    block_params: dict = field(default_factory=dict)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def by_stage(self):
        """(block name, output shape, params incl. BN, MACs) for the stem, each stage and the head."""
        rows = {}
        for layer in self.layers:
            block = _block_of(layer.name)
            row = rows.setdefault(block, [block, layer.out_shape, self.block_params.get(block, 0), 0])
            row[1] = layer.out_shape
            row[3] += layer.macs
        return [tuple(r) for r in rows.values()]


def _block_of(name: str) -> str:
    parts = name.split(".")
    return f"stage{int(parts[1]) + 1}" if parts[0] == "stages" else parts[0]


def count_parameters(network: nn.Cell) -> int:
    """Trainable parameters, like PyTorch's `sum(p.numel() for p in model.parameters())`."""
    return int(sum(p.size for p in network.trainable_params()))


def _params_by_block(network: nn.Cell) -> dict:
    totals: dict = {}
    for param in network.trainable_params():
        block = _block_of(param.name)
        totals[block] = totals.get(block, 0) + int(param.size)
    return totals


def _conv_macs(cell, out_shape) -> int:
    weight = cell.weight.shape  # (out, in/group, kt, kh, kw)
    per_output = int(np.prod(weight[1:]))
    return int(np.prod(out_shape)) * per_output


def count_network(network: nn.Cell, input_shape: Sequence[int]) -> NetworkCount:
    """Run one clip of `input_shape` (C, T, H, W) through `network` and count every conv and linear layer."""
    layers: List[LayerCount] = []
    handles = []

    def hook_for(name):
        def hook(cell, args, output):
            in_shape = tuple(args[0].shape[1:])
            out_shape = tuple(output.shape[1:])
            own_params = int(sum(p.size for p in cell.trainable_params()))
            if isinstance(cell, nn.Dense):
                macs = int(np.prod(output.shape[1:])) * cell.in_channels
                kind = "linear"
            else:
                macs = _conv_macs(cell, output.shape[1:])
                groups = getattr(cell, "group", 1)
                kind = "conv_channelwise" if groups > 1 else "conv"
            layers.append(LayerCount(name, kind, in_shape, out_shape, own_params, macs))
        return hook

    for name, cell in network.cells_and_names():
        if _is_conv(cell) or isinstance(cell, nn.Dense):
            handles.append(cell.register_forward_hook(hook_for(name)))
    previous_mode = ms.get_context("mode")
    was_training = network.training
    ms.set_context(mode=ms.PYNATIVE_MODE)
    network.set_train(False)
    try:
        network(ms.Tensor(np.zeros((1, *input_shape), np.float32)))
    finally:
        for handle in handles:
            handle.remove()
        network.set_train(was_training)
        ms.set_context(mode=previous_mode)
    return NetworkCount(tuple(input_shape), count_parameters(network), layers, _params_by_block(network))


def _conv_out(size: int, kernel: int, stride: int, pad_before: int, pad_after: int) -> int:
    return (size + pad_before + pad_after - kernel) // stride + 1


def _is_conv(cell) -> bool:
    return isinstance(cell, nn.Conv3d) or getattr(cell, "counts_as_conv", False)


def trace_network(network: nn.Cell, input_shape: Sequence[int]) -> NetworkCount:
    """Count conv and linear layers by propagating the (C, T, H, W) shape through the built cells."""
    from x3d_exp.models.x3d import SqueezeExcite, X3DResBlock

    layers: List[LayerCount] = []

    def record(name, cell, in_shape, out_shape, macs, kind):
        params = int(sum(p.size for p in cell.trainable_params()))
        layers.append(LayerCount(name, kind, tuple(in_shape), tuple(out_shape), params, macs))

    def walk(name: str, cell: nn.Cell, shape: Tuple[int, ...]) -> Tuple[int, ...]:
        if _is_conv(cell):
            kernel = cell.weight.shape[2:]
            stride = _triple(cell.stride)[-3:]
            pads = _pads(cell.padding)
            out = (cell.weight.shape[0],) + tuple(
                _conv_out(shape[1 + i], kernel[i], stride[i], pads[2 * i], pads[2 * i + 1]) for i in range(3))
            groups = getattr(cell, "group", 1)
            record(name, cell, shape, out, _conv_macs(cell, out),
                   "conv_channelwise" if groups > 1 else "conv")
            return out
        if isinstance(cell, nn.Dense):
            out = (cell.out_channels,)
            record(name, cell, (cell.in_channels,), out, cell.in_channels * cell.out_channels, "linear")
            return out
        if isinstance(cell, SqueezeExcite):
            pooled = (shape[0], 1, 1, 1)
            walk(f"{name}.fc2", cell.fc2, walk(f"{name}.fc1", cell.fc1, pooled))
            return shape
        if isinstance(cell, X3DResBlock):
            if cell.shortcut_conv is not None:
                walk(f"{name}.shortcut_conv", cell.shortcut_conv, shape)
            return walk(f"{name}.branch", cell.branch, shape)
        for child_name, child in cell.name_cells().items():
            shape = walk(f"{name}.{child_name}" if name else child_name, child, shape)
        return shape

    walk("", network, tuple(input_shape))
    return NetworkCount(tuple(input_shape), count_parameters(network), layers, _params_by_block(network))


def _triple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


def _pads(padding):
    return tuple(padding) if isinstance(padding, (tuple, list)) else (padding,) * 6


def format_summary(model_name: str, count: NetworkCount) -> str:
    lines = [f"{model_name}: input {list(count.input_shape)} (C, T, H, W)",
             f"{'block':<10} {'output (C, T, H, W)':<24} {'params':>12} {'MMACs':>12}"]
    for name, out_shape, params, macs in count.by_stage():
        lines.append(f"{name:<10} {str(list(out_shape)):<24} {params:>12,} {macs / 1e6:>12.1f}")
    lines.append(f"{'total':<10} {'':<24} {count.params:>12,} {count.macs / 1e6:>12.1f}")
    return "\n".join(lines)
