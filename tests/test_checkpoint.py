"""bitkern.checkpoint: safetensors + JSON, no pickle, atomic and consistent; resume after a real kill."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from bitkern import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _train_a_bit(model, opt, steps=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(5, 1, 6, 6, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_roundtrip_model_optimizer_rng_and_extras(tmp_path, opt_name):
    m = _model()
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if opt_name == "sgd" else \
        (lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.8, 0.99)))
    opt = make(m.parameters())
    _train_a_bit(m, opt)
    torch.manual_seed(42)
    np.random.seed(3)
    random.seed(5)
    extra = {"P": torch.randn(2, 3)}
    ckpt.save_checkpoint(tmp_path, model=m, optimizer=opt, state={"epoch": 3, "metrics": {"acc": 0.5}},
                         tensors=extra)
    expect = (torch.rand(3), np.random.rand(), random.random())

    m2 = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 3))
    opt2 = make(m2.parameters())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    c = ckpt.load_checkpoint(tmp_path, model=m2, optimizer=opt2, rng=True)
    assert (torch.rand(3).tolist(), np.random.rand(), random.random()) == (expect[0].tolist(), *expect[1:])
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for idx in s1["state"]:
        for key, val in s1["state"][idx].items():
            assert torch.equal(val, s2["state"][idx][key]) if torch.is_tensor(val) else val == s2["state"][idx][key]
    assert torch.equal(c.extra()["P"], extra["P"]) and c.state["epoch"] == 3
    # continuing both gives identical weights (optimizer state really restored)
    _train_a_bit(m, opt, 2)
    _train_a_bit(m2, opt2, 2)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


def test_files_are_safetensors_and_json_and_old_weights_are_removed(tmp_path):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    _train_a_bit(m, opt)
    for epoch in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, model=m, optimizer=opt, state={"epoch": epoch})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["checkpoint-000003.safetensors", "checkpoint.json"]  # no temp files left, no pickle
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    assert state["epoch"] == 3 and state["weights"] == "checkpoint-000003.safetensors"
    tensors = load_file(str(tmp_path / state["weights"]))
    assert tensors["rng/torch"].dtype == torch.uint8
    assert any(k.startswith("optim/") and k.endswith("momentum_buffer") for k in tensors)
    assert isinstance(state["rng"]["numpy"][1], list) and isinstance(state["rng"]["python"][1], list)


def test_inconsistent_or_missing_checkpoints_are_refused(tmp_path):
    m = _model()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path, model=m)
    ckpt.save_checkpoint(tmp_path, model=m, state={"epoch": 1})
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    w = tmp_path / state["weights"]
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 0xFF  # flip one byte of tensor data
    w.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load_checkpoint(tmp_path, model=m)
    w.unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_checkpoint(tmp_path, model=m)
    ckpt.save_checkpoint(tmp_path, model=m, state={"epoch": 1})
    with pytest.raises(ckpt.CheckpointError, match="do not fit"):
        ckpt.load_checkpoint(tmp_path, model=nn.Linear(2, 2))
    with pytest.raises(ckpt.CheckpointError, match="no optimizer"):
        ckpt.load_checkpoint(tmp_path, model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))


def test_save_model_roundtrip_rebuilds_from_metadata(tmp_path):
    from bitkern.models import create

    torch.manual_seed(0)
    m = create("resnet20", "mbn2x1", num_classes=10, in_channels=1)
    path = ckpt.save_model(tmp_path / "model.safetensors", m, {"dataset": "digits"})
    meta = ckpt.read_model_meta(path)
    assert meta["arch"] == "resnet20" and meta["quant"] == "mbn2x1" and meta["dataset"] == "digits"
    m2 = ckpt.load_model(path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])


_RUN = textwrap.dedent("""
    import sys, torch
    from torch import nn
    torch.set_num_threads(1)
    from bitkern.train import fit

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(6, 3)
        def forward_features(self, x):
            return self.body(x)
        def forward(self, x):
            return self.fc(self.forward_features(x))

    recipe, optimizer, ckdir, out = sys.argv[1:5]
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(30, 1, 5, 5, generator=g), torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(0)
    model = Net()
    args = {"m": 2} if recipe == "free" else {}
    fit(model, (x, y), recipe=recipe, recipe_args=args, epochs=6 if recipe != "natural" else 3,
        batch_size=8, optimizer=optimizer, lr=0.01 if optimizer == "adam" else 0.05, seed=3,
        checkpoint_dir=ckdir, resume=True, progress=False)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
""")


def _run(script, recipe, opt, ckdir, out, kill_after=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("BITKERN_KILL_AFTER_EPOCH", None)
    if kill_after is not None:
        env["BITKERN_KILL_AFTER_EPOCH"] = str(kill_after)
    return subprocess.run([sys.executable, str(script), recipe, opt, str(ckdir), str(out)], env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("recipe, opt", [("free", "sgd"), ("odgq", "adam")])
def test_resume_after_kill_gives_bit_identical_weights(tmp_path, recipe, opt):
    """Kill a training process after epoch 1 of 3 (SIGKILL), resume it, compare with an uninterrupted run."""
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    full = _run(script, recipe, opt, tmp_path / "ck_full", tmp_path / "full.safetensors")
    assert full.returncode == 0, full.stderr
    killed = _run(script, recipe, opt, tmp_path / "ck_res", tmp_path / "res.safetensors", kill_after=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "res.safetensors").exists()
    assert json.loads((tmp_path / "ck_res" / "checkpoint.json").read_text())["epoch"] == 1
    resumed = _run(script, recipe, opt, tmp_path / "ck_res", tmp_path / "res.safetensors")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(str(tmp_path / "full.safetensors")), load_file(str(tmp_path / "res.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "ck_res" / "checkpoint.json").read_text())["epoch"] == 3


def test_resume_refuses_a_different_configuration(tmp_path):
    from bitkern.train import fit

    torch.manual_seed(0)
    x, y = torch.rand(10, 1, 5, 5), torch.randint(0, 3, (10,))
    net = lambda: nn.Sequential(nn.Flatten(), nn.Linear(25, 3))  # noqa: E731
    fit(net(), (x, y), epochs=2, batch_size=4, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ckpt.CheckpointError, match="configuration differs"):
        fit(net(), (x, y), epochs=2, batch_size=5, checkpoint_dir=tmp_path, resume=True, progress=False)


# ------------------------------------------------------------------- tampered training state on resume
def _fit_bitkern(ckdir, optimizer="sgd", quant="mbn3x1", arch="resnet20"):
    from bitkern.models import create
    from bitkern.train import fit

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
    torch.manual_seed(0)
    model = create(arch, quant, num_classes=3, in_channels=1)
    return fit(model, (x, y), epochs=1, batch_size=6, optimizer=optimizer, lr=0.01, checkpoint_dir=ckdir,
               resume=True, progress=False, meta={"arch": arch, "quant": quant, "dataset": "toy"})


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    for opt in ("sgd", "adam"):
        _fit_bitkern(base / opt, opt)
    return base


def _rewrite_hashed_state(d, edit):
    """Apply edit to the hashed state in the weights header too and recompute every hash (a consistent
    forgery, or a file written by a bug): only the checks behind the hash can object."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from bitkern import model_files as mf

    state = json.loads((d / "checkpoint.json").read_text())
    w = d / state["weights"]
    tensors = load_file(str(w))
    with safe_open(str(w), framework="pt") as f:
        md = dict(f.metadata())
    hs = json.loads(md[ckpt.STATE_KEY])
    edit(hs)
    md[ckpt.STATE_KEY] = json.dumps(hs, sort_keys=True, separators=(",", ":"))
    md.pop(mf.HASH_KEY)
    md[mf.HASH_KEY] = mf.content_sha256(tensors, md)
    save_file(tensors, str(w), metadata=md)
    edit(state)
    state.update(weights_sha256=ckpt._sha256(w), content_sha256=md[mf.HASH_KEY])
    (d / "checkpoint.json").write_text(json.dumps(state))


def _group(s):
    return s["optimizer"]["param_groups"][0]


_EDITS = {
    "quant": ("sgd", lambda s: s.update(quant="fp"), "quant"),
    "arch": ("sgd", lambda s: s.update(arch="resnet32"), "arch"),
    "num_classes": ("sgd", lambda s: s.update(num_classes=4), "num_classes"),
    "betas": ("adam", lambda s: _group(s).update(betas=[5, 5]), "betas"),
    "lr": ("sgd", lambda s: _group(s).update(lr=-1.0), "lr"),
    "momentum": ("sgd", lambda s: _group(s).update(momentum=7), "momentum"),
    "momentum_in_range": ("sgd", lambda s: _group(s).update(momentum=0.5), "momentum"),
    "extra_field": ("sgd", lambda s: s.update(evil=1), "evil"),
    "extra_group_key": ("sgd", lambda s: _group(s).update(evil=1), "evil"),
    "removed_field": ("sgd", lambda s: s.pop("history"), "history"),
    "epoch": ("sgd", lambda s: s.update(epoch=0, history=[]), "epoch|history"),
}


@pytest.mark.parametrize("hashed", [False, True], ids=["json_only", "rehashed"])
@pytest.mark.parametrize("case", sorted(_EDITS))
def test_resume_refuses_a_tampered_training_state(finished_runs, tmp_path, case, hashed):
    """The hostile-user probe: copy a finished run, edit checkpoint.json (and, rehashed, the state in the
    weights header), resume: CheckpointError naming the file, and nothing trains."""
    opt, edit, field = _EDITS[case]
    if hashed and case in ("extra_field", "epoch"):
        pytest.skip("a consistently hashed, valid state: nothing to refuse beyond the config checks")
    d = tmp_path / "ck"
    shutil.copytree(finished_runs / opt, d)
    if hashed:
        _rewrite_hashed_state(d, edit)
    else:
        state = json.loads((d / "checkpoint.json").read_text())
        edit(state)
        (d / "checkpoint.json").write_text(json.dumps(state, indent=2))
    with pytest.raises(ckpt.CheckpointError, match=field) as info:
        _fit_bitkern(d, opt)
    assert "checkpoint.json" in str(info.value) and "\n" not in str(info.value), info.value


def test_resume_of_a_finished_run_is_a_no_op(finished_runs, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(finished_runs / "sgd", d)
    before = (d / "checkpoint.json").read_text()
    res = _fit_bitkern(d)
    assert res.resumed_from == 1 and (d / "checkpoint.json").read_text() == before
    with pytest.raises(ckpt.CheckpointError, match="checkpoint quant is 'mbn3x1'"):
        _fit_bitkern(d, quant="fp")
