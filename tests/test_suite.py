"""bitkern.eval.standard_suite: worst case over APGD-CE -> APGD-T -> Square, per-example seeds
(verdicts independent of batch size, order and sharding), masking flags, robustness/sweep/CLI wiring."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from bitkern import freeze
from bitkern.attacks import PGD
from bitkern.data import load_dataset
from bitkern.eval import SuiteResult, example_seeds, robustness, standard_attacks, standard_suite
from bitkern.eval.suite import CLEAN_ERROR, NOT_BROKEN
from bitkern.models import create
from bitkern.train import fit

EPS = 16 / 255          # one digits grey level: accuracy falls clearly here
QUICK = {"apgd_steps": 20, "n_target_classes": 3, "square_queries": 300}
N = 96


def _trained(quant, epochs):
    x, y = load_dataset("digits", None, "train")
    torch.manual_seed(0)
    model = create("resnet20", quant, num_classes=10, in_channels=1)
    fit(model, (x, y), epochs=epochs, batch_size=64, lr=2e-3, optimizer="adam", progress=False, seed=0)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """8x8 digits: torch's intra-op threads only add overhead (and stall on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def test_data():
    x, y = load_dataset("digits", None, "test")
    return x[:N], y[:N]


@pytest.fixture(scope="module")
def fp_model():
    return _trained("fp", 3)


@pytest.fixture(scope="module")
def frozen_mbn():
    return freeze(_trained("mbn3x1", 2))


@pytest.fixture(scope="module")
def fp_suite(fp_model, test_data):
    return standard_suite(fp_model, test_data, EPS, progress=False, **QUICK)


def test_suite_records_and_is_worst_case(fp_suite):
    res = fp_suite
    assert res.attacks == ["APGD-CE", "APGD-T", "Square"] and res.n_examples == N
    clean = res.clean_correct
    assert ((res.broken_by == CLEAN_ERROR) == ~clean).all()
    after = res.accuracy_after()
    values = list(after.values())
    assert values == sorted(values, reverse=True) and values[-1] == pytest.approx(res.robust_acc)
    assert res.robust_acc <= res.clean_acc
    # each attack ran exactly on the examples every earlier attack (and the clean check) failed on
    alive = int(clean.sum())
    for k, name in enumerate(res.attacks):
        assert res.attacked[name]["ran_on"] == alive
        alive -= res.attacked[name]["broke"]
        assert res.attacked[name]["broke"] == int((res.broken_by == k + 1).sum())
    assert alive == int((res.broken_by == NOT_BROKEN).sum())
    # Square reports the queries it spent on the examples it broke
    square = res.broken_by == 3
    assert (res.cost[square] >= 1).all() and (res.cost[square] <= QUICK["square_queries"]).all()
    d = res.to_dict()
    assert d["schema"] == "bitkern.suite/1" and d["masking"]["verdict"] in ("no sign of masking",
                                                                            "gradient masking suspected")
    json.dumps(d)


def test_suite_no_weaker_than_pgd(fp_model, test_data, fp_suite):
    res = fp_suite
    pgd = robustness(fp_model, test_data, {"PGD-20": PGD(fp_model, EPS, EPS / 4, 20)}, restarts=2,
                     progress=False, sanity=False)
    assert pgd.attacks["PGD-20"]["worst"] < res.clean_acc - 5     # the budget matters on this model
    assert res.robust_acc <= pgd.attacks["PGD-20"]["worst"] + 100 / N


def test_suite_no_weaker_than_torchattacks(fp_model, test_data):
    ta = pytest.importorskip("torchattacks", reason="torchattacks 3.5.1 (pip install --no-deps) not installed")
    x, y = test_data
    steps, queries = 50, 500
    res = standard_suite(fp_model, test_data, EPS, progress=False, apgd_steps=steps, n_target_classes=3,
                         square_queries=queries)

    def robust(atk):
        x_adv = atk(x, y)
        with torch.no_grad():
            return float(((fp_model(x_adv).argmax(1) == y) & (fp_model(x).argmax(1) == y)).float().mean() * 100)

    apgd = robust(ta.APGD(fp_model, eps=EPS, steps=steps, loss="ce", seed=0))
    square = robust(ta.Square(fp_model, eps=EPS, n_queries=queries, seed=0))
    assert res.robust_acc <= apgd + 1.0
    assert res.robust_acc <= square + 1.0


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_verdicts_do_not_depend_on_batch_size_order_or_shards(frozen_mbn, test_data, backend):
    from bitkern import dispatch

    dispatch.set_backend(backend)
    try:
        x, y = test_data
        a = standard_suite(frozen_mbn, (x, y), EPS, batch_size=128, progress=False, **QUICK)
        b = standard_suite(frozen_mbn, (x, y), EPS, batch_size=50, progress=False, **QUICK)
        assert (a.broken_by == b.broken_by).all() and (a.cost == b.cost).all()
        half = N // 2
        shards = [standard_suite(frozen_mbn, (x[:half], y[:half]), EPS, batch_size=32, progress=False, **QUICK),
                  standard_suite(frozen_mbn, (x[half:], y[half:]), EPS, batch_size=32, index_offset=half,
                                 progress=False, **QUICK)]
        merged = SuiteResult.combine(shards)
        assert (merged.broken_by == a.broken_by).all() and merged.robust_acc == a.robust_acc
        assert merged.masking["count"] == a.masking["count"]
    finally:
        dispatch.set_backend(None)


class _Quantized(nn.Module):
    """Rounds its input to 1/16 steps: exactly zero input gradient (textbook masking), easy to break."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 16) / 16)


def test_masking_flag_on_a_zero_gradient_model(fp_model, test_data):
    model = _Quantized(fp_model).eval()
    res = robustness(model, test_data, {"PGD-20": PGD(model, EPS, EPS / 4, 20)}, restarts=1, progress=False,
                     sanity=True, sanity_examples=32, suite="standard", suite_options=QUICK)
    s = res.suite
    # zero gradients: APGD moves only through its random start, Square breaks what it left
    assert s.attacked["APGD-CE"]["broke"] + s.attacked["APGD-T"]["broke"] < s.attacked["Square"]["broke"]
    assert s.masking["verdict"] == "gradient masking suspected" and s.masking["count"] > 0
    checks = {c["name"]: c for c in res.sanity["checks"]}
    assert checks["gradient_free_vs_whitebox"]["passed"] is False
    assert "gradient_free_vs_whitebox" in res.sanity["violations"]
    per_layer = checks["subset:zero_input_gradient"]["numbers"]["per_layer_class"]
    assert per_layer and all(0.0 <= v <= 1.0 for v in per_layer.values())
    assert "subset:pgd_vs_pgd_plus_plus" in checks
    d = res.to_dict()
    assert d["suite"]["masking"]["count"] == s.masking["count"]


def test_robustness_suite_files_and_combine(fp_model, test_data, tmp_path):
    x, y = test_data
    parts = [robustness(fp_model, (x[i:i + 48], y[i:i + 48]), {"PGD-5": PGD(fp_model, EPS, EPS / 4, 5)},
                        restarts=1, progress=False, sanity=False, suite="standard", suite_options=QUICK)
             for i in (0, 48)]
    merged = type(parts[0]).combine(parts)
    assert merged.suite.n_examples == N
    paths = merged.save(tmp_path / "r")
    with np.load(paths["npz"]) as z:
        assert z["suite_broken_by"].shape == (N,)
    assert "Standard suite at eps 16/255" in open(paths["md"]).read()
    with pytest.raises(ValueError, match="suite"):
        robustness(fp_model, test_data, [], suite="nope")
    with pytest.raises(ValueError, match="eps"):
        robustness(fp_model, test_data, [], suite="standard")


def test_example_seeds_are_stable_and_distinct():
    a = example_seeds(0, np.arange(1000), "Square")
    assert a.dtype == torch.int64 and (a >= 0).all() and len(set(a.tolist())) == 1000
    assert torch.equal(example_seeds(0, np.arange(10, 20), "Square"), a[10:20])
    assert not torch.equal(example_seeds(1, np.arange(1000), "Square"), a)
    assert not torch.equal(example_seeds(0, np.arange(1000), "APGD-CE"), a)


def test_suite_argument_checks(fp_model, test_data):
    with pytest.raises(ValueError, match="exceeds 1"):
        standard_suite(fp_model, test_data, 8, progress=False)
    other = _trained("fp", 1)
    with pytest.raises(ValueError, match="different model"):
        standard_suite(fp_model, test_data, EPS, attacks=standard_attacks(other, EPS), progress=False)
    res = standard_suite(fp_model, test_data, 0, progress=False)
    assert res.robust_acc == res.clean_acc
