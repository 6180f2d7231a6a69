"""bitkern.distributed + the sharded paths: real 2- and 4-process gloo groups on CPU.

Each multi-process check writes a small worker script and runs it with ``torch.multiprocessing.spawn``
in a subprocess (file:// rendezvous, no ports): the sharded evaluation equals the single process, a DDP
step on 2 ranks equals the single-process step on the same global batch, a killed 2-rank training run
resumes (on 1 process), ``torchrun -m bitkern eval`` runs.
"""
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bitkern import distributed as bd

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240

PRELUDE = textwrap.dedent("""
    import os, pickle, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def _init(rank, world, store):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)

    def launch(fn, world, out):
        store = os.path.join(out, "store")
        mp.spawn(fn, args=(world, store, out), nprocs=world, join=True)
""")


def run_script(tmp_path, body, *args, expect_ok=True):
    script = tmp_path / "worker.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "BITKERN_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------------ unit: helpers
def test_single_process_defaults():
    assert bd.world_size() == 1 and bd.rank() == 0 and bd.is_main() and not bd.active()
    assert bd.all_gather_object(3) == [3] and bd.broadcast_object("x") == "x"
    with pytest.raises(RuntimeError, match="process group"):
        bd.active(True)


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (2, 4), (0, 2), (7, 7)])
def test_shard_range_is_a_partition(n, world):
    shares = [bd.shard_range(n, r, world) for r in range(world)]
    covered = [i for a, b in shares for i in range(a, b)]
    assert covered == list(range(n))
    sizes = [b - a for a, b in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_batches_keeps_whole_batches():
    assert [bd.shard_batches(30, 7, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [bd.shard_batches(30, 16, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError):
        bd.shard_range(5, 2, 2)


def test_merge_checks_gaps_duplicates_and_orders_by_index():
    parts = [(np.array([3, 4]), {"a": np.array([30, 40]), "m": np.array([[3, 4], [-3, -4]])}),
             (np.array([0, 1, 2]), {"a": np.array([0, 10, 20]), "m": np.array([[0, 1, 2], [0, -1, -2]])})]
    out = bd.merge_indexed(parts, 5)
    assert out["a"].tolist() == [0, 10, 20, 30, 40]
    assert out["m"].tolist() == [[0, 1, 2, 3, 4], [0, -1, -2, -3, -4]]
    with pytest.raises(bd.ShardError, match="in no shard"):
        bd.merge_indexed(parts[:1], 5)
    with pytest.raises(bd.ShardError, match="more than one shard"):
        bd.merge_indexed(parts + [(np.array([4]), {"a": np.array([1]), "m": np.array([[1], [1]])})], 5)
    with pytest.raises(bd.ShardError, match="outside"):
        bd.merge_indexed(parts, 4)
    with pytest.raises(bd.ShardError, match="entries"):
        bd.merge_indexed([(np.array([0, 1]), {"a": np.array([1])})], 2)


# --------------------------------------------------------------------- evaluation: identical results
EVAL_WORKER = """
import numpy as np
from torch import nn
from bitkern.attacks import FGSM, GN, PGD
from bitkern.eval import robustness, standard_suite

EPS = 8 / 255

def setup():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(30, 1, 6, 6, generator=g)
    with torch.no_grad():
        y = m(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10
    return m, x, y

def evaluate(m, x, y, batch_size, distributed):
    attacks = [GN(m, 0.05, eps=EPS), FGSM(m, EPS), PGD(m, EPS, 2 / 255, 3)]
    r = robustness(m, (x, y) if y is not None else x, attacks, restarts=2, batch_size=batch_size, progress=False,
                   record_iterations=True, seed=3, sanity_examples=12, suite="standard",
                   suite_options={"apgd_steps": 3, "n_target_classes": 2, "square_queries": 15},
                   distributed=distributed)
    d = r.to_dict()
    d.pop("timing", None)
    d["suite"]["timing"] = None
    return {"dict": d, "clean": r.clean_correct, "correct": r.correct, "curves": r.curve_counts,
            "suite": r.suite.arrays(), "sanity": r.sanity}

def worker(rank, world, store, out):
    _init(rank, world, store)
    m, x, y = setup()
    from torch.utils.data import TensorDataset
    res = {bs: evaluate(m, x, y, bs, None) for bs in (7, 16)}
    res["dataset"] = evaluate(m, TensorDataset(x, y), None, 7, None)   # a Dataset shards like a tensor pair
    if rank == 0:
        ref = {bs: evaluate(m, x, y, bs, False) for bs in (7, 16)}
        ref["dataset"] = ref[7]
        with open(os.path.join(out, "eval.pkl"), "wb") as f:
            pickle.dump({"sharded": res, "single": ref}, f)
    dist.destroy_process_group()

if __name__ == "__main__":
    launch(worker, int(sys.argv[1]), os.getcwd())
"""


def _same(a, b, path="result"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, path


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_robustness_and_suite_equal_one_process(tmp_path, world):
    """PGD restarts, GN, FGSM, curves, extras, the standard suite and the sanity report: the result of
    2 or 4 processes is identical to one process (batch sizes 7 and 16; with 16, 4 ranks leave two idle)."""
    run_script(tmp_path, EVAL_WORKER, world)
    got = pickle.loads((tmp_path / "eval.pkl").read_bytes())
    for bs in (7, 16, "dataset"):
        _same(got["sharded"][bs], got["single"][bs], f"batch_size {bs}")
    # the suite's verdicts do not depend on the batch size either
    np.testing.assert_array_equal(got["sharded"][7]["suite"]["suite_broken_by"],
                                  got["sharded"][16]["suite"]["suite_broken_by"])
    assert got["sharded"][7]["dict"]["n_examples"] == 30


# ------------------------------------------------------------------------------- DDP training
TRAIN_COMMON = """
import torch
from torch import nn
from bitkern.train import RECIPES, fit

class Tiny(nn.Module):
    # no BatchNorm: DDP normalises with each rank's own batch statistics, so only a BN-free model
    # matches the single process to rounding
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(16, 3)

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.fc(self.forward_features(x))

def data(n=11):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y

ARGS = {"natural": {}, "fastat": {}, "pgd": {"steps": 2}, "bim": {"steps": 2}, "free": {"m": 2},
        "dq": {"beta": 1e-2}, "odgq": {"n_k": 2, "lam": 0.5}}

def train(recipe, distributed, **kw):
    torch.manual_seed(0)
    model = Tiny()
    res = fit(model, data(), recipe=recipe, recipe_args=ARGS[recipe], epochs=kw.pop("epochs", 2), batch_size=8,
              lr=0.05, progress=False, seed=1, distributed=distributed, **kw)
    return model, res
"""

DDP_WORKER = TRAIN_COMMON + """
def worker(rank, world, store, out):
    _init(rank, world, store)
    diffs, hist = {}, {}
    for recipe in sorted(RECIPES):
        # 11 examples in batches of 8: the last batch of 3 splits 2 / 1 (weighted loss, re-split state)
        m_ddp, r_ddp = train(recipe, None, augment=recipe == "natural")
        if rank == 0:
            m_one, r_one = train(recipe, False, augment=recipe == "natural")
            diffs[recipe] = max(float((a - b).abs().max()) for a, b in zip(m_ddp.parameters(), m_one.parameters()))
            hist[recipe] = (r_ddp.history, r_one.history)
    if rank == 0:
        with open(os.path.join(out, "ddp.pkl"), "wb") as f:
            pickle.dump({"diffs": diffs, "hist": hist}, f)
    dist.destroy_process_group()

if __name__ == "__main__":
    launch(worker, int(sys.argv[1]), os.getcwd())
"""


def test_ddp_training_matches_one_process_for_every_recipe(tmp_path):
    """Every recipe, 2 ranks, 2 epochs of 2 optimizer steps (or m replays): the parameters equal the
    single-process run on the same global batches within 1e-6, and so do the logged loss / accuracy."""
    run_script(tmp_path, DDP_WORKER, 2)
    got = pickle.loads((tmp_path / "ddp.pkl").read_bytes())
    assert set(got["diffs"]) == {"natural", "fastat", "pgd", "bim", "free", "dq", "odgq"}
    for recipe, d in got["diffs"].items():
        assert d < 1e-6, (recipe, d)
    for recipe, (h_ddp, h_one) in got["hist"].items():
        assert len(h_ddp) == len(h_one)
        for a, b in zip(h_ddp, h_one):
            assert a["train_acc"] == b["train_acc"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5), recipe


KILL_WORKER = TRAIN_COMMON + """
def worker(rank, world, store, out):
    _init(rank, world, store)
    train("free", None, epochs=6, checkpoint_dir=os.path.join(out, "ckpt"), resume=True,
          log_path=os.path.join(out, "log.jsonl"))
    dist.destroy_process_group()

if __name__ == "__main__":
    launch(worker, int(sys.argv[1]), os.getcwd())
"""


def test_killed_ddp_run_resumes_on_another_world_size(tmp_path):
    """A 2-rank Free-AT run killed after epoch 1 (rank 0 wrote the checkpoint, the recipe's per-position
    delta gathered from both ranks) resumes in one process and ends where an uninterrupted run ends."""
    os.environ["BITKERN_KILL_AFTER_EPOCH"] = "1"
    try:
        proc = run_script(tmp_path, KILL_WORKER, 2, expect_ok=False)
    finally:
        del os.environ["BITKERN_KILL_AFTER_EPOCH"]
    assert proc.returncode != 0
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 1
    ns = {}
    exec(compile(TRAIN_COMMON, "train_common", "exec"), ns)
    resumed, res = ns["train"]("free", None, epochs=6, checkpoint_dir=tmp_path / "ckpt", resume=True,
                               log_path=tmp_path / "log.jsonl")
    assert res.resumed_from == 1 and len(res.history) == 3
    fresh, _ = ns["train"]("free", None, epochs=6)
    for a, b in zip(resumed.parameters(), fresh.parameters()):
        assert float((a - b).detach().abs().max()) < 1e-5


# ------------------------------------------------------------------------------------ torchrun CLI
def torchrun(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "BITKERN_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "bitkern", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_torchrun_train_eval_and_sweep(tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m bitkern train` trains with DDP and rank 0 alone reports and writes;
    `... eval` writes the files one process writes (timing aside) and prints once; `... sweep --resume`
    skips the done config, spreads the others over the ranks and merges every row into one results.json."""
    from bitkern.cli import main

    out = torchrun(["train", "--quant", "mbn1x1", "--epochs", "1", "--batch-size", "128", "--out", "run",
                    "--no-progress"], tmp_path)
    assert out.count("2 processes") == 1 and out.count('"epoch": 1') == 1
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "train_log.jsonl").read_text().count("\n") == 1

    tiny = ["--epochs", "1", "--eval-samples", "12", "--restarts", "2", "--pgd-steps", "3", "--no-progress",
            "--eps", "16/255"]
    assert main(["sweep", "--specs", "fp", *tiny, "--out", str(tmp_path / "sw")]) == 0
    capsys.readouterr()
    model = tmp_path / "sw" / "configs" / "fp" / "model.safetensors"
    ev = ["eval", model, "--eval-samples", "40", "--restarts", "2", "--pgd-steps", "3", "--eps", "16/255",
          "--no-progress"]
    assert main([*map(str, ev), "--out", str(tmp_path / "one")]) == 0
    single = capsys.readouterr().out
    out = torchrun([*ev, "--out", tmp_path / "two"], tmp_path)
    assert out == single                                    # printed once, the same numbers
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    for d in (one, two):
        d.pop("timing"), d.pop("arrays", None)
    assert one == two
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)

    row_fp = json.loads((tmp_path / "sw" / "results.json").read_text())["rows"][0]
    out = torchrun(["sweep", "--specs", "fp,mbn1x1,xnor", *tiny, "--out", tmp_path / "sw", "--resume"], tmp_path)
    assert "fp: done earlier, skipped" in out and "mbn1x1: top-1" in out and "[rank 1] xnor: top-1" in out
    res = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert [r["spec"] for r in res["rows"]] == ["fp", "mbn1x1", "xnor"] and res["rows"][0] == row_fp
    assert (tmp_path / "sw" / "robust_vs_bops.png").is_file()
    for spec in ("mbn1x1", "xnor"):   # rank 1's config has every file a serial run writes
        for f in ("train_log.jsonl", "checkpoint/checkpoint.json", "model.safetensors", "robustness.json"):
            assert (tmp_path / "sw" / "configs" / spec / f).is_file(), (spec, f)
