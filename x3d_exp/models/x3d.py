"""X3D in MindSpore, built block by block from the six expansion factors.

The layout follows PySlowFast's X3D layer for layer (including the BN on the
first stage's shortcut), so parameter counts, MACs and converted weights match
the published models. Every width, depth and kernel is an explicit argument of
its builder; `create_x3d` derives the defaults from the factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Tuple

from mindspore import nn, ops
from mindspore.common.initializer import HeNormal, Normal, Zero
from mindspore.common.seed import _get_graph_seed

from x3d_exp import kernels
from x3d_exp.config import FACTORS
from x3d_exp.errors import FactorError

BN_EPS = 1e-5
# MindSpore's momentum weighs the running value: 0.9 here is PyTorch's 0.1.
BN_MOMENTUM = 0.9

# X2D, the network every factor expands (X3D paper, Table 1).
BASE_FRAMES = 1
BASE_CROP = 112
BASE_STEM_WIDTH = 24
BASE_STAGE_WIDTHS = (24, 48, 96, 192)
BASE_STAGE_DEPTHS = (1, 2, 5, 3)
HEAD_WIDTH = 2048
WIDTH_DIVISOR = 8
SE_RATIO = 1.0 / 16
STEM_TEMPORAL_KERNEL = 5
BLOCK_TEMPORAL_KERNEL = 3


def round_width(width: float, multiplier: float, min_width: int = 1, divisor: int = 1) -> int:
    """Scale a channel count and snap it to a multiple of `divisor` (never more than 10% down)."""
    width *= multiplier
    out = max(min_width, int(width + divisor / 2) // divisor * divisor)
    if out < 0.9 * width:
        out += divisor
    return int(out)


def round_repeats(repeats: int, multiplier: float) -> int:
    return int(math.ceil(multiplier * repeats))


def _conv3d(in_channels, out_channels, kernel_size, stride=1, padding=0, group=1, has_bias=False):
    # MSRA fill, fan_out, as PySlowFast's c2_msra_fill does for every conv.
    return nn.Conv3d(
        in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
        padding=_pad6(padding), group=group, has_bias=has_bias,
        weight_init=HeNormal(mode="fan_out", nonlinearity="relu"),
        bias_init=Zero() if has_bias else None,
    )


def _pad6(padding):
    """nn.Conv3d wants (front, back, top, bottom, left, right)."""
    if isinstance(padding, int):
        return padding
    t, h, w = padding
    return (t, t, h, h, w, w)


def _bn(channels: int, zero_init: bool = False, impl: str = "native") -> nn.BatchNorm3d:
    """`impl` auto/custom: the CPU kernel (an nn.BatchNorm3d subclass with the same parameters)."""
    return _bn_act(channels, None, impl, zero_init)[0]


def _bn_act(channels: int, activation: Optional[str], impl: str = "native",
            zero_init: bool = False) -> Tuple[nn.BatchNorm3d, nn.Cell]:
    """BatchNorm3d and the activation after it ("relu", "swish" or None) as two cells.

    On the CPU kernels the BN cell applies the activation in the same pass over
    memory and the activation cell is an identity.
    """
    gamma_init = "zeros" if zero_init else "ones"
    if kernels.resolve_conv_impl(impl) == "custom":
        from x3d_exp.kernels.ops import BatchNormAct3d

        return BatchNormAct3d(channels, BN_EPS, BN_MOMENTUM, gamma_init, activation), nn.Identity()
    bn = nn.BatchNorm3d(channels, eps=BN_EPS, momentum=BN_MOMENTUM, gamma_init=gamma_init)
    return bn, ACTIVATIONS[activation]()


def channelwise_conv3d(channels: int, kernel_size: Sequence[int], stride: Sequence[int] = (1, 1, 1),
                       padding: Optional[Sequence[int]] = None, impl: str = "native") -> nn.Cell:
    """Depthwise Conv3d (groups == channels): X3D's main spatio-temporal operator.

    `impl` selects the backend. "native" is `nn.Conv3d(group=channels)`; other
    backends (see x3d_exp.kernels) keep the same `weight` parameter of shape
    (C, 1, kt, kh, kw), so checkpoints move freely between them.
    """
    if padding is None:
        padding = tuple(k // 2 for k in kernel_size)
    if kernels.resolve_conv_impl(impl) != "custom":
        return _conv3d(channels, channels, tuple(kernel_size), tuple(stride), tuple(padding), group=channels)
    from x3d_exp.kernels.ops import ChannelwiseConv3d

    t, h, w = padding
    return ChannelwiseConv3d(channels, tuple(kernel_size), tuple(stride), (t, t, h, h, w, w))


class Swish(nn.Cell):
    def __init__(self):
        super().__init__()
        self.sigmoid = ops.Sigmoid()

    def construct(self, x):
        return x * self.sigmoid(x)


ACTIVATIONS = {None: nn.Identity, "relu": nn.ReLU, "swish": Swish}


class GlobalMean(nn.Cell):
    """(N, C, T, H, W) -> (N, C, 1, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.mean = ops.ReduceMean(keep_dims=True)

    def construct(self, x):
        return self.mean(x, (2, 3, 4))


class Gate(nn.Cell):
    """`activation(x * gate)`, gate per sample and channel."""

    def __init__(self, activation: Optional[str] = None):
        super().__init__()
        self.activation = ACTIVATIONS[activation]()

    def construct(self, x, gate):
        return self.activation(x * gate)


class SqueezeExcite(nn.Cell):
    """Channel gating from a globally pooled descriptor (1x1x1 convs with bias), then `activation`.

    `impl` auto/custom: pooling and gating (with the activation) on the CPU kernels.
    """

    def __init__(self, channels: int, se_width: int, activation: Optional[str] = None, impl: str = "native"):
        super().__init__()
        if kernels.resolve_conv_impl(impl) == "custom":
            from x3d_exp.kernels.ops import ChannelMean, FusedGate

            self.squeeze, self.excite = ChannelMean(), FusedGate(activation)
        else:
            self.squeeze, self.excite = GlobalMean(), Gate(activation)
        self.fc1 = _conv3d(channels, se_width, 1, has_bias=True)
        self.relu = nn.ReLU()
        self.fc2 = _conv3d(se_width, channels, 1, has_bias=True)
        self.sigmoid = nn.Sigmoid()

    def construct(self, x):
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.squeeze(x)))))
        return self.excite(x, gate)


class X3DStem(nn.Cell):
    """Spatial 1x3x3 conv (stride 1,2,2), then channelwise temporal kx1x1 conv, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, temporal_kernel: int = STEM_TEMPORAL_KERNEL,
                 conv_impl: str = "native"):
        super().__init__()
        self.conv_xy = _conv3d(in_channels, out_channels, (1, 3, 3), (1, 2, 2), (0, 1, 1))
        self.conv_t = channelwise_conv3d(out_channels, (temporal_kernel, 1, 1), impl=conv_impl)
        self.bn, self.relu = _bn_act(out_channels, "relu", conv_impl)

    def construct(self, x):
        return self.relu(self.bn(self.conv_t(self.conv_xy(x))))


class X3DBottleneck(nn.Cell):
    """1x1x1 expand, channelwise kxkxk (spatial stride here), optional SE, Swish, 1x1x1 project."""

    def __init__(self, in_channels: int, inner_channels: int, out_channels: int, spatial_stride: int = 1,
                 temporal_kernel: int = BLOCK_TEMPORAL_KERNEL, se_width: int = 0, conv_impl: str = "native"):
        super().__init__()
        self.conv_a = _conv3d(in_channels, inner_channels, 1)
        self.bn_a, self.relu_a = _bn_act(inner_channels, "relu", conv_impl)
        self.conv_b = channelwise_conv3d(inner_channels, (temporal_kernel, 3, 3), (1, spatial_stride, spatial_stride),
                                         impl=conv_impl)
        # The Swish belongs to the last cell before it (SE's gating, else BN) so the kernels can fuse it.
        if se_width > 0:
            self.bn_b = _bn(inner_channels, impl=conv_impl)
            self.se = SqueezeExcite(inner_channels, se_width, "swish", conv_impl)
            self.swish = nn.Identity()
        else:
            self.bn_b, self.swish = _bn_act(inner_channels, "swish", conv_impl)
            self.se = None
        self.conv_c = _conv3d(inner_channels, out_channels, 1)
        # Zero gamma: each residual block starts as the identity, as in PySlowFast.
        self.bn_c = _bn(out_channels, zero_init=True, impl=conv_impl)

    def construct(self, x):
        x = self.relu_a(self.bn_a(self.conv_a(x)))
        x = self.bn_b(self.conv_b(x))
        if self.se is not None:
            x = self.se(x)
        x = self.swish(x)
        return self.bn_c(self.conv_c(x))


class X3DResBlock(nn.Cell):
    """Bottleneck plus shortcut (1x1x1 conv + BN when the shape changes), add, ReLU."""

    def __init__(self, in_channels: int, inner_channels: int, out_channels: int, spatial_stride: int = 1,
                 temporal_kernel: int = BLOCK_TEMPORAL_KERNEL, se_width: int = 0, conv_impl: str = "native"):
        super().__init__()
        self.branch = X3DBottleneck(in_channels, inner_channels, out_channels, spatial_stride,
                                    temporal_kernel, se_width, conv_impl)
        if in_channels != out_channels or spatial_stride != 1:
            self.shortcut_conv = _conv3d(in_channels, out_channels, 1, (1, spatial_stride, spatial_stride))
            self.shortcut_bn = _bn(out_channels, impl=conv_impl)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None
        self.relu = nn.ReLU()

    def construct(self, x):
        shortcut = x
        if self.shortcut_conv is not None:
            shortcut = self.shortcut_bn(self.shortcut_conv(x))
        return self.relu(shortcut + self.branch(x))


class X3DStage(nn.Cell):
    """`depth` residual blocks; the first one strides and changes width, SE on every other block."""

    def __init__(self, depth: int, in_channels: int, inner_channels: int, out_channels: int,
                 spatial_stride: int = 2, temporal_kernel: int = BLOCK_TEMPORAL_KERNEL,
                 se_width: Optional[int] = None, se_every: int = 2, conv_impl: str = "native"):
        super().__init__()
        if se_width is None:
            se_width = round_width(inner_channels, SE_RATIO, min_width=8, divisor=8)
        blocks = []
        for index in range(depth):
            blocks.append(X3DResBlock(
                in_channels if index == 0 else out_channels, inner_channels, out_channels,
                spatial_stride if index == 0 else 1, temporal_kernel,
                se_width if se_every and index % se_every == 0 else 0, conv_impl,
            ))
        self.blocks = nn.SequentialCell(blocks)

    def construct(self, x):
        return self.blocks(x)


class SeededDropout(nn.Cell):
    """Dropout whose masks follow MindSpore's global seed (`mindspore.set_seed`), so that a seeded training repeats.

    MindSpore 2.10's CPU Dropout op does not: two processes seeded alike drew different masks after some calls (300
    calls on [16, 2048]), and seeded trainings of the default run drifted apart by the second epoch. Its uniform
    sampler with explicit seeds repeats exactly (the same check), so the mask is drawn from it.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        # The seeds nn.Dropout itself derives from the global seed. MindSpore's private helper is kept on purpose:
        # 2.10's public API gives only the global seed (mindspore.get_seed), not the per-op second seed this helper
        # counts per kernel name (so each dropout cell gets its own stream, the same in every process), nor its
        # (0, 0) = random when unseeded. Re-deriving that here would be a copy of it; mindspore.Generator streams
        # (ops.rand(generator=...)) would be a different convention from nn.Dropout's.
        seed, seed2 = _get_graph_seed(0, "dropout")
        self.uniform = ops.UniformReal(seed=seed, seed2=seed2)

    def construct(self, x):
        if not self.training:
            return x
        keep = ops.cast(self.uniform(ops.shape(x)) >= self.p, x.dtype)
        return x * keep * (1.0 / (1.0 - self.p))


class X3DHead(nn.Cell):
    """1x1x1 conv + BN + ReLU, global average pool, 2048-wide layer + ReLU, dropout, classifier.

    Pooling is global over whatever T x H x W arrives, so the network accepts
    test crops larger than the training crop (fully convolutional testing).
    """

    def __init__(self, in_channels: int, inner_channels: int, head_width: int, num_classes: int,
                 dropout: float = 0.5, conv_impl: str = "native"):
        super().__init__()
        self.conv = _conv3d(in_channels, inner_channels, 1)
        self.bn, self.relu = _bn_act(inner_channels, "relu", conv_impl)
        self.mean = ops.ReduceMean(keep_dims=False)
        # PySlowFast's `lin_5` is a bias-free 1x1x1 conv on the pooled vector: a Dense layer.
        self.fc = nn.Dense(inner_channels, head_width, has_bias=False,
                           weight_init=HeNormal(mode="fan_out", nonlinearity="relu"))
        self.fc_relu = nn.ReLU()
        self.dropout = SeededDropout(dropout) if dropout > 0 else None
        self.proj = nn.Dense(head_width, num_classes, weight_init=Normal(0.01), bias_init=Zero())

    def construct(self, x):
        x = self.relu(self.bn(self.conv(x)))
        x = self.fc_relu(self.fc(self.mean(x, (2, 3, 4))))
        if self.dropout is not None:
            x = self.dropout(x)
        return self.proj(x)


class X3D(nn.Cell):
    """Input (N, 3, T, H, W) float; output (N, num_classes) logits."""

    def __init__(self, stem: nn.Cell, stages: Sequence[nn.Cell], head: nn.Cell, spec: "X3DSpec"):
        super().__init__()
        self.stem = stem
        self.stages = nn.SequentialCell(list(stages))
        self.head = head
        self.spec = spec

    def construct(self, x):
        return self.head(self.stages(self.stem(x)))


@dataclass
class X3DSpec:
    """Every size of an X3D network, derived from the expansion factors unless given."""

    gamma_t: float = 1.0
    gamma_tau: float = 1.0
    gamma_s: float = 1.0
    gamma_w: float = 1.0
    gamma_b: float = 2.25
    gamma_d: float = 1.0
    num_classes: int = 400
    num_frames: Optional[int] = None
    sampling_rate: Optional[int] = None
    crop_size: Optional[int] = None
    test_crop_size: Optional[int] = None
    train_scale: Optional[Sequence[int]] = None
    stem_width: Optional[int] = None
    stage_widths: Optional[Sequence[int]] = None
    inner_widths: Optional[Sequence[int]] = None
    stage_depths: Optional[Sequence[int]] = None
    head_inner_width: Optional[int] = None
    head_width: int = HEAD_WIDTH
    dropout: float = 0.5
    # "auto": the CPU kernels when MindSpore runs on the CPU and they build here, else nn.Conv3d (x3d_exp.kernels).
    conv_impl: str = "auto"

    def __post_init__(self):
        for name in FACTORS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FactorError(f"model.{name} must be a number, got {value!r}")
            if not value > 0:
                raise FactorError(f"model.{name} must be > 0, got {value}")
        if self.num_frames is None:
            self.num_frames = max(1, int(round(BASE_FRAMES * self.gamma_t)))
        if self.sampling_rate is None:
            self.sampling_rate = max(1, int(round(self.gamma_tau)))
        if self.crop_size is None:
            # 112 * gamma_s, snapped to a multiple of 16 (160 for sqrt(2), 224 for 2).
            self.crop_size = max(32, int(round(BASE_CROP * self.gamma_s / 16)) * 16)
        if self.test_crop_size is None:
            # The 256/224 ratio of the published test protocol (182 for 160, 256 for 224).
            self.test_crop_size = int(self.crop_size * 8 / 7)
        if self.train_scale is None:
            self.train_scale = (self.test_crop_size, int(self.crop_size * 10 / 7))
        if self.stem_width is None:
            self.stem_width = round_width(BASE_STEM_WIDTH, self.gamma_w, divisor=WIDTH_DIVISOR)
        if self.stage_widths is None:
            self.stage_widths = [round_width(w, self.gamma_w, divisor=WIDTH_DIVISOR) for w in BASE_STAGE_WIDTHS]
        if self.inner_widths is None:
            self.inner_widths = [int(self.gamma_b * w) for w in self.stage_widths]
        if self.stage_depths is None:
            self.stage_depths = [round_repeats(d, self.gamma_d) for d in BASE_STAGE_DEPTHS]
        if self.head_inner_width is None:
            self.head_inner_width = self.inner_widths[-1]
        checks = {
            "num_frames": [self.num_frames], "sampling_rate": [self.sampling_rate],
            "crop_size": [self.crop_size], "test_crop_size": [self.test_crop_size],
            "stem_width": [self.stem_width], "stage_widths": self.stage_widths,
            "inner_widths": self.inner_widths, "stage_depths": self.stage_depths,
            "head_inner_width": [self.head_inner_width], "head_width": [self.head_width],
            "num_classes": [self.num_classes],
        }
        for name, values in checks.items():
            for value in values:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise FactorError(f"model.{name} must be a positive integer, got {value!r}")
        if not (len(self.stage_widths) == len(self.inner_widths) == len(self.stage_depths)):
            raise FactorError("model.stage_widths, model.inner_widths and model.stage_depths must have equal length")
        if not 0 <= self.dropout < 1:
            raise FactorError(f"model.dropout must be in [0, 1), got {self.dropout}")
        # Resolved here, so the built network records the backend it really uses (fuse.inference_network reads
        # it). MindSpore's own channelwise Conv3d runs one oneDNN call per channel on the CPU.
        self.conv_impl = kernels.resolve_conv_impl(self.conv_impl)

    @property
    def input_shape(self):
        return [3, self.num_frames, self.crop_size, self.crop_size]


def create_x3d(spec: X3DSpec) -> X3D:
    """The one function from expansion factors (via the resolved `X3DSpec`) to a network."""
    stem = X3DStem(3, spec.stem_width, conv_impl=spec.conv_impl)
    stages = []
    in_channels = spec.stem_width
    for depth, inner, out in zip(spec.stage_depths, spec.inner_widths, spec.stage_widths):
        stages.append(X3DStage(depth, in_channels, inner, out, conv_impl=spec.conv_impl))
        in_channels = out
    head = X3DHead(in_channels, spec.head_inner_width, spec.head_width, spec.num_classes, spec.dropout,
                   spec.conv_impl)
    return X3D(stem, stages, head, spec)


# The published points of the family. Anything not given derives from the factors.
VARIANTS = {
    "x2d": dict(gamma_t=1, gamma_tau=1, gamma_s=1, gamma_w=1, gamma_b=1, gamma_d=1),
    # XS, S and M: crops 160/224, test crops 182/256 and scale jitter derive from gamma_s, so expanding gamma_s
    # changes them.
    "x3d_xs": dict(gamma_t=4, gamma_tau=12, gamma_s=math.sqrt(2), gamma_d=2.2),
    "x3d_s": dict(gamma_t=13, gamma_tau=6, gamma_s=math.sqrt(2), gamma_d=2.2),
    "x3d_m": dict(gamma_t=16, gamma_tau=5, gamma_s=2, gamma_d=2.2),
    # L and XL: the published crops (312, 356) are not the multiples of 16 that gamma_s rounds to.
    "x3d_l": dict(gamma_t=16, gamma_tau=5, gamma_s=2 * math.sqrt(2), gamma_d=5.0,
                  crop_size=312, test_crop_size=356, train_scale=(356, 446)),
    # PySlowFast's WIDTH_FACTOR 2.9 over its base width 12; our gamma_w=1 is its 2.0 (base 24).
    "x3d_xl": dict(gamma_t=16, gamma_tau=5, gamma_s=2 * math.sqrt(2), gamma_w=1.45, gamma_d=5.0,
                   crop_size=356, test_crop_size=356, train_scale=(356, 446)),
}


def build_model(name: str = "custom", num_classes: int = 400, **overrides) -> X3D:
    """`build_model("x3d_m", num_classes=400, gamma_w=1.5)` -> an `nn.Cell`.

    `name` is a published variant (see VARIANTS) or "custom" (X2D factors as the start).
    Keyword arguments override any field of `X3DSpec`. `conv_impl` defaults to "auto", the fast path: on the
    CPU the C++ kernels (x3d_exp.kernels), elsewhere MindSpore's layers; "native" forces MindSpore's layers.
    """
    if name != "custom" and name not in VARIANTS:
        raise FactorError(f"unknown model {name!r}; choose from {', '.join(sorted(VARIANTS))} or 'custom'")
    kwargs = dict(VARIANTS.get(name, {}))
    given = {k: v for k, v in overrides.items() if v is not None}
    if "gamma_s" in given and given["gamma_s"] != kwargs.get("gamma_s"):
        # The variant's pinned crops belong to its own resolution: an expanded gamma_s derives new ones.
        for key in ("crop_size", "test_crop_size", "train_scale"):
            kwargs.pop(key, None)
    kwargs.update(given)
    kwargs["num_classes"] = num_classes
    unknown = set(kwargs) - {f.name for f in fields(X3DSpec)}
    if unknown:
        raise FactorError(f"unknown model option(s): {', '.join(sorted(unknown))}")
    return create_x3d(X3DSpec(**kwargs))


def build_from_config(model, num_classes: int, conv_impl: Optional[str] = None) -> X3D:
    """The network of a composed `model` config group (x3d_exp.config.ModelConfig): its keys are `build_model`'s
    (null sizes derive from the factors), and `model.cpu_kernels` is the `conv_impl` unless one is given."""
    options = {key: (list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value)
               for key, value in model.items()}
    name, cpu_kernels = options.pop("name"), options.pop("cpu_kernels")
    return build_model(name, num_classes=num_classes, conv_impl=conv_impl or cpu_kernels, **options)
