"""Attacks against ResNet-20 MBN3x1: the frozen (packed, fused) model on the cpp backend vs the same
evaluation on the pure-torch backend, in one run.

* PGD-20 (512 images; also against the training model on the torch backend);
* Square with 1000 queries (256 images): forward passes only, so all of it runs on the packed kernels
  (issue 17 target: >= 4x faster on cpp than on torch, identical verdicts).

    pytest benchmarks/bench_attacks.py --benchmark-only -s     # both (several minutes on 2 cores)
    python benchmarks/bench_attacks.py --n 64 --steps 5         # quick check of the PGD comparison

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


def _digits32_model(quant, n):
    """A trained model, so Square has margins to fight (on a random-init model it wins in ~3 queries):
    ResNet-20 on the bundled digits scaled to 3x32x32 (the CIFAR layer shapes), 2 epochs, frozen."""
    import torch.nn.functional as F

    import bitkern
    from bitkern.data import load_dataset
    from bitkern.models import create
    from bitkern.train import fit

    def as32(x):
        return F.interpolate(x, size=(32, 32), mode="nearest").repeat(1, 3, 1, 1)

    x_tr, y_tr = load_dataset("digits", None, "train")
    x_te, y_te = load_dataset("digits", None, "test")
    torch.manual_seed(0)
    model = create("resnet20", quant)
    fit(model, (as32(x_tr), y_tr), epochs=2, batch_size=64, lr=2e-3, optimizer="adam", progress=False, seed=0)
    x = as32(x_te)
    x = torch.cat([x] * (-(-n // x.shape[0])))[:n]
    y = torch.cat([y_te] * (-(-n // y_te.shape[0])))[:n]
    return bitkern.freeze(model.eval()), x, y


def compare_square(n=256, queries=1000, batch_size=256, quant="mbn3x1", time_frozen=None):
    """Square on the frozen model, pure-torch backend vs cpp backend: time and per-example verdicts."""
    from bitkern import dispatch
    from bitkern.attacks import Square
    from bitkern.eval import example_seeds

    frozen, x, y = _digits32_model(quant, n)
    seeds = example_seeds(0, range(n), "Square")

    def run():
        atk = Square(frozen, "2/255", queries=queries)
        robust, spent = [], 0
        for i in range(0, n, batch_size):
            out = atk.run(x[i:i + batch_size], y[i:i + batch_size], example_seeds=seeds[i:i + batch_size])
            with torch.no_grad():
                robust.append(frozen(out.x_adv).argmax(1) == y[i:i + batch_size])
            spent += int(out.queries.sum())
        return torch.cat(robust), spent

    with dispatch.use_backend("torch"):
        t0 = time.perf_counter()
        robust_torch, queries_torch = run()
        t_torch = time.perf_counter() - t0
    with dispatch.use_backend("cpp"):
        if time_frozen is None:
            t0 = time.perf_counter()
            robust_cpp, queries_cpp = run()
            t_cpp = time.perf_counter() - t0
        else:
            (robust_cpp, queries_cpp), t_cpp = time_frozen(run)
    row = {"attack": f"Square-{queries}", "eps": "2/255", "images": n, "model": f"resnet20-{quant}-frozen",
           "threads": torch.get_num_threads(), "seconds": {"torch": t_torch, "cpp": t_cpp},
           "speedup_cpp_vs_torch": t_torch / t_cpp, "queries": {"torch": queries_torch, "cpp": queries_cpp},
           "robust_acc": {"torch": float(robust_torch.float().mean() * 100),
                          "cpp": float(robust_cpp.float().mean() * 100)},
           "identical_verdicts": bool(torch.equal(robust_torch, robust_cpp))}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attacks_square.json").write_text(json.dumps(row, indent=2))
    table = (f"Square-{queries} (eps 2/255) on {n} images, frozen ResNet-20 {quant}\n\n"
             "| backend | time [s] | forward queries | robust acc [%] |\n|---|---|---|---|\n"
             + "".join(f"| {b} | {row['seconds'][b]:.1f} | {row['queries'][b]} | {row['robust_acc'][b]:.2f} |\n"
                       for b in ("torch", "cpp"))
             + f"\ncpp vs torch: {row['speedup_cpp_vs_torch']:.2f}x, identical verdicts: "
               f"{row['identical_verdicts']}\n")
    (RESULTS / "attacks_square.md").write_text(table)
    print("\n" + table)
    return row


def _frozen_timer(benchmark):
    def time_frozen(run):
        result = benchmark.pedantic(run, rounds=1, iterations=1)
        return result, benchmark.stats.stats.median
    return time_frozen


def _need_cpp():
    from bitkern import dispatch

    if not dispatch.get("cpp").available:
        import pytest
        pytest.skip(f"cpp backend unavailable: {dispatch.get('cpp').reason}")


def test_square_frozen_cpp_vs_torch_backend(benchmark):
    _need_cpp()
    row = compare_square(n=int(os.environ.get("BITKERN_BENCH_SQUARE_IMAGES", 256)), time_frozen=_frozen_timer(benchmark))
    assert row["identical_verdicts"], "Square verdicts differ between the torch and cpp backends"


def test_pgd20_frozen_vs_torch_backend(benchmark):
    _need_cpp()
    compare(n=int(os.environ.get("BITKERN_BENCH_PGD_IMAGES", 512)), time_frozen=_frozen_timer(benchmark))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quant", default="mbn3x1")
    args = p.parse_args()
    compare(args.n, args.steps, quant=args.quant)
    sys.exit(0)
