"""The STE backward (issue 16): attack and training steps, ratios measured in one run (2 torch threads).

    pytest benchmarks/bench_backward.py --benchmark-only -s       # pytest-benchmark; writes results/backward.md
    python benchmarks/bench_backward.py [--batch 128 --rounds 5 --pgd-images 512 --before /tmp/before]

* step: forward + input gradient (cross-entropy) at batch 128 of the frozen ResNet-20 MBN3x1 and XNOR on
  the cpp backend, the same frozen models on the pure-torch backend (float emulation), and the fp32
  ResNet-20; the cases are interleaved round by round and compared by their medians. Targets: frozen
  step <= 0.7x the fp32 step; cpp >= 2.5x faster than torch.
* PGD-20 (eps 2/255, step 0.5/255) on 512 images against the frozen MBN3x1: cpp vs torch backend, robust
  accuracy identical (the backends' gradients are bit-identical). Target >= 2.5x.
* one epoch of natural training of ResNet-20 MBN3x1 on digits (3x32x32): this tree vs the code before
  issue 16 (commit BEFORE_COMMIT, the parent of the first issue-16 commit: exported from this clone's git
  history and built once into ~/.cache/bitkern/, ~30 s; or the tree given by --before / env
  BITKERN_BEFORE_TREE), each in a fresh process, alternated. Target >= 1.5x.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bitkern import dispatch
from bench_attacks import _pgd_accuracy  # the same PGD-20 measurement as the attack benchmark

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
BATCH, THREADS = 128, 2
STEP_CASES = [("fp32", None), ("mbn3x1-frozen", "cpp"), ("mbn3x1-frozen", "torch"), ("xnor-frozen", "cpp"),
              ("xnor-frozen", "torch")]


def _cpp_available() -> bool:
    return dispatch.get("cpp").available


def build_models():
    import bitkern
    from bitkern.models import create
    torch.manual_seed(0)
    models = {"fp32": create("resnet20", "fp").eval()}
    for quant in ("mbn3x1", "xnor"):
        model = create("resnet20", quant).eval()
        with torch.no_grad():
            model(torch.rand(8, 3, 32, 32))
        models[f"{quant}-frozen"] = bitkern.freeze(model)
    return models


def attack_step(model, x, y):
    """One attack step's work: forward + gradient of the loss with respect to the input."""
    xx = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(model(xx), y), xx)
    return grad


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure_steps(batch=BATCH, rounds=5, threads=THREADS, models=None):
    torch.set_num_threads(threads)
    models = models or build_models()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    times = {case: [] for case in STEP_CASES}
    grads = {}
    for r in range(rounds + 1):  # round 0 warms up
        for name, backend in STEP_CASES:
            with dispatch.use_backend(backend):
                grads[(name, backend)], t = _timed(lambda: attack_step(models[name], x, y))
            if r:
                times[(name, backend)].append(t)
    med = {f"{n} ({b or 'fp32'})": statistics.median(t) for (n, b), t in times.items()}
    for quant in ("mbn3x1", "xnor"):
        assert torch.equal(grads[(f"{quant}-frozen", "cpp")], grads[(f"{quant}-frozen", "torch")])
    fp = med["fp32 (fp32)"]
    ratios = {}
    for quant in ("mbn3x1", "xnor"):
        cpp, tor = med[f"{quant}-frozen (cpp)"], med[f"{quant}-frozen (torch)"]
        ratios[f"frozen {quant} step (cpp) / fp32 step (target <= 0.7)"] = cpp / fp
        ratios[f"frozen {quant} step: torch / cpp backend (target >= 2.5)"] = tor / cpp
    return {"median_s": med, "ratios": ratios, "batch": batch, "threads": threads}


def saved_megabytes(model, x, y, bits=True):
    """MB the autograd graph of one step holds for its backward (distinct storages of the saved tensors);
    bits=False forces the packed ops' float path (x / out saved instead of window bits)."""
    from bitkern.ops import autograd as ag
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    original = ag._bits_backend
    ag._bits_backend = original if bits else (lambda t: None)
    try:
        xx = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(xx), y)
        torch.autograd.grad(loss, xx)
    finally:
        ag._bits_backend = original
    return sum(storages.values()) / 2**20


def measure_memory(batch=512, models=None):
    """Saved-for-backward memory of one attack step at `batch`: window bits vs the float path, fp32."""
    models = models or build_models()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    out = {"batch": batch, "saved_MB": {"fp32": saved_megabytes(models["fp32"], x, y)}}
    with dispatch.use_backend("cpp"):
        for quant in ("mbn3x1", "xnor"):
            for bits in (True, False):
                key = f"{quant}-frozen (cpp, {'window bits' if bits else 'x / out saved'})"
                out["saved_MB"][key] = saved_megabytes(models[f"{quant}-frozen"], x, y, bits)
    return out


def measure_pgd(n=512, steps=20, batch_size=128, threads=THREADS, models=None, time_cpp=None):
    torch.set_num_threads(threads)
    frozen = (models or build_models())["mbn3x1-frozen"]
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = torch.cat([frozen(x[i:i + batch_size]).argmax(1) for i in range(0, n, batch_size)])
    run = lambda: _pgd_accuracy(frozen, x, y, steps, batch_size)  # noqa: E731
    with dispatch.use_backend("torch"):
        acc_torch, t_torch = _timed(run)
    with dispatch.use_backend("cpp"):
        acc_cpp, t_cpp = _timed(run) if time_cpp is None else time_cpp(run)
    return {"images": n, "steps": steps, "seconds": {"torch": t_torch, "cpp": t_cpp},
            "robust_acc": {"torch": acc_torch, "cpp": acc_cpp}, "speedup_cpp_vs_torch": t_torch / t_cpp}


_EPOCH_SNIPPET = r"""
import json, sys, time, torch
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
import bitkern
from bitkern.data import load_dataset
from bitkern.models import create
from bitkern.train import fit
x, y = load_dataset("digits", None, "train")
x = F.interpolate(x, size=(32, 32), mode="nearest").repeat(1, 3, 1, 1)
torch.manual_seed(0)
model = create("resnet20", "mbn3x1")
t0 = time.perf_counter()
fit(model, (x, y), epochs=1, batch_size=128, lr=2e-3, optimizer="adam", progress=False, seed=0)
print(json.dumps({"seconds": time.perf_counter() - t0, "file": bitkern.__file__}))
"""


def _epoch_seconds(tree, threads):
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", _EPOCH_SNIPPET, str(threads)], env=env, cwd=str(tree),
                         capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(row["file"]).resolve().is_relative_to(Path(tree).resolve()), row
    return row["seconds"]


BEFORE_COMMIT = "e9ebbd6"  # parent of d045a50, which began issue 16: the code the issue measured


def before_tree() -> tuple[Path | None, str]:
    """(the tree of the code before issue 16 with its built extension, or None; why not). Env
    BITKERN_BEFORE_TREE wins; else BEFORE_COMMIT is exported from this clone's history and built once
    into the user cache (atomically: built in a temporary folder, then renamed)."""
    env = os.environ.get("BITKERN_BEFORE_TREE")
    if env:
        return Path(env), ""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bitkern" / \
        f"before-issue16-{BEFORE_COMMIT}"
    if list((cache / "bitkern").glob("_C*.so")):
        return cache, ""
    if shutil.which("git") is None:
        return None, "git not found (set BITKERN_BEFORE_TREE to a built copy of the code before issue 16)"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_COMMIT], capture_output=True)
    if archive.returncode:
        return None, f"commit {BEFORE_COMMIT} not in this clone's history (a shallow clone?)"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp,
                               capture_output=True, text=True)
        if build.returncode:
            return None, f"building {BEFORE_COMMIT} failed: {build.stderr.strip().splitlines()[-1:]}"
        os.replace(tmp, cache)
        os.mkdir(tmp)  # for TemporaryDirectory's cleanup
    return cache, ""


def measure_training(before, rounds=2, threads=THREADS):
    """One natural-training epoch, this tree vs `before`, alternated in fresh processes."""
    times = {"before": [], "after": []}
    for _ in range(rounds):
        times["before"].append(_epoch_seconds(before, threads))
        times["after"].append(_epoch_seconds(ROOT, threads))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": med, "all_seconds": times, "speedup": med["before"] / med["after"], "before_tree": str(before)}


def write_results(steps=None, pgd=None, training=None, memory=None):
    """Merge the given parts into results/backward.json and render every part it holds to backward.md."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "backward.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, part in (("steps", steps), ("pgd", pgd), ("training", training), ("memory", memory)):
        if part:
            data[key] = part
    lines = []
    steps, pgd, training, memory = data.get("steps"), data.get("pgd"), data.get("training"), data.get("memory")
    if steps:
        lines += [f"Forward + input gradient, batch {steps['batch']}, {steps['threads']} threads (medians, "
                  "interleaved)", "", "| model (backend) | step [ms] |", "|---|---|"]
        lines += [f"| {k} | {v * 1e3:.1f} |" for k, v in steps["median_s"].items()]
        lines += ["", "| ratio | measured |", "|---|---|"] + [f"| {k} | {v:.2f}x |" for k, v in steps["ratios"].items()]
    if memory:
        lines += ["", f"Held for the backward of one step, batch {memory['batch']} (saved tensors)", "",
                  "| model (backend) | saved [MB] |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in memory["saved_MB"].items()]
    if pgd:
        lines += ["", f"PGD-{pgd['steps']} on {pgd['images']} images, frozen MBN3x1", "",
                  "| backend | time [s] | robust acc [%] |", "|---|---|---|"]
        lines += [f"| {b} | {pgd['seconds'][b]:.1f} | {pgd['robust_acc'][b]:.2f} |" for b in ("torch", "cpp")]
        lines += ["", f"speed-up cpp vs torch: {pgd['speedup_cpp_vs_torch']:.2f}x (target >= 2.5x)"]
    if training:
        lines += ["", "One epoch of natural training, ResNet-20 MBN3x1, digits 3x32x32", "",
                  "| code | epoch [s] |", "|---|---|",
                  f"| before issue 16 | {training['seconds']['before']:.1f} |",
                  f"| this tree | {training['seconds']['after']:.1f} |", "",
                  f"speed-up: {training['speedup']:.2f}x (target >= 1.5x)"]
    from bitkern._io import atomic_write_text
    atomic_write_text(path, json.dumps(data, indent=2))
    atomic_write_text(RESULTS / "backward.md", "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


# -- pytest-benchmark ------------------------------------------------------------------------------------
needs_cpp = pytest.mark.skipif(not _cpp_available(), reason="cpp backend not built")


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(THREADS)
    return build_models()


@needs_cpp
def test_attack_step(benchmark, models):
    """All step cases interleaved (the benchmark times the frozen MBN3x1 cpp step); ratios to results/."""
    result = measure_steps(models=models)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(BATCH, 3, 32, 32, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)
    with dispatch.use_backend("cpp"):
        benchmark.pedantic(attack_step, args=(models["mbn3x1-frozen"], x, y), rounds=5, iterations=1,
                           warmup_rounds=1)
    write_results(steps=result, memory=measure_memory(models=models))


@needs_cpp
def test_pgd20(benchmark, models):
    def time_cpp(run):
        acc = benchmark.pedantic(run, rounds=1, iterations=1)
        return acc, benchmark.stats.stats.median
    result = measure_pgd(models=models, time_cpp=time_cpp)
    assert result["robust_acc"]["cpp"] == result["robust_acc"]["torch"]
    write_results(pgd=result)


@needs_cpp
def test_training_epoch(benchmark):
    before, why = before_tree()
    if before is None:
        pytest.skip(why)
    result = benchmark.pedantic(lambda: measure_training(before), rounds=1, iterations=1)
    write_results(training=result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--pgd-images", type=int, default=512, help="0 skips PGD")
    parser.add_argument("--before", default=None,
                        help="tree before issue 16 with its built _C (default: commit BEFORE_COMMIT, built once)")
    parser.add_argument("--only", choices=["steps", "memory", "pgd", "training"], default=None)
    args = parser.parse_args()
    if not _cpp_available():
        print(f"SKIP bench_backward: cpp backend unavailable ({dispatch.get('cpp').reason})")
        return
    steps = pgd = training = memory = None
    models = build_models()
    if args.only in (None, "steps"):
        steps = measure_steps(args.batch, args.rounds, args.threads, models)
    if args.only in (None, "memory"):
        memory = measure_memory(models=models)
    if args.only in (None, "pgd") and args.pgd_images:
        pgd = measure_pgd(args.pgd_images, threads=args.threads, models=models)
    if args.only in (None, "training"):
        before, why = (Path(args.before), "") if args.before else before_tree()
        if before is None:
            print(f"SKIP training epoch: {why}")
        else:
            training = measure_training(before, threads=args.threads)
    write_results(steps, pgd, training, memory)


if __name__ == "__main__":
    main()
