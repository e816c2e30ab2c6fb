"""CPU speed of our MindSpore X3D against PyTorchVideo's X3D, in one run.

    python -m x3d_exp.bench.speed                     # XS, S, M; forward b1, forward b8, train step b8
    python -m x3d_exp.bench.speed --variants xs --repeats 5 --json out.json

Ours infers with the BatchNorms folded into the channelwise-conv kernels
(`x3d_exp.models.fuse`; `--no-fuse` for the plain eval-mode network).
Each framework runs in its own worker process (their thread pools would
fight inside one), and the driver asks them for one timed step at a time
(each after an untimed one of its own), alternating, so load from other
jobs on the machine hits both alike. Times
are medians of wall-clock per step after warm-up (graph compilation for
MindSpore). Peak memory is each worker's peak RSS during the timed steps
(Linux VmHWM, reset after warm-up), and in brackets its rise over the RSS
at the reset: both workers keep memory pools from earlier cases. Afterwards the MindSpore profiler
splits our step time by layer type, and the channelwise-conv kernels are
compared with the machine's copy bandwidth.

The PyTorch side needs `pip install -e .[bench]` (torch CPU, pytorchvideo);
without it, `--no-torch` times ours alone.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
import types
from typing import Dict, List, Optional

VARIANTS = {"xs": "x3d_xs", "s": "x3d_s", "m": "x3d_m", "l": "x3d_l"}
# case -> (batch, train)
CASES = {"fwd1": (1, False), "fwd8": (8, False), "train8": (8, True)}
CASE_TITLES = {"fwd1": "forward, batch 1", "fwd8": "forward, batch 8", "train8": "train step, batch 8"}
# Ours / PyTorch time the issue asks for.
TARGETS = {"fwd1": 0.8, "fwd8": 0.5, "train8": 0.5}
DEFAULT_REPEATS = {"fwd1": 10, "fwd8": 3, "train8": 3}
WARMUP = 2
# Every timed step follows an untimed one of the same framework, as in a real loop of steps: after a step
# both frameworks' thread pools spin-wait for a while (libgomp's OpenMP workers, MindSpore's pool), so a step
# right after the other framework's ran on a contended CPU (ours at XS batch 1: 33 ms instead of 23), and a
# step after a pause paid for waking its own threads (PyTorch's: 50 instead of 36).
NUM_CLASSES = 400
LEARNING_RATE = 0.01
MOMENTUM = 0.9
# Profiler op types -> the layer types they belong to in X3D. Custom ops (our C++ kernels) go by their cell.
CUSTOM_GROUPS = {
    "ChannelwiseConv3d": "channelwise conv3d (C++ kernels; fused: with the folded BNs)",
    "FusedChannelwiseConv3d": "channelwise conv3d (C++ kernels; fused: with the folded BNs)",
    "BatchNormAct3d": "batchnorm + relu/swish (C++ kernels)",
    "ChannelMean": "pooling (SE, head) and its gradient",
    "Gate": "SE gating + swish (C++ kernels)",
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


def _peak_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    _PEAK_START["rss"] = _status_mb("VmRSS")


def _status_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


_PEAK_START: dict = {}


def _peak_mb() -> dict:
    """Peak RSS since the reset, and the RSS at the reset (memory pools kept from earlier cases count in both)."""
    return {"peak": _status_mb("VmHWM"), "start": _PEAK_START.get("rss")}


class MindSporeRunner:
    """Our X3D in GRAPH mode: `nn.TrainOneStepCell` for training; for inference the eval-mode net, with its
    BatchNorms folded into the channelwise convs (`x3d_exp.models.fuse`) when `fuse` and the kernels are on."""

    name = "mindspore"

    def __init__(self, kernels: str, fuse: bool = True):
        from x3d_exp.env import prepare_process

        prepare_process()
        import mindspore as ms

        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_device("CPU")
        from x3d_exp.kernels import resolve_conv_impl

        self.ms = ms
        self.conv_impl = resolve_conv_impl(kernels, "CPU")
        self.fuse = fuse and self.conv_impl != "native"
        self.variant = None
        self.net = None
        self.fused = None
        self.train_cell = None
        self.step = None

    def setup(self, variant: str, case: str) -> dict:
        import numpy as np
        from mindspore import Tensor, nn

        from x3d_exp.models import build_model

        batch, train = CASES[case]
        if variant != self.variant:
            self.net = self.fused = self.train_cell = None  # free the previous variant first
            self.net = build_model(VARIANTS[variant], num_classes=NUM_CLASSES, conv_impl=self.conv_impl)
            self.variant = variant
        spec = self.net.spec
        rng = np.random.default_rng(0)
        x = Tensor(rng.standard_normal((batch, 3, spec.num_frames, spec.crop_size, spec.crop_size), np.float32))
        if train:
            if self.train_cell is None:
                loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
                optimizer = nn.SGD(self.net.trainable_params(), learning_rate=LEARNING_RATE, momentum=MOMENTUM)
                self.train_cell = nn.TrainOneStepCell(nn.WithLossCell(self.net, loss), optimizer)
            self.net.set_train(True)
            y = Tensor(rng.integers(0, NUM_CLASSES, batch).astype(np.int32))
            self.step = lambda: self.train_cell(x, y).asnumpy()
        else:
            self.net.set_train(False)
            if self.fuse and self.fused is None:
                from x3d_exp.models.fuse import fuse_for_inference

                self.fused = fuse_for_inference(self.net)
            net = self.fused if self.fuse else self.net
            self.step = lambda: net(x).asnumpy()
        for _ in range(WARMUP):
            self.step()
        _peak_reset()
        params = int(sum(p.size for p in self.net.trainable_params()))
        shape = [batch, 3, spec.num_frames, spec.crop_size, spec.crop_size]
        return {"params": params, "conv_impl": self.conv_impl, "fused": self.fuse and not train, "input": shape}

    def time_one(self) -> float:
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start

    def peak(self) -> dict:
        return _peak_mb()

    def profile(self, steps: int = 2) -> dict:
        """Op time per step by op type and direction, from MindSpore's profiler on the current case."""
        import csv

        from mindspore.profiler import Profiler

        with tempfile.TemporaryDirectory(prefix="x3d_prof_") as out:
            profiler = Profiler(output_path=out)
            start = time.perf_counter()
            for _ in range(steps):
                self.step()
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
        return {"groups": groups, "wall_ms": wall * 1e3, "forward_channelwise": forward_channelwise,
                "layers": self._channelwise_layers()}

    def _channelwise_layers(self) -> dict:
        """(input, output) element counts of every channelwise conv at this batch, by layer name."""
        from x3d_exp.models.summary import trace_network

        spec = self.net.spec
        count = trace_network(self.net, [3, spec.num_frames, spec.crop_size, spec.crop_size])
        return {layer.name: [int(_prod(layer.in_shape)), int(_prod(layer.out_shape)), int(layer.params)]
                for layer in count.layers if layer.kind == "conv_channelwise"}


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


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


class TorchRunner:
    """PyTorchVideo's `create_x3d` with the same factors, logits out (no softmax), CPU, default threads."""

    name = "pytorch"

    def __init__(self):
        import torch

        self.torch = torch
        self.create_x3d = _import_create_x3d()
        self.variant = None
        self.model = None
        self.step = None

    def setup(self, variant: str, case: str) -> dict:
        torch = self.torch
        batch, train = CASES[case]
        from x3d_exp.models.x3d import VARIANTS as SPECS, X3DSpec

        spec = X3DSpec(**SPECS[VARIANTS[variant]])
        if variant != self.variant:
            self.model = self.optimizer = None  # free the previous variant first
            self.model = self.create_x3d(input_clip_length=spec.num_frames, input_crop_size=spec.crop_size,
                                         model_num_class=NUM_CLASSES, depth_factor=spec.gamma_d,
                                         head_activation=None)
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
            self.variant = variant
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, spec.num_frames, spec.crop_size, spec.crop_size, generator=generator)
        if train:
            y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
            self.model.train()

            def step():
                self.optimizer.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(self.model(x), y)
                loss.backward()
                self.optimizer.step()
                return loss.item()
        else:
            self.model.eval()

            def step():
                with torch.inference_mode():
                    return self.model(x)
        self.step = step
        for _ in range(WARMUP):
            self.step()
        _peak_reset()
        params = int(sum(p.numel() for p in self.model.parameters()))
        return {"params": params, "threads": torch.get_num_threads()}

    def time_one(self) -> float:
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start

    def peak(self) -> dict:
        return _peak_mb()


def _import_create_x3d():
    """`pytorchvideo.models.x3d.create_x3d`, importable without torchvision.

    pytorchvideo 0.1.5 imports `torchvision.ops.RoIAlign` at import time for a
    detection head X3D never uses, and PyPI's torchvision does not load beside
    a CPU-only torch of another release. When torchvision is absent or broken,
    a placeholder stands in for that one name, for this process only.
    """
    try:
        import torchvision.ops  # noqa: F401
    except Exception:  # ImportError, or a torchvision built against another torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchvision")
        stub_ops = types.ModuleType("torchvision.ops")

        class RoIAlign:  # never instantiated by X3D
            def __init__(self, *args, **kwargs):
                raise RuntimeError("torchvision is not installed; RoIAlign is unavailable in this benchmark")

        stub_ops.RoIAlign = RoIAlign
        stub.ops = stub_ops
        sys.modules["torchvision"] = stub
        sys.modules["torchvision.ops"] = stub_ops
    from pytorchvideo.models.x3d import create_x3d

    return create_x3d


def _worker(kind: str, options: dict, conn) -> None:
    # Framework chatter (profiler progress bars, deprecation notes) would
    # interleave with the table; errors still reach stderr.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        runner = MindSporeRunner(options["kernels"], options["fuse"]) if kind == "mindspore" else TorchRunner()
        conn.send(("ok", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        command, args = conn.recv()
        if command == "quit":
            return
        try:
            conn.send(("ok", getattr(runner, command)(*args)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Worker:
    def __init__(self, kind: str, options: dict):
        self.kind = kind
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(kind, options, child))
        self.process.start()
        self._result()

    def _result(self):
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.kind} worker failed:\n{value}")
        return value

    def call(self, command: str, *args):
        self.conn.send((command, args))
        return self._result()

    def close(self):
        try:
            self.conn.send(("quit", ()))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def copy_bandwidth_gbs(threads: int, megabytes: int = 128, repeats: int = 5) -> float:
    """Read+write bytes per second of numpy copies, one array pair per thread (numpy drops the GIL)."""
    import numpy as np

    n = megabytes * 2 ** 20 // 4
    pairs = [(np.ones(n, np.float32), np.empty(n, np.float32)) for _ in range(threads)]
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.copyto, args=(dst, src)) for src, dst in pairs]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, threads * 2 * n * 4 / (time.perf_counter() - start) / 1e9)
    return best


def machine_description() -> dict:
    model = platform.processor()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f" {f}" in flags]
    memory_gib = None
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        pass
    return {"cpu": model, "cpus": len(os.sched_getaffinity(0)), "isa": isa,
            "memory_gib": round(memory_gib, 1) if memory_gib else None, "python": platform.python_version(),
            "env": {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                   "X3D_EXP_KERNEL_THREADS") if os.environ.get(k)}}


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("mindspore", "torch", "pytorchvideo", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def run(variants: List[str], cases: List[str], repeats: Optional[int], with_torch: bool, kernels: str,
        profile: bool, fuse: bool = True, log=print) -> dict:
    result = {"machine": machine_description(), "versions": _versions(), "load_before": os.getloadavg(),
              "rows": [], "profiles": {}}
    log(_machine_line(result))
    ours = Worker("mindspore", {"kernels": kernels, "fuse": fuse})
    theirs = Worker("pytorch", {}) if with_torch else None
    runners = [ours] + ([theirs] if theirs else [])
    try:
        for variant in variants:
            for case in cases:
                info = {w.kind: w.call("setup", variant, case) for w in runners}
                times: Dict[str, List[float]] = {w.kind: [] for w in runners}
                for rep in range(repeats or DEFAULT_REPEATS[case]):
                    # Alternate who goes first so neither always follows the other's cache and thread state.
                    for w in (runners if rep % 2 == 0 else runners[::-1]):
                        w.call("time_one")  # untimed lead-in, see WARMUP
                        times[w.kind].append(w.call("time_one"))
                row = {"variant": variant, "case": case, "info": info,
                       "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
                       "all_ms": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()},
                       "peak_mb": {w.kind: w.call("peak") for w in runners}}
                if theirs:
                    row["ratio"] = row["ms"]["mindspore"] / row["ms"]["pytorch"]
                result["rows"].append(row)
                log(_row_line(row))
            if profile:
                result["profiles"][variant] = {}
                for case in ("train8", "fwd8"):
                    if case in cases:
                        ours.call("setup", variant, case)
                        result["profiles"][variant][case] = ours.call("profile")
    finally:
        for w in runners:
            w.close()
    result["load_after"] = os.getloadavg()
    result["copy_bandwidth_gbs"] = {n: round(copy_bandwidth_gbs(n), 1) for n in (1, result["machine"]["cpus"])}
    return result


def _machine_line(result: dict) -> str:
    m = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    env = ", ".join(f"{k}={v}" for k, v in m["env"].items()) or "none"
    return (f"machine: {m['cpu']}, {m['cpus']} CPUs ({' '.join(m['isa'])}), {m['memory_gib']} GiB; {versions}; "
            f"env: {env}; load average {result['load_before'][0]:.2f}")


def _row_line(row: dict) -> str:
    ms = row["ms"]
    peak = row["peak_mb"]
    text = (f"{row['variant']:>3} {CASE_TITLES[row['case']]:<20} ours {ms['mindspore']:8.1f} ms "
            f"({_mb(peak.get('mindspore'))})")
    if "pytorch" in ms:
        verdict = "ok" if row["ratio"] <= TARGETS[row["case"]] else "MISS"
        text += (f" | pytorch {ms['pytorch']:8.1f} ms ({_mb(peak.get('pytorch'))}) | ratio {row['ratio']:.2f} "
                 f"(target <= {TARGETS[row['case']]}: {verdict})")
    return text


def _mb(value) -> str:
    if not value or not value.get("peak"):
        return "peak n/a"
    return f"peak {value['peak']:,.0f} MB, {value['peak'] - (value['start'] or 0):+,.0f} in case"


def format_table(result: dict) -> str:
    lines = [_machine_line(result), "",
             "| variant | case | ours ms | PyTorch ms | ours / PyTorch | target | ours peak MB (in case) "
             "| PyTorch peak MB (in case) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        ms, peak = row["ms"], row["peak_mb"]
        torch_ms = f"{ms['pytorch']:.1f}" if "pytorch" in ms else "-"
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
        lines.append(f"| {row['variant'].upper()} | {CASE_TITLES[row['case']]} | {ms['mindspore']:.1f} | {torch_ms} | "
                     f"{ratio} | <= {TARGETS[row['case']]} | {_num(peak.get('mindspore'))} | "
                     f"{_num(peak.get('pytorch'))} |")
    lines.append("")
    lines.append(f"load average before {result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}; "
                 f"copy bandwidth (read+write) {result['copy_bandwidth_gbs']} GB/s by threads")
    for variant, cases in result["profiles"].items():
        for case, prof in cases.items():
            lines.append("")
            lines.extend(format_profile(variant, case, prof, result["copy_bandwidth_gbs"]))
    return "\n".join(lines)


def _num(value) -> str:
    if not value or not value.get("peak"):
        return "-"
    return f"{value['peak']:,.0f} ({value['peak'] - (value['start'] or 0):+,.0f})"


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m x3d_exp.bench.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="xs,s,m", help="comma list of xs, s, m, l (default xs,s,m)")
    parser.add_argument("--cases", default="fwd1,fwd8,train8", help="comma list of fwd1, fwd8, train8")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per case and framework (default: fwd1 10, fwd8 3, train8 3)")
    parser.add_argument("--kernels", default="auto", choices=["auto", "native", "custom"],
                        help="model.cpu_kernels for ours (default auto; native is MindSpore's nn.Conv3d, "
                             "which runs one oneDNN call per channel: very slow)")
    parser.add_argument("--no-fuse", action="store_true",
                        help="infer with the plain eval-mode net, not the one with BNs folded into the kernels")
    parser.add_argument("--no-torch", action="store_true", help="time ours only")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-layer-type profile")
    parser.add_argument("--json", help="also write the full results here")
    args = parser.parse_args(argv)
    variants = [v.strip().lower() for v in args.variants.split(",") if v.strip()]
    cases = [c.strip().lower() for c in args.cases.split(",") if c.strip()]
    unknown = [v for v in variants if v not in VARIANTS] + [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown variant or case: {', '.join(unknown)}")
    if not args.no_torch:
        from importlib.util import find_spec

        if find_spec("torch") is None or find_spec("pytorchvideo") is None:
            parser.error("PyTorch reference needs `pip install -e .[bench]` (torch, pytorchvideo); or --no-torch")
    result = run(variants, cases, args.repeats, not args.no_torch, args.kernels, not args.no_profile,
                 fuse=not args.no_fuse)
    print()
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
