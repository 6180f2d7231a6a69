"""Forward-pass speed of packed models, ratios only (eval mode, 2 torch threads).

    pytest benchmarks/bench_models.py --benchmark-disable-gc -q     # pytest-benchmark, few rounds
    python benchmarks/bench_models.py [--batch 128 --rounds 3]      # prints the ratios and the model table

Ratios (targets), batch 128, 3x32x32: frozen ResNet-20 MBN3x1 (cpp) vs the same unfrozen model on the
pure-torch backend (>= 2.5x); frozen XNOR ResNet-20 (cpp) vs the unfrozen XNOR model on the torch backend
(>= 3x); frozen MBN3x1 (cpp) vs the fp32 ResNet-20 (>= 1x).
Model table (issue 13, bitkern.eval.speed, models timed round-robin in one run): frozen XNOR / MBN3x1
vs the fp32 model: ResNet-20 batch 128 (>= 8x / >= 4x), ResNet-20 batch 1 (>= 4x / >= 3x), ResNet-18
224x224 batch 1 (>= 3x / >= 2x); written to results/model_speed.md / .json. Skips when the cpp backend
is not built.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pytest
import torch


from bitkern import dispatch
from bitkern.models import create

BATCH, SHAPE, THREADS = 128, (3, 32, 32), 2


def _cpp_available() -> bool:
    return dispatch.get("cpp").available


def _median_time(fn, x, rounds: int) -> float:
    with torch.no_grad():
        fn(x)  # warm-up
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_on(backend, fn, x, rounds):
    dispatch.set_backend(backend)
    try:
        return _median_time(fn, x, rounds)
    finally:
        dispatch.set_backend(None)


def measure(batch: int = BATCH, rounds: int = 3) -> dict:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    x = torch.rand((batch,) + SHAPE)
    mbn, xnor, fp = (create("resnet20", q).eval() for q in ("mbn3x1", "xnor", "fp"))
    t = {
        "mbn_torch": _time_on("torch", mbn, x, rounds),
        "mbn_frozen": _time_on("cpp", _freeze(mbn), x, rounds),
        "xnor_torch": _time_on("torch", xnor, x, rounds),
        "xnor_frozen": _time_on("cpp", _freeze(xnor), x, rounds),
        "fp32": _median_time(fp, x, rounds),
    }
    return {"times_s": t,
            "frozen_mbn3x1_vs_torch_backend": t["mbn_torch"] / t["mbn_frozen"],
            "frozen_xnor_vs_torch_backend": t["xnor_torch"] / t["xnor_frozen"],
            "frozen_mbn3x1_vs_fp32": t["fp32"] / t["mbn_frozen"]}


def _freeze(model):
    from bitkern.freeze import freeze
    return freeze(model)


needs_cpp = pytest.mark.skipif(not _cpp_available(), reason="cpp backend not built")
RESULTS = Path(__file__).resolve().parent / "results"
CASES = [("mbn3x1", "torch"), ("mbn3x1-frozen", "cpp"), ("xnor", "torch"), ("xnor-frozen", "cpp"), ("fp", None)]


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    built = {q: create("resnet20", q).eval() for q in ("mbn3x1", "xnor", "fp")}
    built["mbn3x1-frozen"] = _freeze(built["mbn3x1"])
    built["xnor-frozen"] = _freeze(built["xnor"])
    medians = {}
    yield built, torch.rand((BATCH,) + SHAPE), medians
    if len(medians) == len(CASES):  # all cases ran: write the ratio table
        ratios = {"frozen MBN3x1 (cpp) vs MBN3x1 on the torch backend (target >= 2.5x)":
                  medians["mbn3x1"] / medians["mbn3x1-frozen"],
                  "frozen XNOR (cpp) vs XNOR on the torch backend (target >= 3x)":
                  medians["xnor"] / medians["xnor-frozen"],
                  "frozen MBN3x1 (cpp) vs fp32 ResNet-20 (target >= 1x)": medians["fp"] / medians["mbn3x1-frozen"]}
        lines = ["| model | median forward [ms] |", "|---|---|"]
        lines += [f"| {name} ({backend or 'fp32'}) | {medians[name] * 1e3:.1f} |" for name, backend in CASES]
        lines += ["", "| ratio | measured |", "|---|---|"] + [f"| {k} | {v:.2f}x |" for k, v in ratios.items()]
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "models.md").write_text("\n".join(lines) + "\n")
        (RESULTS / "models.json").write_text(json.dumps({"median_s": medians, "ratios": ratios}, indent=2))
        print("\n" + "\n".join(lines))


@needs_cpp
@pytest.mark.parametrize("name,backend", CASES)
def test_forward(benchmark, models, name, backend):
    built, x, medians = models
    dispatch.set_backend(backend)
    try:
        with torch.no_grad():
            benchmark.pedantic(built[name], args=(x,), rounds=7, iterations=1, warmup_rounds=1)
    finally:
        dispatch.set_backend(None)
    medians[name] = benchmark.stats.stats.median


@needs_cpp
def test_model_speed_table(benchmark):
    """The model-level table: every case's models interleaved in one run (bitkern.eval.speed)."""
    from bitkern.eval import speed

    torch.set_num_threads(THREADS)
    results = benchmark.pedantic(lambda: speed.measure(rounds=11), rounds=1, iterations=1)
    table = speed.speed_table(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "model_speed.md").write_text(table + "\n")
    (RESULTS / "model_speed.json").write_text(json.dumps(results, indent=2))
    print("\n" + table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not _cpp_available():
        print(f"SKIP bench_models: cpp backend unavailable ({dispatch.get('cpp').reason})")
        return
    result = measure(args.batch, args.rounds)
    for key, value in result["times_s"].items():
        print(f"{key:12s} {value * 1e3:9.1f} ms")
    for key in ("frozen_mbn3x1_vs_torch_backend", "frozen_xnor_vs_torch_backend", "frozen_mbn3x1_vs_fp32"):
        print(f"{key:32s} {result[key]:.2f}x")
    from bitkern.eval import speed
    print(speed.speed_table(speed.measure(rounds=args.rounds)))


if __name__ == "__main__":
    main()
