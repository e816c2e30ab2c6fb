"""The channelwise Conv3d Cell on top of the C++ kernels (MindSpore Custom AOT ops)."""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Sequence, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeNormal, initializer

from x3d_exp.kernels.build import KernelBuildError, build_library

logger = logging.getLogger("x3d_exp.kernels")

FORWARD_SYMBOL = "ChannelwiseConv3dForward"
BACKWARD_SYMBOL = "ChannelwiseConv3dBackward"


@functools.lru_cache(maxsize=None)
def kernel_library() -> str:
    """Path of the compiled, loadable kernel library; raises KernelBuildError otherwise."""
    path = build_library()
    try:
        lib = ctypes.CDLL(str(path))
        getattr(lib, FORWARD_SYMBOL)
        getattr(lib, BACKWARD_SYMBOL)
    except (OSError, AttributeError) as err:
        raise KernelBuildError(f"cannot load {path}: {err}") from err
    return str(path)


@functools.lru_cache(maxsize=None)
def kernels_available() -> bool:
    """Whether the kernels build here; warns once (one line) when they don't."""
    try:
        kernel_library()
    except KernelBuildError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        logger.warning("channelwise Conv3d kernels unavailable, using nn.Conv3d instead: %s", reason[:300])
        return False
    return True


def _out_size(size: int, kernel: int, stride: int, before: int, after: int) -> int:
    return (size + before + after - kernel) // stride + 1


@functools.lru_cache(maxsize=None)
def _primitive(library: str, stride: Tuple[int, int, int], padding: Tuple[int, ...]) -> ops.Custom:
    """Forward Custom op for one stride/padding (output shapes depend on them), with its bprop."""

    def forward_shape(x, weight, geometry):
        return [x[0], x[1]] + [_out_size(x[2 + i], weight[2 + i], stride[i], padding[2 * i], padding[2 * i + 1])
                               for i in range(3)]

    def forward_dtype(x, weight, geometry):
        return x

    backward = ops.Custom(f"{library}:{BACKWARD_SYMBOL}", out_shape=lambda x, w, g, dy: (x, w),
                          out_dtype=lambda x, w, g, dy: (x, w), func_type="aot")
    zeros_like = ops.ZerosLike()

    def bprop(x, weight, geometry, out, dout):
        dx, dweight = backward(x, weight, geometry, dout)
        return dx, dweight, zeros_like(geometry)

    return ops.Custom(f"{library}:{FORWARD_SYMBOL}", out_shape=forward_shape, out_dtype=forward_dtype,
                      func_type="aot", bprop=bprop)


class ChannelwiseConv3d(nn.Cell):
    """Depthwise Conv3d (groups == channels) on the C++ kernels; float32, NCDHW.

    Same `weight` parameter (C, 1, kt, kh, kw) and initialisation as the
    `nn.Conv3d` it replaces, so checkpoints are interchangeable.
    """

    counts_as_conv = True

    def __init__(self, channels: int, kernel_size: Sequence[int], stride: Sequence[int] = (1, 1, 1),
                 padding: Sequence[int] = (0, 0, 0, 0, 0, 0)):
        super().__init__()
        kernel_size, stride, padding = tuple(kernel_size), tuple(stride), tuple(padding)
        if len(kernel_size) != 3 or len(stride) != 3 or len(padding) != 6:
            raise ValueError("kernel_size and stride need 3 values, padding 6 (front, back, top, bottom, left, right)")
        self.in_channels = self.out_channels = self.group = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.weight = Parameter(initializer(HeNormal(mode="fan_out", nonlinearity="relu"),
                                            (channels, 1, *kernel_size)), name="weight")
        # The kernel reads stride and padding from this constant input.
        self.geometry = Tensor(np.array(stride + padding, np.int64))
        self.conv = _primitive(kernel_library(), stride, padding)

    def construct(self, x):
        return self.conv(x, self.weight, self.geometry)

    def extend_repr(self):
        return f"channels={self.group}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
