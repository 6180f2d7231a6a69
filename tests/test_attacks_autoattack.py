"""APGD, APGD-T, Square, losses/temperature and per-example seeding (bitkern.attacks)."""
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitkern.attacks import (APGD, APGDT, BIM, GN, PGD, Square, apgd_checkpoints, square_p_selection,
                             square_size)
from bitkern.attacks._rng import ExampleRNG
from bitkern.attacks.apgd import apgd_halving, apgd_schedule

EPS = 8 / 255
SLACK = 1e-6


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 16, 32), nn.ReLU(), nn.Linear(32, 10))


class PerExample(nn.Module):
    """Runs the inner model one example at a time: a per-example deterministic forward (and backward)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.cat([self.inner(x[i:i + 1]) for i in range(x.shape[0])])


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def model():
    return tiny_cnn().eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 1, 8, 8, generator=g)
    x[0] = 0.0
    x[1] = 1.0
    return x, torch.randint(0, 10, (12,), generator=g)


def assert_invariants(x, x_adv, eps):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float((x_adv - x).abs().max()) <= eps + SLACK


# --------------------------------------------------------------------------- APGD schedule
def _reference_checkpoints(n_iter):
    """Transcription of the step-size-check bookkeeping of auto-attack's attack_single_run."""
    n_iter_2, n_iter_min, size_decr = (max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1),
                                       max(int(0.03 * n_iter), 1))
    k, counter3, out = n_iter_2 + 0, 0, []
    for i in range(n_iter):
        counter3 += 1
        if counter3 == k:
            out.append(i + 1)
            counter3 = 0
            k = max(k - size_decr, n_iter_min)
    return out


def _paper_checkpoints(n_iter):
    p = [Fraction(0), Fraction(22, 100)]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100))
        if nxt > 1:
            break
        p.append(nxt)
    return [math.ceil(q * n_iter) for q in p[1:]]


@pytest.mark.parametrize("n_iter", [1, 5, 10, 20, 33, 100, 250, 1000])
def test_apgd_checkpoints_match_reference(n_iter):
    assert apgd_checkpoints(n_iter) == _reference_checkpoints(n_iter)


def test_apgd_checkpoints_values():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99] == _paper_checkpoints(100)
    assert apgd_checkpoints(1000) == _paper_checkpoints(1000)
    assert apgd_checkpoints(5) == [1, 2, 3, 4, 5]
    assert apgd_checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert apgd_schedule(100) == (22, 6, 3)


def _reference_check_oscillation(x, j, k, k3=0.75):
    t = torch.zeros(x.shape[1])
    for counter5 in range(k):
        t += (x[j - counter5] > x[j - counter5 - 1]).float()
    return (t <= k * k3 * torch.ones_like(t)).float()


def test_apgd_halving_rule_constructed():
    k, rho = 4, 0.75
    n_iter = 10
    steps = torch.zeros(n_iter, 4)
    # window = loop indices 4..7 (checkpoint at i = 7), compared with their predecessors 3..6
    steps[3:8, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])      # 4/4 increases: keep
    steps[3:8, 1] = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0])      # 2/4 <= 3: halve
    steps[3:8, 2] = torch.tensor([1.0, 2.0, 3.0, 4.0, 3.0])      # 3/4 <= 0.75 * 4: halve (<=, as reference)
    steps[3:8, 3] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])      # increases, but condition 2 below
    best = torch.tensor([5.0, 2.0, 4.0, 5.0])
    last_best = torch.tensor([1.0, 1.0, 1.0, 5.0])               # example 3: no improvement since last check
    reduced = torch.tensor([False, False, False, False])
    fl = apgd_halving(steps, 7, k, rho, best, last_best, reduced)
    assert fl.tolist() == [False, True, True, True]
    ref = _reference_check_oscillation(steps, 7, k, rho).bool()
    assert torch.equal(ref | ((~reduced) & (last_best >= best)), fl)
    # condition 2 is off when the step size was reduced at the last checkpoint
    fl = apgd_halving(steps, 7, k, rho, best, last_best, torch.tensor([False, False, False, True]))
    assert fl.tolist() == [False, True, True, False]
    # random cases agree with the reference transcription
    g = torch.Generator().manual_seed(0)
    for i, kk in [(3, 4), (9, 2), (0, 1), (21, 22)]:
        ls = torch.randn(max(i + 2, 25), 6, generator=g)
        assert torch.equal(apgd_halving(ls, i, kk, rho, ls[i], ls[i], torch.ones(6, dtype=torch.bool)),
                           _reference_check_oscillation(ls, i, kk, rho).bool())


class Constant(nn.Module):
    """Logits independent of the input: zero gradient, constant loss."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(0, 1, 10))

    def forward(self, x):
        return self.bias.expand(x.shape[0], 10) + 0 * x.flatten(1)[:, :1]


def test_apgd_step_size_halves_on_plateau(batch):
    x, _ = batch
    m = Constant()
    y = torch.full((x.shape[0],), 9)                    # correctly classified, never broken
    atk = APGD(m, EPS, steps=10)
    atk(x, y)
    # loss never increases: condition 1 holds at every checkpoint, each halves the step size
    expected = 2 * EPS / 2 ** len(apgd_checkpoints(10))
    assert torch.allclose(atk._last_step_size, torch.full((x.shape[0],), expected))


# --------------------------------------------------------------------------- Square schedule
def _reference_p_selection(it, n_queries, p_init):
    it = int(it / n_queries * 10000)
    if 10 < it <= 50:
        return p_init / 2
    if 50 < it <= 200:
        return p_init / 4
    if 200 < it <= 500:
        return p_init / 8
    if 500 < it <= 1000:
        return p_init / 16
    if 1000 < it <= 2000:
        return p_init / 32
    if 2000 < it <= 4000:
        return p_init / 64
    if 4000 < it <= 6000:
        return p_init / 128
    if 6000 < it <= 8000:
        return p_init / 256
    if 8000 < it:
        return p_init / 512
    return p_init


@pytest.mark.parametrize("n_queries", [1, 37, 100, 1000, 5000, 10000])
def test_square_p_schedule_matches_reference(n_queries):
    for p_init in (0.8, 0.3):
        for it in range(n_queries):
            assert square_p_selection(it, n_queries, p_init) == _reference_p_selection(it, n_queries, p_init)
    try:
        import torchattacks
    except Exception:
        return
    ref = torchattacks.Square(nn.Linear(1, 1), n_queries=n_queries, p_init=0.8)
    for it in range(0, n_queries, max(1, n_queries // 500)):
        assert square_p_selection(it, n_queries, 0.8) == ref.p_selection(it)


def test_square_sizes():
    assert square_size(0.8, 64, 1) == 7                 # 8x8 digits
    assert square_size(0.8, 3 * 32 * 32, 3) == 29       # CIFAR
    assert square_size(0.8 / 16, 3 * 32 * 32, 3) == 7
    assert square_size(0.8 / 512, 64, 1) == 1
    for p in (0.8, 0.4, 0.1, 0.05, 0.01, 0.001):
        for c, hw in ((1, 64), (3, 1024), (3, 4096)):
            assert square_size(p, c * hw, c) == max(int(round(math.sqrt(p * c * hw / c))), 1)


def test_square_vertical_stripe_init(model, batch):
    x, y = batch
    with torch.no_grad():
        y = model(x).argmax(1)                           # all correctly classified: all attacked
    out = Square(model, EPS, queries=0).run(x, y)
    x_adv = out.x_adv
    up, down = (x + EPS).clamp(0, 1), (x - EPS).clamp(0, 1)
    assert bool(((x_adv == up) | (x_adv == down)).all())
    # the sign is constant along each column (vertical stripes): compare where not clipped
    sign = torch.where(x_adv == up, 1.0, -1.0)
    free = (x > EPS) & (x < 1 - EPS)
    col = (sign * free).sum(2, keepdim=True).sign()      # per (example, channel, column)
    assert bool(((sign == col) | ~free).all())
    assert torch.equal(out.queries, torch.full((12,), 2))
    assert torch.equal(out.iterations, torch.zeros(12, dtype=torch.long))


# --------------------------------------------------------------------------- invariants
ATTACKS = {
    "APGD-CE": lambda m, e: APGD(m, e, steps=6, restarts=2),
    "APGD-DLR": lambda m, e: APGD(m, e, steps=6, loss="dlr"),
    "APGD-targeted": lambda m, e: APGD(m, e, steps=4, targeted=True,
                                       target_map=lambda xx, yy: (yy + 1) % 10),
    "APGDT": lambda m, e: APGDT(m, e, steps=4, n_target_classes=3),
    "Square": lambda m, e: Square(m, e, queries=30, restarts=2),
    "PGD-dlr-T": lambda m, e: PGD(m, e, e / 4, 3, loss="dlr", temperature=10.0),
    "PGD-cw": lambda m, e: PGD(m, e, e / 4, 3, loss="cw"),
    "BIM-T": lambda m, e: BIM(m, e, e / 4, 3, temperature=0.5),
    "APGD-T2": lambda m, e: APGD(m, e, steps=4, temperature=2.0),
}


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("eps", [EPS, 0.5])
def test_invariants(model, batch, name, eps):
    x, y = batch
    atk = ATTACKS[name](model, eps)
    out = atk.run(x, y)
    assert_invariants(x, out.x_adv, eps)
    with torch.no_grad():
        pred = model(out.x_adv).argmax(1)
    assert torch.equal(pred == y, out.correct.all(0)), "returned point = the strongest restart"
    import json
    json.dumps(atk.params())
    assert isinstance(atk.name, str)


def test_apgd_iterations_until_success(model, batch):
    x, _ = batch
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 10                               # misclassified at x: not attacked
    out = APGD(model, 0.2, steps=8, restarts=2).run(x, y, record=True)
    assert out.iterations[0] == 0
    # curve[t] = not yet successful after t iterations (cumulative): count the True entries for t < steps
    first = out.curves[:, :-1, 1:].long().sum(1)
    assert torch.equal(out.iterations[1:], first.sum(0))


def test_attacks_reduce_accuracy_at_large_eps(model, batch):
    x, _ = batch
    with torch.no_grad():
        y = model(x).argmax(1)
    for atk in (APGD(model, 0.3, steps=5), APGDT(model, 0.3, steps=5, n_target_classes=2),
                Square(model, 0.3, queries=100)):
        out = atk.run(x, y)
        assert out.correct.float().mean() < 0.5, atk.name


@pytest.mark.parametrize("make", [lambda m: APGD(m, EPS, steps=3), lambda m: APGDT(m, EPS, steps=2),
                                  lambda m: Square(m, EPS, queries=5)])
def test_mode_and_requires_grad_restored(batch, make):
    x, y = batch
    m = tiny_cnn()
    m.train()
    m[1].eval()
    m[0].weight.requires_grad_(False)
    flags = [mod.training for mod in m.modules()]
    grads = [p.requires_grad for p in m.parameters()]
    running = m[1].running_mean.clone()
    make(m)(x, y)
    assert [mod.training for mod in m.modules()] == flags
    assert [p.requires_grad for p in m.parameters()] == grads
    assert torch.equal(m[1].running_mean, running)
    assert all(p.grad is None for p in m.parameters())


class NoGraph(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        assert not torch.is_grad_enabled()
        assert torch.is_inference_mode_enabled()
        self.calls += 1
        return self.inner(x)


def test_square_forward_only_in_inference_mode(model, batch):
    x, y = batch
    m = NoGraph(model)
    out = Square(m, EPS, queries=20, restarts=2).run(x, y)
    assert_invariants(x, out.x_adv, EPS)
    out.x_adv.clone().requires_grad_(True)               # a normal tensor, not an inference tensor
    assert m.calls > 0
    assert Square.uses_gradients is False and Square.stochastic is True


def test_square_queries_and_early_stop(model, batch):
    x, _ = batch
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[:3] = (pred[:3] + 1) % 10                          # misclassified at x: not attacked
    q = 40
    out = Square(model, 0.3, queries=q, restarts=2).run(x, y)
    assert torch.equal(out.x_adv[:3], x[:3])
    assert out.queries[:3].tolist() == [1, 1, 1]
    att = out.queries[3:]
    # 1 clean check + per restart (1 init + iterations); early stop: broken examples use fewer
    assert torch.equal(att, 1 + 2 + out.iterations[3:])
    assert int(att.max()) <= 1 + 2 * (1 + q)
    broken = ~out.correct.any(0)
    assert bool(broken[3:].any())
    assert bool((out.iterations[3:][~out.correct[:, 3:].any(0)] < 2 * q).any())
    assert PGD(model, EPS, EPS / 4, 2).run(x, y).queries is None


def test_curves_and_callbacks(model, batch):
    x, _ = batch
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 10
    for atk, length in ((APGD(model, 0.1, steps=6, restarts=2), 7),
                        (APGDT(model, 0.1, steps=3, n_target_classes=2, restarts=2), 7),
                        (Square(model, 0.1, queries=15, restarts=2), 16)):
        out = atk.run(x, y, record=True)
        assert out.curves.shape == (2, length, 12), atk.name
        assert torch.equal(out.curves[:, -1], out.correct)
        assert not bool(out.curves[:, :, 0].any())              # misclassified at x
        # the tracked point only gets stronger: correctness never comes back
        assert bool((out.curves[:, 1:] <= out.curves[:, :-1]).all()), atk.name
        seen = []
        atk.run(x, y, restarts=1, callback=lambda r, s, xt, ok: seen.append(s))
        assert seen == list(range(length)), atk.name


# --------------------------------------------------------------------------- seeds
def test_seeds(model, batch):
    x, _ = batch
    with torch.no_grad():
        y = model(x).argmax(1)                           # all attacked
    state = torch.get_rng_state()
    for make in (lambda s: APGD(model, 0.1, steps=3, seed=s), lambda s: Square(model, 0.1, queries=10, seed=s),
                 lambda s: APGDT(model, 0.1, steps=2, n_target_classes=1, seed=s)):
        a, b, c = make(3)(x, y), make(3)(x, y), make(4)(x, y)
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state), "attacks must not touch the global RNG"


def test_example_rng_properties():
    seeds = torch.tensor([0, 1, 2, 2 ** 62, 7])
    rng = ExampleRNG(seeds, restart=0)
    u = rng.uniform((1000,))
    assert u.shape == (5, 1000) and float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.02
    n = rng.normal((4000,), dtype=torch.float64)
    assert abs(float(n.mean())) < 0.1 and abs(float(n.std()) - 1) < 0.1
    r = rng.randint(0, torch.tensor([1, 2, 3, 4, 5]), (200,))
    assert bool((r >= 0).all()) and bool((r < torch.tensor([1, 2, 3, 4, 5])[:, None]).all())
    assert torch.equal(rng.randint(3, 3, (4,)), torch.full((5, 4), 3))
    s = rng.choice_sign((500,))
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    # per-example: the same draw for the same (seed, restart, counter), whatever the batch
    a = ExampleRNG(seeds, 1).uniform((7,), counter=3)
    b = ExampleRNG(seeds.flip(0), 1).uniform((7,), counter=3).flip(0)
    c = ExampleRNG(seeds[2:4], 1).uniform((7,), counter=3)
    assert torch.equal(a, b) and torch.equal(a[2:4], c)
    assert not torch.equal(a, ExampleRNG(seeds, 2).uniform((7,), counter=3))
    assert not torch.equal(a, ExampleRNG(seeds, 1).uniform((7,), counter=4))
    sub = ExampleRNG(seeds, 1).subset(torch.tensor([4, 0]))
    assert torch.equal(sub.uniform((7,), counter=3), a[[4, 0]])


SEEDED = {
    "PGD": lambda m: PGD(m, EPS, EPS / 4, 3, restarts=2),
    "GN": lambda m: GN(m, 0.1, eps=EPS),
    "APGD": lambda m: APGD(m, 0.1, steps=5, restarts=2),
    "APGDT": lambda m: APGDT(m, 0.1, steps=3, n_target_classes=2),
    "Square": lambda m: Square(m, 0.1, queries=25, restarts=2),
}


@pytest.fixture(scope="module")
def seeded_data():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(128, 1, 8, 8, generator=g)
    m = PerExample(mlp(2)).eval()
    with torch.no_grad():
        y = m(x).argmax(1)
    y[::7] = (y[::7] + 1) % 10                            # some misclassified at x
    seeds = torch.randint(0, 2 ** 40, (128,), generator=g)
    return m, x, y, seeds


def _cat(outs):
    return (torch.cat([o.x_adv for o in outs]), torch.cat([o.correct for o in outs], 1),
            None if outs[0].queries is None else torch.cat([o.queries for o in outs]))


@pytest.mark.parametrize("name", list(SEEDED))
def test_example_seeds_batch_independent(seeded_data, name):
    m, x, y, seeds = seeded_data
    atk = SEEDED[name](m)
    gen_state = atk.generator.get_state()
    full = _cat([atk.run(x, y, example_seeds=seeds)])
    assert torch.equal(atk.generator.get_state(), gen_state), "generator untouched with example_seeds"
    split = _cat([atk.run(x[i:i + 50], y[i:i + 50], example_seeds=seeds[i:i + 50]) for i in range(0, 128, 50)])
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    inv = torch.argsort(perm)
    out_p = atk.run(x[perm], y[perm], example_seeds=seeds[perm])
    permuted = (out_p.x_adv[inv], out_p.correct[:, inv], None if out_p.queries is None else out_p.queries[inv])
    for a, b in ((full, split), (full, permuted)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        if a[2] is not None:
            assert torch.equal(a[2], b[2])
    other = atk.run(x, y, example_seeds=seeds + 1).x_adv
    assert not torch.equal(other, full[0])
    assert_invariants(x, full[0], atk.eps)


def test_example_seeds_validation(model, batch):
    x, y = batch
    atk = PGD(model, EPS, EPS / 4, 1)
    with pytest.raises(ValueError, match="shape"):
        atk.run(x, y, example_seeds=torch.arange(3))
    with pytest.raises(ValueError, match=">= 0"):
        atk.run(x, y, example_seeds=-torch.ones(12, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        atk.run(x, y, example_seeds=torch.zeros(12))


# --------------------------------------------------------------------------- losses / temperature
def _pgd_reference(model, x, y, eps, alpha, steps, loss_fn):
    x_t = x.clone()
    for _ in range(steps):
        xg = x_t.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(model(xg)).sum(), xg)
        x_t = torch.min(torch.max(x_t + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_t


def _dlr(z, y):
    zs, ind = z.sort(1)
    top_is_y = (ind[:, -1] == y).float()
    u = torch.arange(z.shape[0])
    return -(z[u, y] - zs[:, -2] * top_is_y - zs[:, -1] * (1 - top_is_y)) / (zs[:, -1] - zs[:, -3] + 1e-12)


def test_pgd_losses_and_temperature_match_formula(model, batch):
    x, y = batch
    alpha = 2 / 255

    def cw(z):
        other = z.masked_fill(F.one_hot(y, 10).bool(), -float("inf")).max(1)[0]
        return other - z.gather(1, y[:, None])[:, 0]

    cases = [("ce", 3.0, lambda z: F.cross_entropy(z / 3.0, y, reduction="none")),
             ("cw", 1.0, cw),
             ("dlr", 1.0, lambda z: _dlr(z, y))]
    for loss, temp, fn in cases:
        got = PGD(model, EPS, alpha, 3, random_start=False, loss=loss, temperature=temp)(x, y)
        assert torch.allclose(got, _pgd_reference(model, x, y, EPS, alpha, 3, fn), atol=1e-7), loss
    # T = 1 and loss="ce" are today's PGD, bit for bit
    assert torch.equal(PGD(model, EPS, alpha, 3, seed=2, temperature=1.0, loss="ce")(x, y),
                       PGD(model, EPS, alpha, 3, seed=2)(x, y))
    with pytest.raises(ValueError, match="loss"):
        PGD(model, EPS, alpha, 3, loss="hinge")
    with pytest.raises(ValueError, match="temperature"):
        APGD(model, EPS, temperature=0.0)


# --------------------------------------------------------------------------- against the references
@pytest.fixture(scope="module")
def digits_model():
    data = pytest.importorskip("bitkern.data", reason="bitkern.data not importable")
    pytest.importorskip("sklearn", reason="sklearn needed for the digits data set")
    xtr, ytr = data.load_dataset("digits", None, "train")
    xte, yte = data.load_dataset("digits", None, "test")
    m = tiny_cnn(0)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    m.train()
    for _ in range(8):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(m(xtr[b]), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    x, y = xte[:100], yte[:100]
    with torch.no_grad():
        clean = m(x).argmax(1) == y
    assert clean.float().mean() > 0.85
    return m, x, y, clean


DIGITS_EPS = 16 / 255


def _robust_acc(m, x, y, clean, x_adv):
    with torch.no_grad():
        return 100.0 * float(((m(x_adv).argmax(1) == y) & clean).float().mean())


def _torchattacks():
    return pytest.importorskip("torchattacks", reason="torchattacks not installed")


def test_apgd_vs_torchattacks_and_pgd(digits_model):
    """Same seed, same starting points: bitkern APGD-CE follows torchattacks' APGD (= auto-attack) step by
    step; its robust accuracy is at most the reference's + 1 pp and at most PGD-20's + 1 pp."""
    ta = _torchattacks()
    m, x, y, clean = digits_model
    eps = DIGITS_EPS
    ours = APGD(m, eps, steps=50, seed=0)(x, y)
    with torch.random.fork_rng():
        ref = ta.APGD(m, eps=eps, steps=50, n_restarts=1, seed=0, loss="ce")(x, y)
    acc = {"clean": 100.0 * float(clean.float().mean()),
           "pgd20": _robust_acc(m, x, y, clean, PGD(m, eps, eps / 4, 20)(x, y)),
           "apgd": _robust_acc(m, x, y, clean, ours), "ta_apgd": _robust_acc(m, x, y, clean, ref)}
    print(acc)
    assert acc["pgd20"] < acc["clean"] - 5, acc       # the budget actually bites
    assert acc["apgd"] <= acc["ta_apgd"] + 1, acc
    assert acc["apgd"] <= acc["pgd20"] + 1, acc
    with torch.no_grad():
        ours_ok, ref_ok = m(ours).argmax(1) == y, m(ref).argmax(1) == y
    assert torch.equal(ours_ok, ref_ok)
    broken = ~ref_ok & clean
    assert bool(broken.any())
    assert torch.allclose(ours[broken], ref[broken], atol=1e-6)


def test_square_vs_torchattacks(digits_model):
    """bitkern Square (per-example squares) vs torchattacks' Square (batch-shared squares), 1000 queries."""
    ta = _torchattacks()
    m, x, y, clean = digits_model
    eps = DIGITS_EPS
    out = Square(m, eps, queries=1000).run(x, y)
    acc = {"square": _robust_acc(m, x, y, clean, out.x_adv)}
    with torch.random.fork_rng():
        acc["ta_square"] = _robust_acc(m, x, y, clean, ta.Square(m, eps=eps, n_queries=1000)(x, y))
    print(acc)
    assert acc["square"] <= acc["ta_square"] + 1, acc
    assert int(out.queries.max()) <= 1002
