"""bitkern.study: worker processes give the serial run's results, a killed parallel run resumes, the
layering between eval, train and the study."""
import ast
import json
from pathlib import Path

import pytest
import torch

from bitkern.study import SweepConfig, SweepError, run_sweep
from bitkern.study.runner import plan_workers

ROOT = Path(__file__).resolve().parent.parent


def _tiny(out, **kw):
    base = dict(specs=("fp", "xnor"), epochs=2, eval_samples=8, restarts=1, pgd_steps=(2,),
                eval_eps=(16 / 255,), progress=False, out=str(out))
    return SweepConfig(**{**base, **kw})


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("train_s", "eval_s", "epoch_s")} for r in rows]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_workers_match_serial_and_resume_after_a_killed_worker(tmp_path, monkeypatch, one_thread):
    serial = run_sweep(_tiny(tmp_path / "serial", workers=1), log=lambda s: None)

    # every worker SIGKILLs itself after its first epoch: the sweep stops and says how to continue
    monkeypatch.setenv("BITKERN_KILL_AFTER_EPOCH", "1")
    with pytest.raises(SweepError, match="--resume"):
        run_sweep(_tiny(tmp_path / "par", workers=2), log=lambda s: None)
    assert not list((tmp_path / "par" / "configs").glob("*/result.json"))
    monkeypatch.delenv("BITKERN_KILL_AFTER_EPOCH")

    lines = []
    resumed = run_sweep(_tiny(tmp_path / "par", workers=2, resume=True), log=lines.append)
    assert any("2 worker processes" in s for s in lines)
    assert _strip(resumed) == _strip(serial)
    for name in ("results.md", "results_by_eps.csv"):
        assert (tmp_path / "par" / name).read_text() == (tmp_path / "serial" / name).read_text()
    saved = json.loads((tmp_path / "par" / "results.json").read_text())
    assert [r["spec"] for r in saved["rows"]] == ["fp", "xnor"]

    # done configs are skipped, also with workers; a different configuration is refused
    lines.clear()
    run_sweep(_tiny(tmp_path / "par", workers=2, resume=True), log=lines.append)
    assert sum("done earlier, skipped" in s for s in lines) == 2
    with pytest.raises(SweepError, match="different configuration"):
        run_sweep(_tiny(tmp_path / "par", workers=2, resume=True, restarts=2), log=lambda s: None)


def test_plan_workers(one_thread, monkeypatch):
    import bitkern.study.runner as runner

    monkeypatch.setattr(runner, "_available_cores", lambda: 2)
    cfg = SweepConfig(specs=("fp", "xnor", "mbn3x1")).resolved()
    assert plan_workers(cfg, 3) == 1   # the library's default: serial
    cfg.workers = None                 # bitkern sweep's default: one per core
    assert plan_workers(cfg, 3) == 2 and plan_workers(cfg, 1) == 1
    cfg.workers = 4
    assert plan_workers(cfg, 3) == 3
    cfg.workers = None
    torch.set_num_threads(2)   # torch already uses the cores: specs run one after the other
    assert plan_workers(cfg, 3) == 1
    with pytest.raises(SweepError, match="workers"):
        run_sweep(SweepConfig(workers=0, out="/nonexistent/never-written"))


def _imports(path: Path) -> set[str]:
    """Absolute names of the bitkern modules a file imports (anywhere in it, functions included)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[:-1]            # the package a module (or an __init__) belongs to
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - (node.level - 1)] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names.add(mod)
            names |= {f"{mod}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("bitkern")}


@pytest.mark.parametrize("package, forbidden", [
    ("eval", ("bitkern.train", "bitkern.study", "bitkern.cli")),   # train imports eval, never the reverse
    ("train", ("bitkern.study", "bitkern.cli")),
    ("study", ("bitkern.cli",)),
])
def test_layering_of_eval_train_study(package, forbidden):
    for path in sorted((ROOT / "bitkern" / package).rglob("*.py")):
        bad = {n for n in _imports(path) if any(n == f or n.startswith(f + ".") for f in forbidden)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_workers_exit_when_the_sweep_process_is_killed(tmp_path):
    """SIGTERM / SIGKILL to the sweep skips multiprocessing's cleanup: its workers must not live on and
    keep writing into the output directory."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (f"from bitkern.study import SweepConfig, run_sweep\n"
              f"if __name__ == '__main__':\n"
              f"    run_sweep(SweepConfig(specs=('fp', 'xnor', 'mbn3x1'), epochs=50, eval_samples=8, restarts=1,\n"
              f"              pgd_steps=(2,), eval_eps=(16 / 255,), progress=False, workers=2,\n"
              f"              out={str(tmp_path / 'o')!r}), log=lambda s: None)\n")
    (tmp_path / "run.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py")], cwd=tmp_path)
    deadline = time.time() + 120
    children = []
    while time.time() < deadline and len(children) < 2:
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        children = [int(p) for p in out if _is_worker(int(p))]
        time.sleep(0.5)
    assert len(children) >= 2, "the workers did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(p) for p in children):
        time.sleep(0.5)
    assert not any(_alive(p) for p in children), "orphaned sweep workers kept running"


def _is_worker(pid: int) -> bool:
    try:
        return "multiprocessing.spawn" in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
