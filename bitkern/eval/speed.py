"""Model-level inference speed: frozen packed models against the fp32 model, interleaved in one run.

On a shared machine the same timing drifts up to 2x within minutes, so every case times its models
round-robin (one call each per round, the order rotating) and reports medians and their ratios. The fp32
reference is the model as torch runs it by default (NCHW); its channels_last time is reported beside it.
Used by benchmarks/bench_models.py and `bitkern bench --quick`.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..freeze import freeze
from ..models import create

QUANTS = ("xnor", "mbn3x1")


@dataclass(frozen=True)
class SpeedCase:
    arch: str
    shape: tuple[int, int, int]
    batch: int
    num_classes: int
    targets: dict = field(default_factory=dict)  # quant -> target speed-up over fp32 (issue 13)

    @property
    def name(self) -> str:
        return f"{self.arch} {self.shape[1]}x{self.shape[2]} batch {self.batch}"


CASES = (SpeedCase("resnet20", (3, 32, 32), 128, 10, {"xnor": 8.0, "mbn3x1": 4.0}),
         SpeedCase("resnet20", (3, 32, 32), 1, 10, {"xnor": 4.0, "mbn3x1": 3.0}),
         SpeedCase("resnet18", (3, 224, 224), 1, 1000, {"xnor": 3.0, "mbn3x1": 2.0}))


def _models(case: SpeedCase, seed: int) -> dict:
    """name -> (model, whether it takes channels_last input)."""
    torch.manual_seed(seed)
    fp = create(case.arch, "fp", num_classes=case.num_classes).eval()
    models = {"fp32": (fp, False),
              "fp32 channels_last": (copy.deepcopy(fp).to(memory_format=torch.channels_last), True)}
    for quant in QUANTS:
        models[f"frozen {quant}"] = (freeze(create(case.arch, quant, num_classes=case.num_classes).eval()), False)
    return models


def measure_case(case: SpeedCase, rounds: int, seed: int = 0) -> dict:
    """Median seconds per forward of each model and the frozen models' speed-ups over fp32."""
    models = _models(case, seed)
    x = torch.rand((case.batch, *case.shape), generator=torch.Generator().manual_seed(seed))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    names = list(models)
    times = {name: [] for name in names}
    with torch.no_grad():
        for model, channels_last in models.values():  # warm-up: chains built, output pools filled
            for _ in range(2):
                model(x_cl if channels_last else x)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                model, channels_last = models[name]
                start = time.perf_counter()
                model(x_cl if channels_last else x)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    speedups = {q: medians["fp32"] / medians[f"frozen {q}"] for q in QUANTS}
    speedups_cl = {q: medians["fp32 channels_last"] / medians[f"frozen {q}"] for q in QUANTS}
    return {"case": case.name, "arch": case.arch, "batch": case.batch, "shape": list(case.shape),
            "rounds": rounds, "threads": torch.get_num_threads(), "median_s": medians,
            "speedup_vs_fp32": speedups, "speedup_vs_fp32_channels_last": speedups_cl,
            "targets": dict(case.targets),
            "targets_met": {q: speedups[q] >= t for q, t in case.targets.items()}}


def rounds_for(case: SpeedCase, rounds: int) -> int:
    """Single images take milliseconds: five times the rounds of a batch for a stable median."""
    return rounds * 5 if case.batch == 1 else rounds


def measure(rounds: int = 7, cases=CASES, seed: int = 0) -> list[dict]:
    return [measure_case(case, rounds_for(case, rounds), seed) for case in cases]


def speed_table(results: list[dict]) -> str:
    """Markdown table: median ms per forward and speed-ups (target in brackets, * when met)."""
    lines = ["| model (threads) | fp32 ms | fp32 channels_last ms | frozen XNOR ms | frozen MBN3x1 ms "
             "| XNOR vs fp32 | MBN3x1 vs fp32 | XNOR / MBN3x1 vs fp32 channels_last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = {k: v * 1e3 for k, v in r["median_s"].items()}

        def ratio(q):
            target = r["targets"].get(q)
            mark = "" if target is None else f" (>= {target:g}x{', met' if r['targets_met'][q] else ', NOT met'})"
            return f"{r['speedup_vs_fp32'][q]:.2f}x{mark}"
        cl = r["speedup_vs_fp32_channels_last"]
        lines.append(f"| {r['case']} ({r['threads']}) | {m['fp32']:.2f} | {m['fp32 channels_last']:.2f} "
                     f"| {m['frozen xnor']:.2f} | {m['frozen mbn3x1']:.2f} | {ratio('xnor')} | {ratio('mbn3x1')} "
                     f"| {cl['xnor']:.2f}x / {cl['mbn3x1']:.2f}x |")
    return "\n".join(lines)


__all__ = ["SpeedCase", "CASES", "measure", "measure_case", "speed_table", "rounds_for"]
