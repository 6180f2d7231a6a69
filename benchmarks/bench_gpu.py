"""GPU benchmark: bitkern's cuda / triton XNOR-popcount conv vs cuDNN fp32 / fp16 conv2d.

    python benchmarks/bench_gpu.py [--batch 128 1] [--mbn 1x1 3x1] [--repeat 50] [--json out.json]

Shapes: the CPU benchmark's (16->16@32^2, 32->32@16^2, 64->64@8^2, 256->256@14^2) and ResNet-18's 3x3
layers (64@56^2, 128@28^2, 256@14^2, 512@7^2), all 3x3 / stride 1 / padding 1. Times are medians of
CUDA-event timings after warm-up (the triton autotuner runs during warm-up). bitkern times include
activation packing (weights are packed once, as in a frozen model). Without a CUDA device it prints why
and exits 0.
"""
import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

SHAPES = [  # (name, channels, spatial)
    ("cpu-16@32", 16, 32), ("cpu-32@16", 32, 16), ("cpu-64@8", 64, 8), ("cpu-256@14", 256, 14),
    ("r18-64@56", 64, 56), ("r18-128@28", 128, 28), ("r18-256@14", 256, 14), ("r18-512@7", 512, 7),
]


def _time_ms(fn, repeat, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _write_json(path, rows):
    from bitkern._io import atomic_write_json
    atomic_write_json(path, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 1])
    parser.add_argument("--mbn", nargs="+", default=["1x1", "3x1"], help="MxN bases (1x1 = XNOR-Net)")
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", help="write the rows here (atomically)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_gpu: skipped, no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda})")
        return 0
    from bitkern import dispatch

    backends = {}
    for name in args.backends:
        backend = dispatch.get(name)
        if backend.available:
            backends[name] = backend
        else:
            print(f"bench_gpu: {name} skipped: {backend.reason}")
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    rows = []
    print(f"device: {torch.cuda.get_device_name(dev)}  (times in ms, median of {args.repeat})")
    header = f"{'shape':<12} {'B':>4} {'MxN':>4} {'cudnn32':>9} {'cudnn16':>9}" + "".join(
        f" {n:>9} {'x32':>6}" for n in backends)
    print(header)
    for batch in args.batch:
        for shape, channels, size in SHAPES:
            x = torch.randn(batch, channels, size, size, device=dev)
            w = torch.randn(channels, channels, 3, 3, device=dev)
            t32 = _time_ms(lambda: F.conv2d(x, w, padding=1), args.repeat, args.warmup)
            x16, w16 = x.half(), w.half()
            t16 = _time_ms(lambda: F.conv2d(x16, w16, padding=1), args.repeat, args.warmup)
            for mbn in args.mbn:
                m, n = (int(p) for p in mbn.split("x"))
                wb = torch.randn(m, channels, channels, 3, 3, device=dev)
                alpha = torch.rand(m, channels, device=dev)
                v = None if n == 1 and m == 1 else torch.linspace(0.0, 0.5, n, device=dev)
                beta = torch.rand(1 if v is None else n, device=dev)
                row = {"shape": shape, "batch": batch, "mbn": mbn, "cudnn_fp32_ms": t32, "cudnn_fp16_ms": t16}
                line = f"{shape:<12} {batch:>4} {mbn:>4} {t32:>9.3f} {t16:>9.3f}"
                for name, backend in backends.items():
                    wp = backend.pack_signs(wb.flatten(0, 1)).unflatten(0, wb.shape[:2])

                    def run():
                        backend.mbn_conv2d_packed(x, wp, channels, (3, 3), alpha, v, beta, (1, 1), (1, 1))

                    t = _time_ms(run, args.repeat, args.warmup)
                    row[f"{name}_ms"] = t
                    line += f" {t:>9.3f} {t32 / t:>6.2f}"
                rows.append(row)
                print(line, flush=True)
    if args.json:
        _write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
