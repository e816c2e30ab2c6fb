"""The benchmark's driver: both workers, alternating timed steps, then the profile and the bandwidth probe."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Dict, List, Optional

from x3d_exp.bench.speed.cases import CASES, DEFAULT_REPEATS, MODEL_NAMES
from x3d_exp.bench.speed.machine import copy_bandwidth_gbs, machine_description, versions
from x3d_exp.bench.speed.tables import format_report, machine_line, row_line
from x3d_exp.bench.speed.workers import Worker

DESCRIPTION = "CPU speed of our MindSpore X3D against PyTorchVideo's X3D, in one run."


def run(variants: List[str], cases: List[str], repeats: Optional[int], with_torch: bool, kernels: str,
        profile: bool, fuse: bool = True, log=print) -> dict:
    result = {"machine": machine_description(), "versions": versions(), "load_before": os.getloadavg(),
              "rows": [], "profiles": {}}
    log(machine_line(result))
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
                log(row_line(row))
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
    parser.add_argument("--no-torch", action="store_true", help="time ours only")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-layer-type profile")
    parser.add_argument("--json", help="also write the full results here")
    args = parser.parse_args(argv)
    variants = [v.strip().lower() for v in args.variants.split(",") if v.strip()]
    cases = [c.strip().lower() for c in args.cases.split(",") if c.strip()]
    unknown = [v for v in variants if v not in MODEL_NAMES] + [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown variant or case: {', '.join(unknown)}")
    if not args.no_torch:
        from importlib.util import find_spec

        if find_spec("torch") is None or find_spec("pytorchvideo") is None:
            parser.error("PyTorch reference needs `pip install -e .[bench]` (torch, pytorchvideo); or --no-torch")
    result = run(variants, cases, args.repeats, not args.no_torch, args.kernels, not args.no_profile,
                 fuse=not args.no_fuse)
    print()
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
