"""Where our step time goes: MindSpore's profiler, its ops grouped by X3D layer type, and the channelwise convs'
data movement against the machine's copy bandwidth."""

from __future__ import annotations

import csv
import glob
import os
import tempfile
import time
from typing import Callable, Dict, List

from x3d_exp.bench.speed.cases import CASE_TITLES, CASES

# Profiler op types -> the layer types they belong to in X3D. Custom ops (our C++ kernels) go by their cell.
CUSTOM_GROUPS = {
    "ChannelwiseConv3d": "channelwise conv3d (C++ kernels; fused: with the folded BNs)",
    "FusedChannelwiseConv3d": "channelwise conv3d (C++ kernels; fused: with the folded BNs)",
    "BatchNormAct3d": "batchnorm + relu/swish (C++ kernels)",
    "ChannelMean": "pooling (SE, head) and its gradient",
    "FusedGate": "SE gating + swish (C++ kernels)",
    "ResidualRelu": "residual join: BN + add + ReLU (inference, C++ kernels)",
}
CHANNELWISE = CUSTOM_GROUPS["ChannelwiseConv3d"]
OP_GROUPS = {
    "Conv3D": "conv3d (oneDNN: stem 1x3x3, 1x1x1, SE)",
    "Conv3DBackpropInput": "conv3d (oneDNN: stem 1x3x3, 1x1x1, SE)",
    "Conv3DBackpropFilter": "conv3d (oneDNN: stem 1x3x3, 1x1x1, SE)",
    "BatchNorm": "batchnorm (MindSpore)",
    "BatchNormGrad": "batchnorm (MindSpore)",
    "ReLU": "relu / swish / sigmoid / SE gating",
    "ReluGrad": "relu / swish / sigmoid / SE gating",
    "Sigmoid": "relu / swish / sigmoid / SE gating",
    "SigmoidGrad": "relu / swish / sigmoid / SE gating",
    "Mul": "relu / swish / sigmoid / SE gating",
    "ReduceMean": "pooling (SE, head) and its gradient",
    "ReduceSum": "pooling (SE, head) and its gradient",
    "Tile": "pooling (SE, head) and its gradient",
    "RealDiv": "pooling (SE, head) and its gradient",
    "Add": "residual add, gradient accumulation",
    "AddN": "residual add, gradient accumulation",
    "MatMul": "head dense layers",
    "BiasAdd": "head dense layers",
    "BiasAddGrad": "head dense layers",
}


def profile_steps(step: Callable[[], object], steps: int) -> dict:
    """Op milliseconds per step by "layer type|fwd/bwd", the wall time per step with the profiler on, and the
    forward time of each channelwise conv layer."""
    from mindspore.profiler import Profiler

    with tempfile.TemporaryDirectory(prefix="x3d_prof_") as out:
        profiler = Profiler(output_path=out)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
        profiler.analyse()
        files = glob.glob(os.path.join(out, "**", "cpu_op_detail_info_*.csv"), recursive=True)
        if not files:
            raise RuntimeError("the MindSpore profiler wrote no cpu_op_detail_info file")
        groups: Dict[str, float] = {}
        forward_channelwise: Dict[str, float] = {}
        with open(files[0]) as f:
            for row in csv.DictReader(f):
                direction = "bwd" if row["full_op_name"].startswith("Gradients/") else "fwd"
                ms_per_step = float(row["op_total_time(ms)"]) / steps
                group = _op_group(row["op_type"], row["full_op_name"])
                key = f"{group}|{direction}"
                groups[key] = groups.get(key, 0.0) + ms_per_step
                if group == CHANNELWISE and direction == "fwd":
                    forward_channelwise[_layer_name(row["full_op_name"])] = ms_per_step
    return {"groups": groups, "wall_ms": wall * 1e3, "forward_channelwise": forward_channelwise}


def _op_group(op_type: str, full_op_name: str) -> str:
    if op_type == "Custom":
        # '.../conv_b-ChannelwiseConv3d/Custom-op0', backward '.../conv_b-ChannelwiseConv3d/Grad_Custom/Custom-op3'
        for scope in reversed(full_op_name.split("/")[:-1]):
            cell = scope.split("-", 1)[-1]
            if cell in CUSTOM_GROUPS:
                return CUSTOM_GROUPS[cell]
    return OP_GROUPS.get(op_type, "other (optimizer, loss, casts)")


def _layer_name(full_op_name: str) -> str:
    """'Default/stages-SequentialCell/0-X3DStage/.../conv_b-ChannelwiseConv3d/Custom-op0' -> 'stages.0....conv_b'."""
    parts = [p.split("-")[0] for p in full_op_name.split("/")[1:-1]]
    return ".".join(parts)


def format_profile(variant: str, case: str, prof: dict, bandwidth: dict) -> List[str]:
    batch = CASES[case][0]
    groups: Dict[str, Dict[str, float]] = {}
    for key, ms in prof["groups"].items():
        name, direction = key.split("|")
        groups.setdefault(name, {"fwd": 0.0, "bwd": 0.0})[direction] += ms
    total = sum(g["fwd"] + g["bwd"] for g in groups.values())
    lines = [f"profile {variant.upper()}, {CASE_TITLES[case]} (MindSpore profiler, ms per step; wall "
             f"{prof['wall_ms']:.0f} ms with the profiler on, ops sum {total:.0f} ms):",
             "| layer type | forward ms | backward ms | share |", "|---|---:|---:|---:|"]
    for name, g in sorted(groups.items(), key=lambda kv: -(kv[1]["fwd"] + kv[1]["bwd"])):
        lines.append(f"| {name} | {g['fwd']:.1f} | {g['bwd']:.1f} | {(g['fwd'] + g['bwd']) / total:.0%} |")
    custom = groups.get(CHANNELWISE)
    if custom and prof["layers"]:
        best = max(bandwidth.values())
        # Forward moves x in, y out; backward reads x and dy, writes dx (weights are negligible).
        fwd_bytes = sum(4 * batch * (i + o) for i, o, _ in prof["layers"].values())
        bwd_bytes = sum(4 * batch * (2 * i + o) for i, o, _ in prof["layers"].values())
        for direction, nbytes in (("forward", fwd_bytes), ("backward", bwd_bytes)):
            ms = custom["fwd" if direction == "forward" else "bwd"]
            if ms > 0:
                gbs = nbytes / ms / 1e6
                lines.append(f"channelwise conv {direction}: {nbytes / 1e6:.0f} MB moved in {ms:.1f} ms = "
                             f"{gbs:.1f} GB/s, {gbs / best:.0%} of the {best} GB/s copy bandwidth "
                             f"(bound: {nbytes / best / 1e6:.1f} ms)")
    return lines
