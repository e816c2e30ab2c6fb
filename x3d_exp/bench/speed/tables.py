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


def row_line(row: dict) -> str:
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


def format_report(result: dict) -> str:
    lines = [machine_line(result), "",
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
