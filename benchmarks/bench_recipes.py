"""Training cost of the recipes of paper 003's comparison (natural, ODG-Q, DQ, Free AT), measured in one run.

    pytest benchmarks/bench_recipes.py --benchmark-only -s      # writes results/recipes.md
    python benchmarks/bench_recipes.py [--samples 1000 --rounds 3 --quant pact-w4a4]

One epoch of each recipe on the same fixed class-balanced subset of 28x28 inputs (Fashion-MNIST when it is
installed, else digits upsampled to 28x28), ResNet-20 with the given quant spec, batch 128, 1 torch thread,
the recipes interleaved round by round and compared by their medians. A recipe's cost for a study is its
epoch time x the epochs it runs for a given natural-training budget (ODG-Q: half, Free AT: 1/m), so the
table reports both the per-epoch ratio and the ratio at equal budget (paper 003 Table I: "Total").
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bitkern.data import DataError, balanced_subset, load_dataset
from bitkern.models import create
from bitkern.train import fit, make_recipe

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = ("natural", "odgq", "dq", "free")


def _data(samples: int):
    try:
        x, y = load_dataset("fashion-mnist", None, "train")
        source = "Fashion-MNIST"
    except (DataError, OSError):
        x, y = load_dataset("digits", None, "train")
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
        source = "digits upsampled to 28x28"
    idx = balanced_subset(y, min(samples, y.numel()))
    return x[idx], y[idx], source


def _epoch_seconds(recipe: str, quant: str, x, y) -> float:
    torch.manual_seed(0)
    model = create("resnet20", quant, num_classes=10, in_channels=1)
    t0 = time.perf_counter()
    fit(model, (x, y), recipe=recipe, epochs=make_recipe(recipe).epoch_divisor, batch_size=128, lr=2e-3,
        optimizer="adam", progress=False, seed=0)
    return time.perf_counter() - t0   # epochs=divisor: the recipe runs exactly one epoch


def measure(samples: int = 1000, rounds: int = 3, quant: str = "pact-w4a4") -> tuple[str, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y, source = _data(samples)
        times = {r: [] for r in RECIPES}
        for _ in range(rounds):
            for r in RECIPES:
                times[r].append(_epoch_seconds(r, quant, x, y))
    finally:
        torch.set_num_threads(threads)
    med = {r: statistics.median(t) for r, t in times.items()}
    lines = [f"# Recipe training cost: ResNet-20 {quant}, {x.shape[0]} examples of {source}, batch 128, 1 thread",
             "", f"`python benchmarks/bench_recipes.py --samples {samples} --rounds {rounds} --quant {quant}` "
             "(interleaved rounds, medians)", "",
             "| recipe | epoch [s] | epoch vs natural | epochs per natural epoch | cost at equal budget vs natural |",
             "|---|---|---|---|---|"]
    for r in RECIPES:
        share = 1 / make_recipe(r).epoch_divisor
        lines.append(f"| {r} | {med[r]:.2f} | {med[r] / med['natural']:.2f}x | {share:g} | "
                     f"{med[r] * share / med['natural']:.2f}x |")
    return "\n".join(lines) + "\n", med


@pytest.mark.benchmark(group="recipes")
def test_recipe_training_cost(benchmark):
    text, med = benchmark.pedantic(lambda: measure(samples=500, rounds=1), rounds=1, iterations=1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recipes.md").write_text(text)
    print("\n" + text)
    assert set(med) == set(RECIPES) and all(v > 0 for v in med.values())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quant", default="pact-w4a4")
    a = ap.parse_args()
    print(measure(a.samples, a.rounds, a.quant)[0])
