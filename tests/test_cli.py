"""The `bitkern` CLI: a tiny end-to-end sweep (all output files), resume, the other commands, user errors."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitkern import dispatch
from bitkern.cli import main

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--epochs", "1", "--eval-samples", "8", "--restarts", "2", "--no-progress", "--eps", "8,16/255"]


def test_tiny_sweep_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--specs", "fp,mbn1x1", *TINY, "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "fp: top-1" in log and "mbn1x1: top-1" in log

    res = json.loads((out / "results.json").read_text())
    assert [r["spec"] for r in res["rows"]] == ["fp", "mbn1x1"]
    for r in res["rows"]:
        assert 0 <= r["top1"] <= 100 and r["eval_samples"] == 8 and r["bops"] > 0
        for name in ("PGD-20", "PGD-50"):
            assert 0 <= r[name]["worst"] <= r[name]["mean"] + 1e-9 <= 100 + 1e-9
            assert len(r[name]["curve"]["mean"]) == int(name[4:]) + 1
    fp, mbn = res["rows"]
    assert mbn["bops"] < fp["bops"] and mbn["method"] == "MBN 1x1" and (mbn["weights"], mbn["activations"]) == (1, 1)

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["spec"] for r in rows] == ["fp", "mbn1x1"] and "pgd50_worst" in rows[0]
    md = (out / "results.md").read_text()
    assert "| Model / Dataset | Method | Weights (bases/bits) | Activations (bases/bits) | BOPS [1e8] |" in md
    assert md.count("\n| ") == 6  # 2 tables: header + 2 rows (the separator line starts with "|---")
    assert "| MBN 1x1 | 1 | 1 |" in md and "| FP | 8 | 8 |" in md
    for png in ("robust_vs_bops.png", "pgd_vs_iterations.png", "robust_vs_eps.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    by_eps = list(csv.DictReader((out / "results_by_eps.csv").open()))
    assert {(r["spec"], r["eps_255"], r["evaluation"]) for r in by_eps} == {
        (s, e, "PGD-20") for s in ("fp", "mbn1x1") for e in ("8", "16")} | {(s, "16", "PGD-50") for s in ("fp", "mbn1x1")}
    assert "## Robust accuracy vs eps" in md and res["rows"][0]["table_eps"] == pytest.approx(16 / 255)
    for spec in ("fp", "mbn1x1"):
        cdir = out / "configs" / spec
        for f in ("result.json", "model.safetensors", "model.json", "frozen.safetensors", "robustness.json",
                  "robustness-eps8.json",
                  "train_log.jsonl", "checkpoint/checkpoint.json"):
            assert (cdir / f).is_file(), f

    # rerun without --resume: refused with one line, exit 2
    assert main(["sweep", "--specs", "fp,mbn1x1", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and err.count("\n") == 1

    # a sweep killed after the first config: the second's result is missing -> only it is redone
    (out / "configs" / "mbn1x1" / "result.json").unlink()
    assert main(["sweep", "--specs", "fp,mbn1x1", *TINY, "--out", str(out), "--resume"]) == 0
    log = capsys.readouterr().out
    assert "fp: done earlier, skipped" in log and "mbn1x1: top-1" in log
    res2 = json.loads((out / "results.json").read_text())
    assert res2["rows"][0] == res["rows"][0]
    assert res2["rows"][1]["top1"] == res["rows"][1]["top1"]  # same trained weights (from the checkpoint)

    # resuming with different options is refused
    assert main(["sweep", "--specs", "fp,mbn1x1", "--epochs", "2", "--eval-samples", "8", "--restarts", "2",
                 "--no-progress", "--out", str(out), "--resume"]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_train_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--quant", "pact-w4a4", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "test top-1" in out and json.loads(out.splitlines()[0])["epoch"] == 1
    assert main(["train", "--quant", "pact-w4a4", "--epochs", "1", "--out", str(run), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["eval", str(run / "model.safetensors"), "--eval-samples", "8", "--restarts", "1",
                 "--pgd-steps", "3", "--no-progress", "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "top-1 (frozen, 360 test examples)" in out and "PGD-3 on 8 examples" in out
    assert json.loads((tmp_path / "ev.json").read_text())["n_examples"] == 8


def test_bops_simulate_bench(capsys):
    assert main(["bops", "--quant", "mbn3x1"]) == 0
    assert "total" in capsys.readouterr().out
    assert main(["bops", "--quant", "fp", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 40_551_040 * 64  # paper: 25.95e8 at 8x8 bits
    assert main(["simulate", "--compare", "pact-w2a2,mbn3x1"]) == 0
    assert "mbn3x1" in capsys.readouterr().out
    assert main(["simulate", "--quant", "pact-w2a2", "--input-shape", "3,8,8"]) == 0
    assert "cycles" in capsys.readouterr().out
    assert main(["bench", "--quick", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "mbn_conv2d 3x1" in out
    if dispatch.get("cpp").available:  # the model table: frozen models vs fp32, with the targets
        assert "resnet20 32x32 batch 128" in out and "resnet18 224x224 batch 1" in out and ">= 8x" in out


@pytest.mark.parametrize("argv, needle", [
    (["sweep", "--specs", "fp,bogus"], "bogus"),
    (["sweep", "--epochs", "0"], "--epochs"),
    (["sweep", "--epochs", "abc"], "--epochs"),
    (["sweep", "--dataset", "mnist", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
    (["sweep", "--dataset", "cifar10"], "data directory"),
    (["sweep", "--arch", "vgg"], "vgg"),
    (["sweep", "--recipe-arg", "steps"], "key=value"),
    (["sweep", "--eps", "x/255"], "--eps"),
    (["train", "--quant", "mbn9x1"], "mbn9x1"),
    (["eval", "/nonexistent/model.safetensors"], "not found"),
    (["bops", "--input-shape", "3,32"], "C,H,W"),
    (["frobnicate"], "frobnicate"),
    (["sweep", "--eps", "8"], "outside [0, 1]"),
    (["sweep", "--eps", "2,2/255"], "repeated"),
    (["sweep", "--alpha", "-1"], "--alpha"),
    (["sweep", "--recipe", "pgd", "--recipe-arg", "bogus=1"], "bogus"),
    (["sweep", "--device", "foo"], "foo"),
    (["sweep", "--device", "cuda:7"], "cuda:7"),
    (["sweep", "--threads", "100000"], "--threads"),
    (["sweep", "--suite", "fancy"], "--suite"),
    (["train", "--recipe", "free", "--recipe-arg", "m=0"], "m must"),
    (["train", "--device", "tpu"], "tpu"),
    (["eval", "/nonexistent/model.safetensors", "--eps", "x"], "--eps"),
    (["bops", "--input-shape", "3,100000,100000"], "too large"),
    (["bops", "--input-shape", "100000,8,8"], "too large"),
    (["sweep", "--weight-decay=-1"], "--weight-decay"),
    (["sweep", "--recipe", "pgd", "--recipe-arg", "eps=5"], "--train-eps"),
    (["sweep", "--train-eps", "5"], "--train-eps"),
    (["sweep", "--recipe", "odgq", "--recipe-arg", "eps_l=2"], "eps_l must"),
    (["sweep", "--recipe", "pgd", "--recipe-arg", "alpha=0"], "alpha must"),
    (["sweep", "--recipe", "fastat", "--recipe-arg", "alpha_factor=1e308"], "alpha_factor must"),
    (["sweep", "--recipe", "free", "--recipe-arg", "m=100000"], "m must"),
    (["sweep", "--resume"], "nothing to resume"),
    (["train", "--resume", "--out", "/nonexistent/run"], "nothing to resume"),
])
def test_user_errors_are_one_line_exit_2(argv, needle, capsys, tmp_path):
    assert main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] == "sweep" else [])]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_validation_happens_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["sweep", "--eps", "8", "--out", str(out)]) == 2
    assert main(["sweep", "--recipe", "pgd", "--recipe-arg", "stepz=3", "--out", str(out)]) == 2
    assert main(["train", "--recipe-arg", "bogus=1", "--out", str(out)]) == 2
    assert not out.exists()
    capsys.readouterr()


def test_os_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--epochs", "1", "--no-progress", "--out", str(tmp_path / ("a" * 300))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "too long" in err, err


def test_out_must_be_a_writable_directory(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv in (["sweep", "--out", str(a_file)], ["sweep", "--out", str(a_file / "sub")],
                 ["train", "--out", str(a_file)], ["eval", str(a_file), "--out", str(a_file / "sub" / "r")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and str(a_file) in err, err


def test_no_command_prints_usage_and_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "sweep" in err
    assert list(tmp_path.iterdir()) == []


def test_budget_lists():
    from bitkern.cli import _budget_list

    assert _budget_list("0,2,4,8,16/255") == pytest.approx([0, 2 / 255, 4 / 255, 8 / 255, 16 / 255])
    assert _budget_list("8/255") == pytest.approx([8 / 255])
    assert _budget_list("0.03,0.01") == pytest.approx([0.01, 0.03])
    assert _budget_list("1/255,4/255") == pytest.approx([1 / 255, 4 / 255])


def test_module_entry_point_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "bitkern", "sweep", "--specs", "nope", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "nope" in p.stderr
    p = subprocess.run([sys.executable, "-m", "bitkern", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0 and "sweep" in p.stdout


@pytest.mark.parametrize("var, value", [("BITKERN_NUM_THREADS", "99999"), ("BITKERN_OUTPUT_POOL_MB", "abc"),
                                        ("BITKERN_BACKEND", "gpu"), ("BITKERN_ISA", "neon")])
def test_bad_environment_is_one_line_before_work(var, value, monkeypatch, capsys):
    monkeypatch.setenv(var, value)
    assert main(["bops", "--quant", "xnor"]) == 2
    err = capsys.readouterr().err
    assert var in err and err.count("\n") == 1 and "Traceback" not in err, err
