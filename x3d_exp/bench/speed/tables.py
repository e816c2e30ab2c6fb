"""The benchmark's printed lines and its markdown report (docs/performance.md holds its tables)."""

from __future__ import annotations

from x3d_exp.bench.speed.cases import CASE_TITLES, TARGETS
from x3d_exp.bench.speed.profile import format_profile


def machine_line(result: dict) -> str:
    m = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    env = ", ".join(f"{k}={v}" for k, v in m["env"].items()) or "none"
    return (f"machine: {m['cpu']}, {m['cpus']} CPUs ({' '.join(m['isa'])}), {m['memory_gib']} GiB; {versions}; "
            f"env: {env}; load average {result['load_before'][0]:.2f}")


TITLES = {"mindspore": "ours", "pytorch": "PyTorch", "onnxruntime": "ONNX Runtime", "openvino_f32": "OpenVINO f32",
          "openvino": "OpenVINO default"}


def row_line(row: dict) -> str:
    ms, peak = row["ms"], row["peak_mb"]
    text = f"{row['variant']:>3} {CASE_TITLES[row['case']]:<20}"
    for kind in ms:
        text += f" | {TITLES[kind]} {ms[kind]:8.1f} ms ({_mb(peak.get(kind))})"
        if kind == "openvino":
            text += f" [{row['info'][kind]['precision']}]"
    if "ratio" in row:
        verdict = "ok" if row["ratio"] <= TARGETS[row["case"]] else "MISS"
        text += f" | ours / PyTorch {row['ratio']:.2f} (target <= {TARGETS[row['case']]}: {verdict})"
    if row.get("max_diff"):
        text += f" | {_differences(row)}"
    return text


def _differences(row: dict) -> str:
    return (f"largest logit difference from ours on the same input (largest |logit| {row['logit_scale']:.1e}): "
            + ", ".join(f"{TITLES[k]} {v:.1e}" for k, v in row["max_diff"].items()))


def _mb(value) -> str:
    if not value or not value.get("peak"):
        return "peak n/a"
    return f"peak {value['peak']:,.0f} MB, {value['peak'] - (value['start'] or 0):+,.0f} in case"


def format_report(result: dict) -> str:
    kinds = result["kinds"]
    torch = "pytorch" in kinds
    lines = [machine_line(result), "",
             "| variant | case | " + " | ".join(f"{TITLES[k]} ms" for k in kinds)
             + (" | ours / PyTorch | target" if torch else "") + " | "
             + " | ".join(f"{TITLES[k]} peak MB (in case)" for k in kinds) + " |",
             "|---|---|" + "---:|" * (2 * len(kinds) + (2 if torch else 0))]
    for row in result["rows"]:
        ms, peak = row["ms"], row["peak_mb"]
        cells = [f"{ms[k]:.1f}" if k in ms else "-" for k in kinds]
        if torch:
            cells += [f"{row['ratio']:.2f}" if "ratio" in row else "-", f"<= {TARGETS[row['case']]}"]
        cells += [_num(peak.get(k)) for k in kinds]
        lines.append(f"| {row['variant'].upper()} | {CASE_TITLES[row['case']]} | " + " | ".join(cells) + " |")
    lines.append("")
    for row in result["rows"]:
        if row.get("max_diff"):
            precision = row["info"].get("openvino", {}).get("precision")
            lines.append(f"{row['variant'].upper()} {CASE_TITLES[row['case']]}: {_differences(row)}"
                         + (f"; OpenVINO's default precision here: {precision}" if precision else ""))
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
