"""Hand-written CPU kernels for X3D: channelwise 3D convolutions, BatchNorm with its activation, SE.

MindSpore's CPU Conv3d runs channelwise kernels as oneDNN's reference or GEMM
code; these C++ kernels (forward and both gradients) are several times
faster. BatchNorm, Swish and the SE pooling and gating run as chains of
MindSpore ops, one pass over memory each; the fused kernels make each one or
two passes. They are compiled on first use and cached (see `build`).

- `resolve_conv_impl(setting, device)`: the one rule from a `conv_impl` / `model.cpu_kernels` setting
  (`auto|native|custom`) to the backend the layers are built with, "custom" or "native".
- `ops.ChannelwiseConv3d`: the channelwise conv layer (x3d_exp.models.x3d decides when to use it).
- `ops.BatchNormAct3d`, `ops.ChannelMean`, `ops.FusedGate`: the fused layers.
"""

from __future__ import annotations

from typing import Optional

from x3d_exp.kernels.build import KernelBuildError

SETTINGS = ("auto", "native", "custom")

__all__ = ["SETTINGS", "KernelBuildError", "resolve_conv_impl"]


def resolve_conv_impl(setting: str, device: Optional[str] = None) -> str:
    """The backend to build the layers with: "custom" (these kernels) or "native" (MindSpore's layers).

    Off the CPU always "native" (cuDNN and Ascend's kernels are fine). On the CPU "auto" means the C++ kernels
    when they build here, else "native" with one warning line; "custom" demands them and raises KernelBuildError.
    `device` defaults to MindSpore's device_target, where the cells will run: the engine sets it from the config
    (engine.build.setup_context) before it builds a network, and passes the same device here.
    """
    if setting not in SETTINGS:
        raise ValueError(f"model.cpu_kernels / conv_impl must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if device is None:
        import mindspore as ms

        device = ms.get_context("device_target")
    if str(device).upper() != "CPU" or setting == "native":
        return "native"
    from x3d_exp.kernels.ops import kernel_library, kernels_available

    if setting == "custom":
        kernel_library()
        return "custom"
    return "custom" if kernels_available() else "native"
