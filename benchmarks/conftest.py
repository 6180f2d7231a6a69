"""Benchmark session helpers: bench_ops.py records its medians here; at session finish the op ratio
table (speedups, achieved bit-MACs/s) is printed after
pytest-benchmark's tables and written to benchmarks/results/ops.md + ops.json."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

from bitkern._io import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PEAK_BIT_MACS = 2e12  # the reference rate for 2 AVX-512 cores
_KEY = "_bitkern_op_timings"


@pytest.fixture
def record_op_timing(request):
    """record(key, benchmark): keep the median seconds of a finished pytest-benchmark run."""
    store = getattr(request.config, _KEY, None)
    if store is None:
        store = {}
        setattr(request.config, _KEY, store)

    def record(key, benchmark):
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None:
            store[key] = float(stats.stats.median)
    return record


_atomic_write = atomic_write_text  # results survive an interrupted run


def _fmt(value, spec=".2f", suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def op_ratio_rows(timings: dict) -> list[dict]:
    rows = []
    for channels, size, batch in sorted({k[:3] for k in timings}, key=lambda k: (-k[2], k[0])):
        t = {k[3]: v for k, v in timings.items() if k[:3] == (channels, size, batch)}
        fp32 = [t[k] for k in ("fp32_nchw", "fp32_channels_last") if k in t]
        best_fp32 = min(fp32) if fp32 else None
        bit_macs = batch * size * size * channels * channels * 9
        row = {"channels": channels, "size": size, "batch": batch, "timings_s": t,
               "best_fp32_s": best_fp32}
        binary = t.get("binary_cpp")
        row["binary_vs_fp32"] = best_fp32 / binary if binary and best_fp32 else None
        row["binary_bit_macs_per_s"] = bit_macs / binary if binary else None
        row["binary_frac_of_2e12"] = bit_macs / binary / PEAK_BIT_MACS if binary else None
        for m, n in ((1, 1), (3, 1), (3, 3)):
            cpp_t, torch_t = t.get(f"mbn{m}x{n}_cpp"), t.get(f"mbn{m}x{n}_torch")
            row[f"mbn{m}x{n}_cpp_vs_torch"] = torch_t / cpp_t if cpp_t and torch_t else None
            row[f"mbn{m}x{n}_cpp_vs_fp32"] = best_fp32 / cpp_t if cpp_t and best_fp32 else None
        rows.append(row)
    return rows


def op_ratio_table(rows: list[dict]) -> str:
    lines = [
        "| shape (C@HxW) | batch | fp32 best ms | binary ms | binary vs fp32 | bit-MAC/s (x of 2e12) "
        "| mbn1x1 vs torch | mbn3x1 vs torch | mbn3x3 vs torch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["timings_s"]
        lines.append(
            f"| {r['channels']}@{r['size']}x{r['size']} | {r['batch']} "
            f"| {_fmt(r['best_fp32_s'] and r['best_fp32_s'] * 1e3)} "
            f"| {_fmt(t.get('binary_cpp') and t['binary_cpp'] * 1e3)} "
            f"| {_fmt(r['binary_vs_fp32'], suffix='x')} "
            f"| {_fmt(r['binary_bit_macs_per_s'], '.3g')} ({_fmt(r['binary_frac_of_2e12'], '.0%')}) "
            f"| {_fmt(r['mbn1x1_cpp_vs_torch'], suffix='x')} | {_fmt(r['mbn3x1_cpp_vs_torch'], suffix='x')} "
            f"| {_fmt(r['mbn3x3_cpp_vs_torch'], suffix='x')} |")
    return "\n".join(lines)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After pytest-benchmark's own tables: print the ratio table and write the result files."""
    timings = getattr(config, _KEY, None)
    if not timings:
        return
    rows = op_ratio_rows(timings)
    table = op_ratio_table(rows)
    header = ("# bitkern op benchmarks (benchmarks/bench_ops.py)\n\n"
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; 2 threads; "
              "3x3 conv, stride 1, padding 1; medians of pytest-benchmark rounds. "
              "'vs torch' = pure-torch float emulation (BITKERN_BACKEND=torch) time / cpp time; "
              "'vs fp32' = best of torch fp32 conv2d NCHW / channels_last over binary_conv2d (cpp).\n\n")
    text = header + table + "\n"
    terminalreporter.write_sep("=", "bitkern op ratios (benchmarks/results/ops.md)")
    terminalreporter.write_line(table)
    _atomic_write(RESULTS_DIR / "ops.md", text)
    _atomic_write(RESULTS_DIR / "ops.json", json.dumps(
        [{**r, "timings_s": r["timings_s"]} for r in rows], indent=2) + "\n")
