"""The benchmark's driver: both workers, alternating timed steps, then the profile and the bandwidth probe."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from x3d_exp.bench.speed.cases import CASES, DEFAULT_REPEATS, MODEL_NAMES
from x3d_exp.bench.speed.machine import copy_bandwidth_gbs, machine_description, versions
from x3d_exp.bench.speed.tables import format_report, machine_line, row_line
from x3d_exp.bench.speed.workers import ONNX_KINDS, RUNNERS, Worker

DESCRIPTION = ("CPU speed of our MindSpore X3D against PyTorchVideo's X3D, or against ONNX Runtime and OpenVINO on "
               "our ONNX export, in one run.")


def run(variants: List[str], cases: List[str], repeats: Optional[int], against: List[str], kernels: str,
        profile: bool, fuse: bool = True, log=print) -> dict:
    """Ours against each of `against` (worker kinds, see workers.RUNNERS), case by case; the ONNX runtimes time our
    own export of the same weights, on the same input, and skip train steps."""
    result = {"machine": machine_description(), "versions": versions(), "load_before": os.getloadavg(),
              "kinds": ["mindspore", *against], "rows": [], "profiles": {}}
    log(machine_line(result))
    ours = Worker("mindspore", {"kernels": kernels, "fuse": fuse})
    others = []
    try:
        others += [Worker(kind, {}) for kind in against]
        with tempfile.TemporaryDirectory(prefix="x3d-bench-onnx-") as folder:
            for variant in variants:
                for case in cases:
                    result["rows"].append(_time_case(ours, others, variant, case, repeats, folder, log))
                    log(row_line(result["rows"][-1]))
                if profile:
                    result["profiles"][variant] = {}
                    for case in ("train8", "fwd8", "fwd1"):
                        if case in cases:
                            ours.call("setup", variant, case)
                            result["profiles"][variant][case] = ours.call("profile")
    finally:
        for w in [ours, *others]:
            w.close()
    result["load_after"] = os.getloadavg()
    result["copy_bandwidth_gbs"] = {n: round(copy_bandwidth_gbs(n), 1) for n in (1, result["machine"]["cpus"])}
    return result


def _time_case(ours: Worker, others: List[Worker], variant: str, case: str, repeats: Optional[int], folder: str,
               log) -> dict:
    train = CASES[case][1]
    active = [ours] + [w for w in others if not (train and w.kind in ONNX_KINDS)]
    info = {"mindspore": ours.call("setup", variant, case)}
    onnx = None
    for w in active[1:]:
        if w.kind in ONNX_KINDS:
            if onnx is None:
                started = time.time()
                onnx = ours.call("export_onnx", case, folder)
                log(f"{variant} {case}: our weights exported to ONNX in {time.time() - started:.0f} s")
            info[w.kind] = w.call("setup", variant, case, onnx)
        else:
            info[w.kind] = w.call("setup", variant, case)
    times: Dict[str, List[float]] = {w.kind: [] for w in active}
    for rep in range(repeats or DEFAULT_REPEATS[case]):
        # Rotate who goes first so none always follows another's cache and thread state.
        for w in active[rep % len(active):] + active[:rep % len(active)]:
            w.call("time_one")  # untimed lead-in, see WARMUP
            times[w.kind].append(w.call("time_one"))
    row = {"variant": variant, "case": case, "info": info,
           "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
           "all_ms": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()},
           "peak_mb": {w.kind: w.call("peak") for w in active}}
    if "pytorch" in row["ms"]:
        row["ratio"] = row["ms"]["mindspore"] / row["ms"]["pytorch"]
    if onnx:
        # The runtimes must compute what ours does: the largest logit difference on the same input.
        expected = np.asarray(ours.call("output"))
        row["logit_scale"] = float(np.abs(expected).max())  # randomly initialised: small logits
        row["max_diff"] = {w.kind: float(np.abs(np.asarray(w.call("output")) - expected).max())
                           for w in active if w.kind in ONNX_KINDS}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m x3d_exp.bench.speed", description=DESCRIPTION)
    parser.add_argument("--variants", default="xs,s,m", help="comma list of xs, s, m, l (default xs,s,m)")
    parser.add_argument("--cases", default="fwd1,fwd8,train8", help="comma list of fwd1, fwd8, train8")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per case and framework (default: fwd1 10, fwd8 3, train8 3)")
    parser.add_argument("--kernels", default="auto", choices=["auto", "native", "custom"],
                        help="model.cpu_kernels for ours (default auto; native is MindSpore's nn.Conv3d, "
                             "which runs one oneDNN call per channel: very slow)")
    parser.add_argument("--no-fuse", action="store_true",
                        help="infer with the plain eval-mode net, not the one with BNs folded into the kernels")
    parser.add_argument("--against", default="pytorch",
                        help="comma list of the runtimes to time beside ours: " + ", ".join(RUNNERS)
                        + " (OpenVINO at its default precision; openvino_f32 asks it for float32), or none "
                        "(default pytorch). The ONNX runtimes time our own ONNX export, inference cases only")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-layer-type profile")
    parser.add_argument("--json", help="also write the full results here")
    args = parser.parse_args(argv)
    variants = [v.strip().lower() for v in args.variants.split(",") if v.strip()]
    cases = [c.strip().lower() for c in args.cases.split(",") if c.strip()]
    unknown = [v for v in variants if v not in MODEL_NAMES] + [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown variant or case: {', '.join(unknown)}")
    against = [k.strip().lower() for k in args.against.split(",") if k.strip() and k.strip().lower() != "none"]
    if any(k not in RUNNERS or k == "mindspore" for k in against):
        parser.error(f"--against {args.against}: choose from {', '.join(k for k in RUNNERS if k != 'mindspore')}")
    from importlib.util import find_spec

    lacking = sorted({m for k in against for m in RUNNERS[k][3] if find_spec(m) is None})
    if lacking:
        parser.error(f"--against {args.against} needs {', '.join(lacking)}: pip install -e \".[bench,onnx]\"")
    result = run(variants, cases, args.repeats, against, args.kernels, not args.no_profile, fuse=not args.no_fuse)
    print()
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
