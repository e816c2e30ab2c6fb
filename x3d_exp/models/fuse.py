"""An inference network from a trained X3D, with BatchNorms folded into the channelwise convolutions.

In eval mode a BatchNorm is an affine map per channel. Around each
channelwise conv the CPU kernel applies them on the way in and out of the
buffers it fills anyway: the stem's conv_t takes its BN + ReLU, each block's
conv_b takes bn_a + ReLU before it and bn_b (+ Swish without SE) after it.
Per block that is two passes over the largest activations and two ops fewer.

    fused = fuse_for_inference(network)   # network: trained, any conv_impl
    logits = fused(x)                     # == network.set_train(False)(x), within 1e-5

The result is a new network holding a snapshot of the weights (the original
is untouched): build it after loading a checkpoint, for task=test, task=infer
and export; not for evaluation between training epochs unless rebuilt (and
recompiled) each time. It needs the CPU kernels and runs in eval mode only.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from mindspore import nn

from x3d_exp.models.x3d import X3D, X3DBottleneck, create_x3d


def fuse_for_inference(network: X3D) -> X3D:
    """A copy of `network` for inference with the eval-mode BatchNorms folded into the channelwise convs."""
    from x3d_exp.kernels import use_kernels
    from x3d_exp.kernels.ops import FusedChannelwiseConv3d

    use_kernels("custom")  # raises KernelBuildError without them
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
    fused.set_train(False)
    return fused


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
