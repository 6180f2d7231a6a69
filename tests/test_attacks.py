"""bitkern.attacks: invariants, exact formulas, determinism, mode restoration, bad input."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitkern.attacks import BIM, FGSM, GN, PGD, TPGD, Transfer, parse_eps

EPS = 8 / 255
SLACK = 1e-6


def small_cnn(seed=0, in_channels=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 64, 10))


@pytest.fixture(scope="module")
def model():
    return small_cnn().eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 1, 8, 8, generator=g)
    x[0] = 0.0  # corners of the box: clipping to [0, 1] must hold there too
    x[1] = 1.0
    return x, torch.randint(0, 10, (12,), generator=g)


ATTACKS = {
    "GN": lambda m: GN(m, std=0.1, eps=EPS),
    "FGSM": lambda m: FGSM(m, EPS),
    "PGD": lambda m: PGD(m, "8/255", "2/255", 3, restarts=2),
    "BIM": lambda m: BIM(m, EPS, 2 / 255, 3),
    "TPGD": lambda m: TPGD(m, EPS, 2 / 255, 3, rho=0.5),
    "Transfer": lambda m: Transfer(small_cnn(5), PGD(small_cnn(5), EPS, 2 / 255, 2)),
}


def assert_invariants(x, x_adv, eps):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if eps is not None:
        assert float((x_adv - x).abs().max()) <= eps + SLACK


@pytest.mark.parametrize("name", list(ATTACKS))
def test_invariants_small_cnn(model, batch, name):
    x, y = batch
    atk = ATTACKS[name](model)
    x_adv = atk(x, y)
    assert_invariants(x, x_adv, EPS)
    assert not torch.equal(x_adv, x) or name == "GN"


MODELS = ["fp", "mbn3x1", "xnor", "pact-w2a2"]


@pytest.mark.parametrize("quant", MODELS)
def test_invariants_bitkern_models(quant):
    models = pytest.importorskip("bitkern.models", reason="bitkern.models not importable yet")
    torch.manual_seed(0)
    m = models.create("resnet20", quant, in_channels=1, num_classes=10).eval()
    x = torch.rand(4, 1, 8, 8)
    y = torch.arange(4)
    for atk in (PGD(m, EPS, 2 / 255, 2), FGSM(m, EPS), TPGD(m, EPS, 2 / 255, 1)):
        assert_invariants(x, atk(x, y), EPS)
    # gradients reach the input through the model's STE (not masked)
    xg = x.clone().requires_grad_(True)
    F.cross_entropy(m(xg), y).backward()
    assert float(xg.grad.abs().sum()) > 0


def test_parse_eps():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps(" 2 / 255 ") == pytest.approx(2 / 255)
    assert parse_eps("0.03") == pytest.approx(0.03)
    assert parse_eps(0.5) == 0.5 and parse_eps(0) == 0.0
    for bad, err in [("-1/255", ValueError), (-0.1, ValueError), (8, ValueError), ("abc", ValueError),
                     ("1/0", ValueError), (float("nan"), ValueError), (None, TypeError), (True, TypeError)]:
        with pytest.raises(err):
            parse_eps(bad)


def test_fgsm_matches_formula(model, batch):
    x, y = batch
    xg = x.clone().requires_grad_(True)
    F.cross_entropy(model(xg), y, reduction="sum").backward()
    expected = (x + EPS * xg.grad.sign()).clamp(0, 1)
    assert torch.equal(FGSM(model, EPS)(x, y), expected)
    # targeted: descend the loss to the target
    t = (y + 1) % 10
    xg = x.clone().requires_grad_(True)
    F.cross_entropy(model(xg), t, reduction="sum").backward()
    assert torch.equal(FGSM(model, EPS, targeted=True)(x, t), (x - EPS * xg.grad.sign()).clamp(0, 1))


def _bim_reference(model, x, y, eps, alpha, steps, x0=None, extra=None):
    x_t = x.clone() if x0 is None else x0.clone()
    for _ in range(steps):
        xg = x_t.clone().requires_grad_(True)
        logits = model(xg)
        loss = F.cross_entropy(logits, y, reduction="sum") + (0 if extra is None else extra(logits))
        (g,) = torch.autograd.grad(loss, xg)
        x_t = torch.min(torch.max(x_t + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_t


def test_bim_and_pgd_match_formula(model, batch):
    x, y = batch
    ref = _bim_reference(model, x, y, EPS, 2 / 255, 4)
    assert torch.equal(BIM(model, EPS, 2 / 255, 4)(x, y), ref)
    assert torch.equal(PGD(model, EPS, 2 / 255, 4, random_start=False)(x, y), ref)
    # PGD's random start: U(-eps, eps) drawn from its own generator with the given seed
    g = torch.Generator().manual_seed(7)
    x0 = (x + (torch.rand(x.shape, generator=g) * 2 * EPS - EPS)).clamp(0, 1)
    ref = _bim_reference(model, x, y, EPS, 2 / 255, 3, x0=x0)
    assert torch.equal(PGD(model, EPS, 2 / 255, 3, seed=7)(x, y), ref)


def test_tpgd_matches_formula(model, batch):
    x, y = batch
    rho = 0.5
    with torch.no_grad():
        p_clean = F.softmax(model(x), 1)

    def kl(logits):
        return (p_clean * (p_clean.log() - F.log_softmax(logits, 1))).sum() / rho

    ref = _bim_reference(model, x, y, EPS, 2 / 255, 3, extra=kl)
    assert torch.allclose(TPGD(model, EPS, 2 / 255, 3, rho=rho)(x, y), ref, atol=1e-7)


def test_determinism_and_global_rng(model, batch):
    x, y = batch
    state = torch.get_rng_state()
    a = PGD(model, EPS, 2 / 255, 2, seed=3)(x, y)
    b = PGD(model, EPS, 2 / 255, 2, seed=3)(x, y)
    c = PGD(model, EPS, 2 / 255, 2, seed=4)(x, y)
    n1 = GN(model, 0.1, seed=3)(x, y)
    assert torch.equal(torch.get_rng_state(), state), "attacks must not touch the global RNG"
    assert torch.equal(a, b) and not torch.equal(a, c)
    atk = GN(model, 0.1, seed=3)
    assert torch.equal(atk(x, y), n1) and not torch.equal(atk(x, y), n1)  # a stream...
    assert torch.equal(atk.manual_seed(3)(x, y), n1)                     # ...restartable


def test_restarts_keep_strongest_and_curves(model, batch):
    x, y = batch
    atk = PGD(model, EPS, 2 / 255, 3, restarts=3, seed=1)
    out = atk.run(x, y, record=True)
    assert out.correct.shape == (3, 12) and out.curves.shape == (3, 4, 12)
    assert torch.equal(out.curves[:, -1], out.correct)
    with torch.no_grad():
        final_ok = model(out.x_adv).argmax(1) == y
    # an example broken by any restart is broken in the returned x_adv
    assert torch.equal(final_ok, out.correct.all(0))
    assert torch.equal(out.best_restart.unique().sort()[0], out.best_restart.unique().sort()[0])
    steps_seen = []
    atk.run(x, y, restarts=1, callback=lambda r, s, xt, ok: steps_seen.append(s))
    assert steps_seen == [0, 1, 2, 3]


def test_targeted_reaches_targets(model, batch):
    x, y = batch
    t = (y + 3) % 10
    with torch.no_grad():
        before = (model(x).argmax(1) == t).float().mean()
        x_adv = PGD(model, 0.3, 0.05, 10, targeted=True)(x, t)
        after = (model(x_adv).argmax(1) == t).float().mean()
    assert after > before and after >= 0.5
    atk = PGD(model, 0.3, 0.05, 5, targeted=True, target_map=lambda xx, yy: (yy + 3) % 10)
    out = atk.run(x, y)
    assert out.correct.shape == (1, 12)  # correctness against the true labels


class Masked(nn.Module):
    """Output does not depend differentiably on the input: the input gradient is exactly zero."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.detach() + 0 * x)


def test_masked_model_and_bpda_surrogate(model, batch):
    x, y = batch
    masked = Masked(model)
    assert torch.equal(BIM(masked, EPS, 2 / 255, 3)(x, y), x)  # zero gradient: no step at all
    x_bpda = BIM(masked, EPS, 2 / 255, 3, surrogate=model)(x, y)
    assert torch.equal(x_bpda, BIM(model, EPS, 2 / 255, 3)(x, y))


def test_ste_surrogate_mode():
    ops = pytest.importorskip("bitkern.ops", reason="bitkern.ops not importable yet")
    if not hasattr(ops, "set_ste_mode"):
        pytest.skip("bitkern.ops has no set_ste_mode")
    models = pytest.importorskip("bitkern.models", reason="bitkern.models not importable yet")
    m = models.create("resnet20", "mbn3x1", in_channels=1, num_classes=10).eval()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    before = ops.get_ste_mode()
    assert_invariants(x, FGSM(m, EPS, surrogate="identity")(x, y), EPS)
    assert ops.get_ste_mode() == before
    with pytest.raises(ValueError, match="surrogate"):
        FGSM(m, EPS, surrogate="no-such-mode")


def test_mode_and_requires_grad_restored(batch):
    x, y = batch
    m = small_cnn()
    m.train()
    m[1].eval()                      # a mixed state must come back exactly
    m[0].weight.requires_grad_(False)
    flags = [mod.training for mod in m.modules()]
    grads = [p.requires_grad for p in m.parameters()]
    running = m[1].running_mean.clone()
    PGD(m, EPS, 2 / 255, 2)(x, y)
    assert [mod.training for mod in m.modules()] == flags
    assert [p.requires_grad for p in m.parameters()] == grads
    assert torch.equal(m[1].running_mean, running)  # ran in eval mode: BN statistics untouched
    assert all(p.grad is None for p in m.parameters())

    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("boom")
            return self.lin(x.flatten(1))

    b = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        PGD(b, EPS, 2 / 255, 2)(x, y)
    assert b.training and all(p.requires_grad for p in b.parameters())


def test_transfer_uses_source_gradients(model, batch):
    x, y = batch
    src = small_cnn(9).eval()
    direct = BIM(src, EPS, 2 / 255, 3)(x, y)
    inner = BIM(model, EPS, 2 / 255, 3)
    assert torch.equal(Transfer(src, inner)(x, y), direct)
    assert inner.model is model  # the caller's attack is not rebound
    out = Transfer(src, inner, target_model=model).run(x, y)
    with torch.no_grad():
        assert torch.equal(out.correct[0], model(direct).argmax(1) == y)


def test_bad_inputs(model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="eps"):
        PGD(model, -0.1, 0.01, 2)
    with pytest.raises(ValueError, match="eps"):
        FGSM(model, 8)                      # unit mistake: 8 meant 8/255
    with pytest.raises(ValueError, match="steps"):
        PGD(model, EPS, 0.01, -1)
    with pytest.raises(TypeError, match="steps"):
        BIM(model, EPS, 0.01, 2.5)
    with pytest.raises(ValueError, match="alpha"):
        PGD(model, EPS, 0, 2)
    with pytest.raises(ValueError, match="restarts"):
        PGD(model, EPS, 0.01, 2, restarts=0)
    with pytest.raises(ValueError, match="rho"):
        TPGD(model, EPS, 0.01, 2, rho=0)
    with pytest.raises(ValueError, match="std"):
        GN(model, -1.0)
    with pytest.raises(TypeError, match="model"):
        FGSM("not a model", EPS)
    with pytest.raises(TypeError, match="surrogate"):
        FGSM(model, EPS, surrogate=3)
    atk = FGSM(model, EPS)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        atk(x * 2, y)
    with pytest.raises(ValueError, match="label"):
        atk(x, y + 10)
    with pytest.raises(ValueError, match="empty"):
        atk(x[:0], y[:0])
    with pytest.raises(ValueError, match="shape"):
        atk(x, y[:3])
    with pytest.raises(TypeError, match="floating"):
        atk((x * 255).to(torch.uint8), y)
    with pytest.raises(TypeError, match="integer"):
        atk(x, y.float())
