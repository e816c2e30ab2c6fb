"""Hand-written CPU kernels for X3D: channelwise 3D convolutions, BatchNorm with its activation, SE.

MindSpore's CPU Conv3d runs channelwise kernels as oneDNN's reference or GEMM
code; these C++ kernels (forward and both gradients) are several times
faster. BatchNorm, Swish and the SE pooling and gating run as chains of
MindSpore ops, one pass over memory each; the fused kernels make each one or
two passes. They are compiled on first use and cached (see `build`).

- `resolve_cpu_kernels(setting, device)`: the `conv_impl` for the model from
  the config switch `model.cpu_kernels` (`auto|native|custom`).
- `use_kernels(impl)`: whether the model's layers for `conv_impl` run on these kernels.
- `ops.ChannelwiseConv3d`: the channelwise conv layer (x3d_exp.models.x3d decides when to use it).
- `ops.BatchNormAct3d`, `ops.ChannelMean`, `ops.Gate`: the fused layers.
"""

from __future__ import annotations

from x3d_exp.kernels.build import KernelBuildError

SETTINGS = ("auto", "native", "custom")

__all__ = ["SETTINGS", "KernelBuildError", "resolve_cpu_kernels", "use_kernels"]


def resolve_cpu_kernels(setting: str, device: str) -> str:
    """`conv_impl` to build the model with: "custom" or "native".

    Off the CPU always "native" (cuDNN and Ascend's kernels are fine). On the
    CPU "auto" means the C++ kernels when they build here, else "native" with
    one warning line; "custom" demands them and raises KernelBuildError.
    """
    if setting not in SETTINGS:
        raise ValueError(f"model.cpu_kernels must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if str(device).upper() != "CPU" or setting == "native":
        return "native"
    from x3d_exp.kernels.ops import kernel_library, kernels_available

    if setting == "custom":
        kernel_library()
        return "custom"
    return "custom" if kernels_available() else "native"


def use_kernels(impl: str) -> bool:
    """True for "custom" (raising KernelBuildError if the kernels do not build) and for "auto" when they
    build; False for "native" and for "auto" without them (after one warning line)."""
    if impl == "native":
        return False
    if impl not in ("auto", "custom"):
        raise ValueError(f"unknown conv impl {impl!r}; choose native, auto or custom")
    from x3d_exp.kernels.ops import kernel_library, kernels_available

    if impl == "custom":
        kernel_library()
        return True
    return kernels_available()
