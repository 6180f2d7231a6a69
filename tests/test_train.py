"""bitkern.train: each recipe runs on tiny data and changes what it must."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitkern.train import RECIPES, StepContext, fit, lipschitz_penalty, lr_at, make_recipe, mmd_gaussian
from bitkern.train.recipes import FreeAT, ODGQ

EPS = 8 / 255


class TinyNet(nn.Module):
    """Plain nn.Module with the model contract the recipes use (forward_features + fc)."""

    def __init__(self, c=1, k=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, k)

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.fc(self.forward_features(x))


def tiny_data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x[y == 0] *= 0.3  # a learnable signal
    return x, y


def params_of(m):
    return [p.detach().clone() for p in m.parameters()]


def plain_ctx(model, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    inputs = []

    def step(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    return StepContext(model, step), inputs


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_trains_and_changes_weights(recipe):
    torch.manual_seed(0)
    model = TinyNet()
    before = params_of(model)
    res = fit(model, tiny_data(), recipe=recipe, epochs=2, batch_size=8, lr=0.05, progress=False,
              recipe_args={"steps": 2} if recipe in ("pgd", "bim") else ({"m": 2} if recipe == "free" else None))
    assert res.recipe == recipe and len(res.history) == res.epochs_run
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    expected_epochs = {"free": 1, "odgq": 1}.get(recipe, 2)  # epochs / m, epochs / 2
    assert res.epochs_run == expected_epochs


def test_fit_is_deterministic_on_cpu():
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TinyNet()
        torch.manual_seed(123)  # the global RNG state before fit must not matter: fit seeds itself
        fit(model, tiny_data(), recipe="fastat", epochs=2, batch_size=8, progress=False, seed=7)
        out.append(params_of(model))
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_fastat_delta_stays_in_ball():
    torch.manual_seed(0)
    model = TinyNet()
    rec = make_recipe("fastat", eps=EPS)
    ctx, _ = plain_ctx(model)
    x, y = tiny_data(8)
    rec.start_epoch(0, seed=0)
    rec.train_batch(ctx, x, y, 0)
    d = rec.last_delta
    assert float(d.abs().max()) <= EPS + 1e-6 and float(d.abs().max()) > EPS / 2
    assert float((x + d).min()) >= 0 and float((x + d).max()) <= 1
    assert rec.alpha_factor == 1.25 and rec.default_schedule == "cyclic"


@pytest.mark.parametrize("name", ["pgd", "bim"])
def test_pgd_bim_perturbation_in_ball(name):
    torch.manual_seed(0)
    model = TinyNet()
    rec = make_recipe(name, eps=EPS, steps=3)
    rec.start_epoch(0, 0)
    x, y = tiny_data(8)
    x_adv = rec.perturb(model, x, y)
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert rec.alpha == pytest.approx(EPS / 4)
    with torch.no_grad():  # the attack increases the loss
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    if name == "bim":  # no random start: deterministic
        assert torch.equal(x_adv, rec.perturb(model, x, y))


def test_free_at_perturbation_persists_across_replays_and_batches():
    torch.manual_seed(0)
    seen = []

    class Spy(TinyNet):
        def forward(self, x):
            seen.append(x.detach().clone())
            return super().forward(x)

    model = Spy()
    rec = FreeAT(eps=EPS, m=3)
    assert rec.run_epochs(6) == 2 and rec.steps_per_batch == 3
    x, y = tiny_data(8)
    rec.setup(tuple(x.shape), "cpu")
    ctx, _ = plain_ctx(model)
    rec.train_batch(ctx, x, y, 0)
    assert len(seen) == 3
    assert torch.equal(seen[0], x)  # delta starts at zero
    # replay r uses the delta left by replay r - 1 (one eps-step each)
    d1, d2 = seen[1] - x, seen[2] - x
    assert float(d1.abs().max()) == pytest.approx(EPS, abs=1e-6)
    assert not torch.equal(d1, d2)
    assert float(rec.delta.abs().max()) <= EPS + 1e-7
    # next (smaller) batch starts from the persisted delta, sliced to its size
    kept = rec.delta[:5].clone()
    x2, y2 = x[:5] * 0.5 + 0.25, y[:5]
    seen.clear()
    rec.train_batch(ctx, x2, y2, 1)
    assert torch.allclose(seen[0], (x2 + kept).clamp(0, 1))


def test_odgq_global_set_moves_and_x_adv_stays_in_ball():
    torch.manual_seed(0)
    model = TinyNet()
    rec = ODGQ(eps=EPS, n_k=3, lam=3.0)
    assert rec.run_epochs(10) == 5 and rec.eps_l == pytest.approx(EPS / 2)
    x, y = tiny_data(8)
    rec.setup(tuple(x.shape), "cpu")
    ctx, _ = plain_ctx(model)
    rec.start_epoch(1, seed=0)                    # k = 1
    assert rec.k == 1
    rec.train_batch(ctx, x, y, 0)
    P = rec.P
    assert torch.count_nonzero(P[0]) == 0           # P[:k] untouched
    assert torch.count_nonzero(P[1]) > 0            # P[k:N_k] += eps_l * sign(g)
    assert torch.equal(P[1], P[2])
    assert float(P[1].abs().max()) == pytest.approx(rec.eps_l, abs=1e-7)
    xa = rec.last_x_adv
    assert float((xa - x).abs().max()) <= EPS + 1e-6 and 0 <= float(xa.min()) and float(xa.max()) <= 1
    # accumulates over batches: a second batch moves P again (the last smaller batch uses a slice)
    before = P.clone()
    rec.train_batch(ctx, x[:5], y[:5], 1)
    assert not torch.equal(before[1, :5], P[1, :5])
    assert torch.equal(before[1, 5:], P[1, 5:])
    assert float((rec.last_x_adv - x[:5]).abs().max()) <= EPS + 1e-6
    rec.start_epoch(3, seed=0)
    assert rec.k == 0                               # k = epoch mod N_k
    assert ODGQ.lam_for_quant("xnor") == 0.003 and ODGQ.lam_for_quant("pact-w4a4") == 3.0


def test_odgq_requires_forward_features():
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 4))
    with pytest.raises(AttributeError):
        fit(model, tiny_data(), recipe="odgq", epochs=2, batch_size=8, progress=False)


def test_mmd_gaussian():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 5, generator=g)
    assert float(mmd_gaussian(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(mmd_gaussian(a, a + 3.0)) > 0.1
    assert float(mmd_gaussian(a, a + 3.0)) > float(mmd_gaussian(a, a + 0.3))
    with pytest.raises(ValueError, match="features"):
        mmd_gaussian(a, torch.randn(4, 3))


def test_dq_lipschitz_penalty():
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))
    assert float(lipschitz_penalty(lin).detach()) == pytest.approx(0.0)
    with torch.no_grad():
        lin.weight.mul_(2.0)
    # W W^T - I = 3 I  ->  ||.||_F^2 = 9 * 4
    assert float(lipschitz_penalty(lin).detach()) == pytest.approx(36.0)
    wide = nn.Linear(8, 2, bias=False)  # Gram on the smaller side (2 x 2)
    assert lipschitz_penalty(wide).shape == ()
    torch.manual_seed(0)
    m1, m2 = TinyNet(), TinyNet()
    m2.load_state_dict(m1.state_dict())
    fit(m1, tiny_data(), recipe="natural", epochs=1, batch_size=8, progress=False)
    fit(m2, tiny_data(), recipe="dq", recipe_args={"beta": 0.1}, epochs=1, batch_size=8, progress=False)
    assert not torch.equal(m1.fc.weight, m2.fc.weight)


def test_schedules():
    assert lr_at("constant", 5, 10, 0.1) == 0.1
    assert lr_at("step", 0, 100, 0.1) == 0.1
    assert lr_at("step", 60, 100, 0.1) == pytest.approx(0.01)
    assert lr_at("step", 80, 100, 0.1) == pytest.approx(0.001)
    assert lr_at("cosine", 0, 100, 0.1) == pytest.approx(0.1)
    assert lr_at("cosine", 100, 100, 0.1) == pytest.approx(0.0)
    cyc = [lr_at("cyclic", s, 100, 0.2) for s in range(100)]
    assert max(cyc) == pytest.approx(0.2, rel=0.02) and 35 <= cyc.index(max(cyc)) <= 45
    assert cyc[0] < 0.01 and cyc[-1] < 0.01
    with pytest.raises(ValueError, match="schedule"):
        lr_at("linear", 0, 1, 0.1)


def test_fit_log_and_eval(tmp_path):
    model = TinyNet()
    log = tmp_path / "log.jsonl"
    res = fit(model, tiny_data(), epochs=2, batch_size=8, progress=False, log_path=log, eval_data=tiny_data(10, 1))
    import json

    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and "eval_acc" in rows[0] and rows == res.history


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs"), ({"epochs": 1, "batch_size": 0}, "batch_size"),
    ({"epochs": 1, "recipe": "madry"}, "unknown recipe"), ({"epochs": 1, "recipe_args": {"foo": 1}}, "unknown argument"),
    ({"epochs": 1, "schedule": "linear"}, "schedule"), ({"epochs": 1, "optimizer": "rmsprop"}, "optimizer"),
    ({"epochs": 1, "recipe": "pgd", "recipe_args": {"steps": 0}}, "steps"),
])
def test_fit_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(TinyNet(), tiny_data(), progress=False, **kwargs)


def test_fit_rejects_bad_data():
    with pytest.raises(ValueError, match="x must be a float tensor"):
        fit(TinyNet(), (torch.zeros(4, 6, 6), torch.zeros(4, dtype=torch.long)), epochs=1, progress=False)
    with pytest.raises(TypeError, match="tensor pair"):
        fit(TinyNet(), [1, 2, 3], epochs=1, progress=False)
