"""PGD-20 against ResNet-20 MBN3x1: frozen/packed cpp path vs the pure-torch backend.

    python benchmarks/bench_attacks.py               # 512 images 3x32x32, PGD-20 (slow on 2 cores)
    python benchmarks/bench_attacks.py --n 64 --steps 5 --rounds 1   # quick check

Reports wall-clock ratios only (targets: speed-up >= 1.8x, robust-accuracy difference <= 0.5 pp).
Labels are the model's own clean predictions (random init, fixed seed), so clean accuracy is 100 %
and robust accuracy measures how many predictions PGD flips. Exits 0 with a SKIP line when
bitkern.models / bitkern.freeze / the cpp backend are not available.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _skip(reason: str) -> None:
    print(f"SKIP bench_attacks: {reason}")
    sys.exit(0)


def _pgd_accuracy(model, x, y, eps, alpha, steps, batch_size, seed):
    from bitkern.attacks import PGD

    atk = PGD(model, eps, alpha, steps, random_start=True, seed=seed)
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        x_adv = atk(xb, yb)
        with torch.no_grad():
            correct += int((model(x_adv).argmax(1) == yb).sum())
    return 100.0 * correct / x.shape[0]


def _timed(fn, rounds):
    times, value = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eps", default="2/255")
    p.add_argument("--alpha", default="0.5/255")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--quant", default="mbn3x1")
    args = p.parse_args(argv)

    try:
        from bitkern import dispatch
        from bitkern.models import create
    except Exception as exc:  # noqa: BLE001 - report any import problem as a skip reason
        _skip(f"bitkern.models / bitkern.dispatch not importable ({exc})")
    try:
        from bitkern import freeze
        if not callable(freeze):
            from bitkern.freeze import freeze
    except Exception:  # noqa: BLE001
        try:
            from bitkern.freeze import freeze
        except Exception as exc:  # noqa: BLE001
            _skip(f"bitkern.freeze not available ({exc})")
    status = dispatch.backends_status()
    if not status.get("cpp", (False, ""))[0]:
        _skip(f"cpp backend unavailable: {status.get('cpp', (False, 'not registered'))[1]}")

    from bitkern.attacks import parse_eps
    eps, alpha = parse_eps(args.eps), parse_eps(args.alpha, "alpha")
    torch.manual_seed(0)
    model = create("resnet20", args.quant, in_channels=3, num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.n, 3, 32, 32, generator=gen)

    with dispatch.use_backend("torch"):
        with torch.no_grad():
            y = torch.cat([model(x[i:i + args.batch_size]).argmax(1) for i in range(0, args.n, args.batch_size)])
        t_torch, acc_torch = _timed(
            lambda: _pgd_accuracy(model, x, y, eps, alpha, args.steps, args.batch_size, 0), args.rounds)
    frozen = freeze(model)
    with dispatch.use_backend("cpp"):
        t_cpp, acc_cpp = _timed(
            lambda: _pgd_accuracy(frozen, x, y, eps, alpha, args.steps, args.batch_size, 0), args.rounds)

    print(f"PGD-{args.steps} eps={args.eps} alpha={args.alpha} on {args.n} images 3x32x32, "
          f"ResNet-20 {args.quant}, torch threads={torch.get_num_threads()}, rounds={args.rounds}")
    print(f"  pure-torch backend (unfrozen model): {t_torch:8.2f} s   robust acc {acc_torch:6.2f} %")
    print(f"  frozen model, cpp backend:           {t_cpp:8.2f} s   robust acc {acc_cpp:6.2f} %")
    ratio, diff = t_torch / t_cpp, abs(acc_torch - acc_cpp)
    print(f"  speed ratio torch/cpp-frozen: {ratio:.2f}x (target >= 1.8x): {'OK' if ratio >= 1.8 else 'MISSED'}")
    print(f"  robust-accuracy difference:  {diff:.2f} pp (target <= 0.5 pp): {'OK' if diff <= 0.5 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
