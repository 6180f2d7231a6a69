"""PGD-20 against ResNet-20 MBN3x1: the frozen (packed, fused) model on the cpp backend vs the same
evaluation of the training model on the pure-torch backend, in one run.

    pytest benchmarks/bench_attacks.py --benchmark-only -s     # 512 images (about 2 minutes on 2 cores)
    python benchmarks/bench_attacks.py --n 64 --steps 5         # quick check

Labels are the model's own clean predictions (random init, fixed seed), so clean accuracy is 100 % and
robust accuracy counts the predictions PGD cannot flip. Targets (issue 4): speed-up >= 1.8x, robust
accuracy within 0.5 pp. Ratios only; results go to benchmarks/results/attacks.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _pgd_accuracy(model, x, y, steps, batch_size):
    from bitkern.attacks import PGD

    atk = PGD(model, "2/255", "0.5/255", steps, random_start=True, seed=0)
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        x_adv = atk(x[i:i + batch_size], y[i:i + batch_size])
        with torch.no_grad():
            correct += int((model(x_adv).argmax(1) == y[i:i + batch_size]).sum())
    return 100.0 * correct / x.shape[0]


def compare(n=512, steps=20, batch_size=128, quant="mbn3x1", time_frozen=None):
    """Time PGD on both paths; `time_frozen(fn)` may run the frozen path under pytest-benchmark."""
    import bitkern
    from bitkern import dispatch
    from bitkern.models import create

    torch.manual_seed(0)
    model = create("resnet20", quant).eval()
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, n, batch_size)])
    frozen = bitkern.freeze(model)

    def timed(fn):
        t0 = time.perf_counter()
        return fn(), time.perf_counter() - t0

    # Frozen weights fold BatchNorm into the kernel epilogue, which rounds differently from the training
    # model's separate BN: the frozen model on the torch backend is the bit-identical "same evaluation".
    with dispatch.use_backend("torch"):
        acc_train, t_train = timed(lambda: _pgd_accuracy(model, x, y, steps, batch_size))
        acc_torch, t_torch = timed(lambda: _pgd_accuracy(frozen, x, y, steps, batch_size))
    with dispatch.use_backend("cpp"):
        run = lambda: _pgd_accuracy(frozen, x, y, steps, batch_size)  # noqa: E731
        acc_cpp, t_cpp = timed(run) if time_frozen is None else time_frozen(run)
    row = {"attack": f"PGD-{steps}", "eps": "2/255", "alpha": "0.5/255", "images": n, "model": f"resnet20-{quant}",
           "threads": torch.get_num_threads(),
           "seconds": {"training_model_torch": t_train, "frozen_torch": t_torch, "frozen_cpp": t_cpp},
           "robust_acc": {"training_model_torch": acc_train, "frozen_torch": acc_torch, "frozen_cpp": acc_cpp},
           "speedup_vs_frozen_torch": t_torch / t_cpp, "speedup_vs_training_model_torch": t_train / t_cpp}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attacks.json").write_text(json.dumps(row, indent=2))
    lines = ["| model / backend | time [s] | speed-up of frozen cpp | robust acc [%] |", "|---|---|---|---|"]
    for key, label in (("training_model_torch", "training model, torch backend"),
                       ("frozen_torch", "frozen model, torch backend"), ("frozen_cpp", "frozen model, cpp backend")):
        lines.append(f"| {label} | {row['seconds'][key]:.1f} | {row['seconds'][key] / t_cpp:.2f}x | "
                     f"{row['robust_acc'][key]:.2f} |")
    table = f"PGD-{steps} (eps 2/255, step 0.5/255) on {n} images, ResNet-20 {quant}\n\n" + "\n".join(lines) + "\n"
    (RESULTS / "attacks.md").write_text(table)
    print("\n" + table)
    return row


def test_pgd20_frozen_vs_torch_backend(benchmark):
    from bitkern import dispatch

    if not dispatch.get("cpp").available:
        import pytest
        pytest.skip(f"cpp backend unavailable: {dispatch.get('cpp').reason}")

    def time_frozen(run):
        acc = benchmark.pedantic(run, rounds=1, iterations=1)
        return acc, benchmark.stats.stats.median

    compare(n=int(os.environ.get("BITKERN_BENCH_PGD_IMAGES", 512)), time_frozen=time_frozen)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quant", default="mbn3x1")
    args = p.parse_args()
    compare(args.n, args.steps, quant=args.quant)
    sys.exit(0)
