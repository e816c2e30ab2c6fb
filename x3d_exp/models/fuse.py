"""An inference network from a trained X3D, with its BatchNorms folded into the C++ kernels.

In eval mode a BatchNorm is an affine map per channel. Around each
channelwise conv the CPU kernel applies them on the way in and out of the
buffers it fills anyway: the stem's conv_t takes its BN + ReLU, each block's
conv_b takes bn_a + ReLU before it and bn_b (+ Swish without SE) after it.
Each block's residual join takes bn_c, the shortcut's BN, the sum and the
ReLU. Per block that is four passes over memory and four ops fewer.

    fused = fuse_for_inference(network)   # network: trained, any conv_impl
    logits = fused(x)                     # == network.set_train(False)(x), within 1e-5

The result is a new network holding a snapshot of the weights (the original
is untouched): build it after loading a checkpoint, for task=test and
task=infer; not for evaluation between training epochs unless rebuilt (and
recompiled) each time, nor for export (the MINDIR would call this machine's
kernel library). It needs the CPU kernels and runs in eval mode only.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from mindspore import nn

from x3d_exp.models.x3d import X3D, X3DBottleneck, X3DResBlock, create_x3d


class InferenceResBlock(nn.Cell):
    """X3DResBlock with bn_c, shortcut_bn, the sum and the ReLU in one kernel (see `fuse_for_inference`)."""

    def __init__(self, block: X3DResBlock):
        from x3d_exp.kernels.ops import ResidualRelu

        super().__init__()
        channels = block.branch.bn_c.bn2d.gamma.shape[0]
        self.residual = ResidualRelu(np.stack(_scale_shift(block.branch.bn_c, channels)
                                              + _scale_shift(block.shortcut_bn, channels)))
        block.branch.bn_c = nn.Identity()
        self.branch = block.branch
        self.shortcut_conv = block.shortcut_conv

    def construct(self, x):
        shortcut = x
        if self.shortcut_conv is not None:
            shortcut = self.shortcut_conv(x)
        return self.residual(self.branch(x), shortcut)


def fuse_for_inference(network: X3D) -> X3D:
    """A copy of `network` for inference with the eval-mode BatchNorms folded into the channelwise convs."""
    from x3d_exp.kernels import resolve_conv_impl
    from x3d_exp.kernels.ops import FusedChannelwiseConv3d

    resolve_conv_impl("custom", "CPU")  # raises KernelBuildError without them
    fused = create_x3d(dataclasses.replace(network.spec, conv_impl="custom"))
    values = {p.name: p for p in network.get_parameters()}
    for param in fused.get_parameters():
        param.set_data(values[param.name].data.copy())
    fused.set_train(False)

    stem = fused.stem
    stem.conv_t = FusedChannelwiseConv3d(stem.conv_t, _affine(None, stem.bn), None, stem.bn.activation)
    stem.bn = nn.Identity()
    for cell in [c for _, c in fused.cells_and_names() if isinstance(c, X3DBottleneck)]:
        cell.conv_b = FusedChannelwiseConv3d(cell.conv_b, _affine(cell.bn_a, cell.bn_b), cell.bn_a.activation,
                                             cell.bn_b.activation)
        cell.bn_a = nn.Identity()
        cell.bn_b = nn.Identity()
    for stage in fused.stages:
        for index, block in enumerate(list(stage.blocks)):
            stage.blocks[index] = InferenceResBlock(block)
    fused.set_train(False)
    return fused


def inference_network(network: X3D) -> X3D:
    """For a one-off evaluation: with the CPU kernels, a copy with the eval BatchNorms folded into them (about half
    the forward time, same logits within 1e-5); else the network itself. Not between epochs: each copy compiles
    anew."""
    return network if network.spec.conv_impl == "native" else fuse_for_inference(network)


def _scale_shift(bn: Optional[nn.BatchNorm3d], channels: int):
    """(scale, shift) of an eval-mode BatchNorm: gamma (x - mean) / sqrt(var + eps) + beta."""
    if bn is None:
        return np.ones(channels), np.zeros(channels)
    b = bn.bn2d
    scale = b.gamma.asnumpy().astype(np.float64) / np.sqrt(b.moving_variance.asnumpy().astype(np.float64) + b.eps)
    return scale, b.beta.asnumpy() - b.moving_mean.asnumpy() * scale


def _affine(before: Optional[nn.BatchNorm3d], after: nn.BatchNorm3d) -> np.ndarray:
    channels = after.bn2d.gamma.shape[0]
    return np.stack(_scale_shift(before, channels) + _scale_shift(after, channels))
