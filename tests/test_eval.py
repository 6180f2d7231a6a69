"""bitkern.eval: statistics, files, sanity report (catches a masked model), sweeps, bad input."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from bitkern.attacks import BIM, FGSM, GN, PGD, Transfer
from bitkern.eval import RobustnessResult, robustness, step_size_sweep

EPS = 8 / 255


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 10)).eval()


@pytest.fixture(scope="module")
def setup():
    m = small_cnn()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(96, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = m(x).argmax(1)
    y[:10] = (y[:10] + 1) % 10          # some clean errors
    return m, x, y


def attacks_for(m):
    src = small_cnn(3)
    return [GN(m, 0.05, eps=EPS), FGSM(m, EPS), PGD(m, EPS, 4 / 255, 5), BIM(m, EPS, 2 / 255, 5),
            Transfer(src, PGD(src, EPS, 2 / 255, 5))]


@pytest.fixture(scope="module")
def result(setup):
    m, x, y = setup
    return robustness(m, (x, y), attacks_for(m), restarts=3, batch_size=40, progress=False,
                      record_iterations=True, seed=0, sanity_examples=64)


def test_statistics(setup, result):
    m, x, y = setup
    with torch.no_grad():
        assert result.clean_acc == pytest.approx(float((m(x).argmax(1) == y).float().mean() * 100))
    a = result.attacks
    assert set(a) == {"GN", "FGSM", "PGD-5", "BIM-5", "Transfer(PGD-5)"}
    assert a["PGD-5"]["runs"] == 3 and a["FGSM"]["runs"] == 1 and a["BIM-5"]["runs"] == 1
    pgd = result.correct["PGD-5"]
    assert pgd.dtype == np.bool_ and pgd.shape == (3, 96)
    assert a["PGD-5"]["mean"] == pytest.approx(pgd.mean() * 100)
    assert a["PGD-5"]["std"] == pytest.approx(np.std(pgd.mean(1) * 100, ddof=1))
    assert a["PGD-5"]["worst"] == pytest.approx(pgd.all(0).mean() * 100)
    assert a["PGD-5"]["worst"] <= a["PGD-5"]["mean"] <= result.clean_acc
    curve = a["PGD-5"]["curve"]
    assert len(curve["mean"]) == 6 and curve["mean"][-1] == pytest.approx(a["PGD-5"]["mean"])
    assert curve["worst"][-1] == pytest.approx(a["PGD-5"]["worst"])
    assert all(w <= mu + 1e-9 for w, mu in zip(curve["worst"], curve["mean"]))
    assert result.sanity["passed"], result.sanity["violations"]
    assert "Transfer(PGD-5)" not in a or "curve" not in a["Transfer(PGD-5)"]


def test_reproducible_and_dataset_input(setup, result):
    m, x, y = setup
    atk = [a for a in attacks_for(m) if a.name in ("GN", "PGD-5")]
    again = robustness(m, TensorDataset(x, y), atk, restarts=3, batch_size=40, progress=False, seed=0,
                       sanity=False)
    for k in again.correct:
        assert np.array_equal(again.correct[k], result.correct[k])


def test_files_and_markdown(result, tmp_path):
    paths = result.save(tmp_path / "res.json")
    data = json.loads(open(paths["json"]).read())
    for key in ("schema", "model", "bops", "eps", "alpha", "steps", "restarts", "seed", "clean", "attacks",
                "sanity"):
        assert key in data
    assert data["eps"] == pytest.approx(EPS) and data["steps"] == 5
    assert set(data["attacks"]["PGD-5"]) >= {"mean", "std", "worst", "per_run", "runs", "params"}
    arrays = np.load(paths["npz"], allow_pickle=False)
    assert arrays["clean_correct"].shape == (96,)
    md = open(paths["md"]).read()
    assert "| PGD-5 |" in md and "worst case" in md and "Sanity report" in md
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_combine_shards(setup):
    m, x, y = setup
    atk = [FGSM(m, EPS), PGD(m, EPS, 2 / 255, 2)]
    a = robustness(m, (x[:50], y[:50]), atk, restarts=2, progress=False, sanity=False)
    b = robustness(m, (x[50:], y[50:]), atk, restarts=2, progress=False, sanity=False)
    c = RobustnessResult.combine([a, b])
    assert c.n_examples == 96
    assert np.array_equal(c.correct["PGD-2"], np.concatenate([a.correct["PGD-2"], b.correct["PGD-2"]], 1))
    assert c.attacks["FGSM"]["mean"] == pytest.approx(
        (a.attacks["FGSM"]["mean"] * 50 + b.attacks["FGSM"]["mean"] * 46) / 96)


class Masked(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 255).detach() / 255 + 0 * x)


def test_sanity_flags_masked_model(setup):
    m, x, y = setup
    masked = Masked(m)
    res = robustness(masked, (x[:48], y[:48]), [FGSM(masked, EPS), PGD(masked, EPS, 2 / 255, 3)], restarts=2,
                     progress=False, sanity_examples=48)
    checks = {c["name"]: c for c in res.sanity["checks"]}
    zero = checks["subset:zero_input_gradient"]
    assert zero["passed"] is False and zero["numbers"]["zero_element_fraction"] == 1.0
    assert res.sanity["passed"] is False and "subset:zero_input_gradient" in res.sanity["violations"]
    assert "VIOLATIONS" in res.to_markdown()


def test_step_size_sweep(setup, tmp_path):
    m, x, y = setup
    sw = step_size_sweep(m, (x[:48], y[:48]), "8/255", ["1/255", "4/255"], steps=4, restarts=2, progress=False,
                         plot_path=tmp_path / "sweep.png", json_path=tmp_path / "sweep.json")
    assert set(sw["alphas"]) == {"alpha=1/255", "alpha=4/255"}
    assert all(len(s["mean"]) == 5 for s in sw["alphas"].values())
    assert sw["worst_case_alpha"] in sw["alphas"]
    assert open(tmp_path / "sweep.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads(open(tmp_path / "sweep.json").read())["steps"] == 4


def test_bitkern_model_quick():
    models = pytest.importorskip("bitkern.models", reason="bitkern.models not importable yet")
    m = models.create("resnet20", "mbn3x1", in_channels=1, num_classes=10).eval()
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    res = robustness(m, (x, y), [PGD(m, EPS, 2 / 255, 2)], restarts=2, progress=False, sanity=False)
    assert res.correct["PGD-2"].shape == (2, 6)
    assert res.extras["PGD-2"]["max_linf"] <= EPS + 1e-6 and res.extras["PGD-2"]["inconsistent"] == 0


def test_bad_inputs(setup):
    m, x, y = setup
    atk = [FGSM(m, EPS)]
    with pytest.raises(ValueError, match="empty"):
        robustness(m, (x[:0], y[:0]), atk, progress=False)
    with pytest.raises(ValueError, match="label"):
        robustness(m, (x, y + 10), atk, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        robustness(m, (x - 0.5, y), atk, progress=False)
    with pytest.raises(ValueError, match="different model"):
        robustness(m, (x, y), [FGSM(small_cnn(1), EPS)], progress=False)
    with pytest.raises(ValueError, match="target_map"):
        robustness(m, (x, y), [FGSM(m, EPS, targeted=True)], progress=False)
    with pytest.raises(ValueError, match="restarts"):
        robustness(m, (x, y), atk, restarts=0, progress=False)
    with pytest.raises(TypeError, match="attacks"):
        robustness(m, (x, y), ["PGD"], progress=False)
    with pytest.raises(TypeError, match="data"):
        robustness(m, x, atk, progress=False)


def test_nested_within_counts_smaller_budget_breaks(setup):
    """An example broken at a smaller budget (by any attack with as many runs) is broken at a larger one
    (nested balls): the study's curves fall monotonically."""
    m, x, y = setup
    small = robustness(m, (x, y), {"PGD-2": PGD(m, EPS / 2, 1 / 255, 2)}, progress=False, sanity=False)
    large = robustness(m, (x, y), {"PGD-2": PGD(m, EPS, 2 / 255, 2), "FGSM": FGSM(m, EPS)},
                       progress=False, sanity=False)
    nested = large.nested_within(small)
    assert np.array_equal(nested.correct["PGD-2"], large.correct["PGD-2"] & small.correct["PGD-2"])
    runs_fgsm, runs_pgd = large.correct["FGSM"].shape[0], small.correct["PGD-2"].shape[0]
    expected = small.correct["PGD-2"] if runs_fgsm == runs_pgd else small.correct["PGD-2"].all(0, keepdims=True)
    assert np.array_equal(nested.correct["FGSM"], large.correct["FGSM"] & expected)
    assert nested.attacks["PGD-2"]["worst"] <= min(small.attacks["PGD-2"]["worst"],
                                                   large.attacks["PGD-2"]["worst"])
    assert nested.to_dict()["config"]["nested_within_eps"] == pytest.approx(EPS / 2)
    with pytest.raises(ValueError, match="examples"):
        large.nested_within(robustness(m, (x[:10], y[:10]), {"PGD-2": PGD(m, EPS / 2, 1 / 255, 2)},
                                       progress=False, sanity=False))
