"""Cells on top of the C++ kernels (MindSpore Custom AOT ops): channelwise Conv3d, BatchNorm with its
activation, and the SE squeeze and gate."""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Optional, Sequence, Tuple

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
        for symbol in (FORWARD_SYMBOL, BACKWARD_SYMBOL, "BatchNormSwishTrain", "GateSwishGrad"):
            getattr(lib, symbol)
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


class FusedChannelwiseConv3d(nn.Cell):
    """Inference only: `out_act(conv(in_act(x * in_scale + in_shift)) * out_scale + out_shift)` in one kernel.

    Made by `x3d_exp.models.fuse` from a ChannelwiseConv3d and the eval-mode
    BatchNorms (with their activations) before and after it. Holds constants,
    not parameters: a snapshot of the weights it was made from. No gradient.
    (in_act, out_act) is one of X3D's: (None, "relu") for the stem, ("relu", None) and ("relu", "swish") for
    blocks with and without SE; in_act None leaves x as it is (the input half of `affine` unused).
    """

    COMBINATIONS = ((None, "relu"), ("relu", None), ("relu", "swish"))

    def __init__(self, conv: ChannelwiseConv3d, affine: np.ndarray, in_act: Optional[str], out_act: Optional[str]):
        super().__init__()
        if (in_act, out_act) not in self.COMBINATIONS:
            raise ValueError(f"no fused kernel for activations in={in_act!r}, out={out_act!r}")
        self.stride, self.padding, self.group = conv.stride, conv.padding, conv.group
        self.in_act, self.out_act = in_act, out_act
        self.weight = Tensor(conv.weight.asnumpy())
        self.geometry = conv.geometry
        self.affine = Tensor(np.asarray(affine, np.float32).reshape(4, conv.group))
        symbol = f"ChannelwiseConv3dFused_{in_act or 'none'}_{out_act or 'none'}"
        self.conv = ops.Custom(f"{kernel_library()}:{symbol}", out_shape=_fused_shape(conv.stride, conv.padding),
                               out_dtype=lambda x, w, g, a: x, func_type="aot")

    def construct(self, x):
        return self.conv(x, self.weight, self.geometry, self.affine)

    def extend_repr(self):
        return f"channels={self.group}, stride={self.stride}, in_act={self.in_act}, out_act={self.out_act}"


class ResidualRelu(nn.Cell):
    """Inference only: `relu(branch * bs + bt + shortcut * ss + st)` per channel, one pass; `affine` (4, C).

    A block's last BatchNorm, its shortcut's BatchNorm (or 1 and 0), the sum and the ReLU, folded by
    `x3d_exp.models.fuse`. Holds constants; no gradient.
    """

    def __init__(self, affine: np.ndarray):
        super().__init__()
        self.affine = Tensor(np.asarray(affine, np.float32))
        self.join = ops.Custom(f"{kernel_library()}:ResidualRelu", out_shape=lambda b, s, a: b,
                               out_dtype=lambda b, s, a: b, func_type="aot")

    def construct(self, branch, shortcut):
        return self.join(branch, shortcut, self.affine)


def _fused_shape(stride, padding):
    def shape(x, weight, geometry, affine):
        return [x[0], x[1]] + [_out_size(x[2 + i], weight[2 + i], stride[i], padding[2 * i], padding[2 * i + 1])
                               for i in range(3)]

    return shape


# Activation name -> the kernels' symbol infix.
ACTIVATION_SUFFIXES = {None: "", "relu": "Relu", "swish": "Swish"}


def _zeros(*inputs):
    return tuple(ops.zeros_like(x) for x in inputs)


@functools.lru_cache(maxsize=None)
def _batchnorm_primitives(library: str, activation: Optional[str]) -> Tuple[ops.Custom, ops.Custom]:
    """(training, inference) forward ops for one activation, each with its bprop."""
    name = f"{library}:BatchNorm{ACTIVATION_SUFFIXES[activation]}"
    grad_shape = lambda x, gamma, *rest: (x, gamma, gamma)  # noqa: E731
    train_grad = ops.Custom(f"{name}TrainGrad", out_shape=grad_shape, out_dtype=grad_shape, func_type="aot")
    infer_grad = ops.Custom(f"{name}InferGrad", out_shape=grad_shape, out_dtype=grad_shape, func_type="aot")

    def train_bprop(x, gamma, beta, mean, var, hyper, out, dout):
        # out: y, batch mean, batch invstd, new running mean and variance (no gradient flows from those).
        dx, dgamma, dbeta = train_grad(x, gamma, beta, out[1], out[2], dout[0])
        return (dx, dgamma, dbeta) + _zeros(mean, var, hyper)

    def infer_bprop(x, gamma, beta, mean, var, hyper, out, dout):
        dx, dgamma, dbeta = infer_grad(x, gamma, beta, mean, var, hyper, dout)
        return (dx, dgamma, dbeta) + _zeros(mean, var, hyper)

    train_shape = lambda x, gamma, *rest: (x, gamma, gamma, gamma, gamma)  # noqa: E731
    train = ops.Custom(f"{name}Train", out_shape=train_shape, out_dtype=train_shape, func_type="aot",
                       bprop=train_bprop)
    infer = ops.Custom(f"{name}Infer", out_shape=lambda x, *rest: x, out_dtype=lambda x, *rest: x,
                       func_type="aot", bprop=infer_bprop)
    return train, infer


class BatchNormAct3d(nn.BatchNorm3d):
    """nn.BatchNorm3d, then `activation` (None, "relu" or "swish"), in one C++ kernel; float32.

    A subclass, so parameters (`bn2d.gamma`, `bn2d.moving_mean`, ...), their
    initialisation and checkpoints are those of nn.BatchNorm3d. Training uses
    batch statistics and updates the running ones as MindSpore does (unbiased
    variance, `momentum` weighing the running value); evaluation uses the
    running ones.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9, gamma_init="ones",
                 activation: Optional[str] = None):
        super().__init__(num_features, eps=eps, momentum=momentum, gamma_init=gamma_init)
        if activation not in ACTIVATION_SUFFIXES:
            raise ValueError(f"unknown activation {activation!r}; choose from {list(ACTIVATION_SUFFIXES)}")
        self.activation = activation
        # _BatchNorm keeps 1 - momentum: the weight of the batch statistic, as the kernel takes it.
        self.hyper = Tensor(np.array([eps, self.bn2d.momentum], np.float32))
        self.train_op, self.infer_op = _batchnorm_primitives(kernel_library(), activation)

    def construct(self, x):
        bn = self.bn2d
        if self.training:
            y, _, _, running_mean, running_var = self.train_op(x, bn.gamma, bn.beta, bn.moving_mean,
                                                               bn.moving_variance, self.hyper)
            ops.assign(bn.moving_mean, running_mean)
            ops.assign(bn.moving_variance, running_var)
            return y
        return self.infer_op(x, bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance, self.hyper)

    def extend_repr(self):
        return f"{super().extend_repr()}, activation={self.activation}"


@functools.lru_cache(maxsize=None)
def _mean_primitive(library: str) -> ops.Custom:
    grad = ops.Custom(f"{library}:ChannelMeanGrad", out_shape=lambda x, dmean: x, out_dtype=lambda x, dmean: x,
                      func_type="aot")

    def bprop(x, out, dout):
        return (grad(x, dout),)

    return ops.Custom(f"{library}:ChannelMean", out_shape=lambda x: x[:2] + [1] * (len(x) - 2),
                      out_dtype=lambda x: x, func_type="aot", bprop=bprop)


class ChannelMean(nn.Cell):
    """Mean over all axes after the channel axis, kept as size 1: (N, C, T, H, W) -> (N, C, 1, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.mean = _mean_primitive(kernel_library())

    def construct(self, x):
        return self.mean(x)


@functools.lru_cache(maxsize=None)
def _gate_primitive(library: str, activation: Optional[str]) -> ops.Custom:
    name = f"{library}:Gate{ACTIVATION_SUFFIXES[activation]}"
    grad = ops.Custom(f"{name}Grad", out_shape=lambda x, gate, dy: (x, gate),
                      out_dtype=lambda x, gate, dy: (x, gate), func_type="aot")

    def bprop(x, gate, out, dout):
        return grad(x, gate, dout)

    return ops.Custom(name, out_shape=lambda x, gate: x, out_dtype=lambda x, gate: x, func_type="aot", bprop=bprop)


class FusedGate(nn.Cell):
    """`activation(x * gate)` for x (N, C, ...) and a per-channel gate (N, C, 1, ...): the SE excitation."""

    def __init__(self, activation: Optional[str] = None):
        super().__init__()
        if activation not in (None, "swish"):
            raise ValueError(f"FusedGate supports activation None or 'swish', got {activation!r}")
        self.activation = activation
        self.gate = _gate_primitive(kernel_library(), activation)

    def construct(self, x, gate):
        return self.gate(x, gate)

    def extend_repr(self):
        return f"activation={self.activation}"
