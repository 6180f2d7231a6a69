"""bitkern.quant: the scheme registry. The built-in schemes keep every answer the seven scattered places
gave before; a toy scheme defined and registered only in this file works end to end (models.create,
BOPS, the bit-serial simulator, freeze / load_frozen or a clear refusal, the table label, the recipes)."""
import ast
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bitkern
from bitkern.bitserial import Accelerator, simulate_network
from bitkern.bops import count
from bitkern.models import create
from bitkern.nn import MBNConv2d, PackedMBNConv2d, Precision, QConv2d, XNORConv2d, XNORLinear
from bitkern.quant import (QuantScheme, QuantSpec, accepted_forms, get_scheme, method_columns, parse_quant,
                           register_scheme, scheme_of, schemes, unregister_scheme)
from bitkern.train.recipes import ODGQ

# ------------------------------------------------------------------------------------------ the toy scheme


class SignWeightConv2d(nn.Conv2d):
    """Toy layer: sign(W) * mean|W| weights (straight-through), full-precision activations."""

    @property
    def precision(self):
        return Precision("signw", 1, 8, "fixed")

    def forward(self, x):
        w = self.weight
        signs = torch.where(w >= 0, 1.0, -1.0)
        wq = (w + (signs - w).detach()) * w.abs().mean().detach()
        return F.conv2d(x, wq, self.bias, self.stride, self.padding)


class SignWeights(QuantScheme):
    """Toy scheme "signw": sign-only weights, fp activations (counted at 8 bits). No packed form: freeze
    keeps its layers as they are (like PACT's)."""
    name = "signw"
    forms = '"signw" (toy: sign weights, fp activations)'

    def make_conv(self, spec, in_channels, out_channels, kernel_size, stride=1, padding=0):
        return SignWeightConv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)

    def precision(self, spec):
        return Precision("signw", 1, 8, "fixed")

    def method_name(self, spec):
        return "Sign-W"


class SignWeightsNoFreeze(SignWeights):
    """The same scheme declaring that it cannot be frozen."""
    name = "signw-nofreeze"
    forms = '"signw-nofreeze" (toy)'
    freezable = False


@pytest.fixture
def toy():
    register_scheme(SignWeights)
    register_scheme(SignWeightsNoFreeze)
    yield
    unregister_scheme("signw")
    unregister_scheme("signw-nofreeze")


RESNET20_BODY_MACS = 40_108_032
RESNET20_FP_MACS = 442_368 + 640  # first conv + fc, counted at 8 x 8


def test_toy_scheme_parses_and_labels(toy):
    spec = parse_quant(" SignW ")
    assert spec == QuantSpec("signw") and str(spec) == "signw" and spec.scheme.name == "signw"
    assert not spec.binary
    assert "signw" in accepted_forms()
    with pytest.raises(ValueError, match="accepted.*signw"):
        parse_quant("signw2")
    assert method_columns("signw") == {"method": "Sign-W", "weights": 1, "activations": 8}
    assert ODGQ.lam_for_quant("signw") == 3.0  # not 1-bit activations
    with pytest.raises(ValueError, match="already registered"):
        register_scheme(SignWeights)


def test_toy_scheme_builds_counts_and_simulates(toy):
    torch.manual_seed(0)
    model = create("resnet20", "signw", num_classes=10)
    assert model.quant == "signw" and scheme_of(model)[0].name == "signw"
    body = [m for n, m in model.named_modules() if n.startswith("layers") and isinstance(m, nn.Conv2d)]
    assert len(body) == 18 and all(type(m) is SignWeightConv2d for m in body)
    assert all(type(m) is nn.ReLU for n, m in model.named_modules() if n.endswith("act1"))
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    model(x).sum().backward()
    assert torch.isfinite(x.grad).all() and body[0].weight.grad.abs().sum() > 0

    report = count(model)
    assert all((r.kind, r.w_bits, r.a_bits) == ("signw", 1, 8) for r in report.layers[1:-1])
    assert report.total == RESNET20_BODY_MACS * 8 + 64 * RESNET20_FP_MACS

    sim = simulate_network(model, accel=Accelerator(pes=4, lanes=64), verify=True)
    assert sim.bit_ops == report.total
    assert all(r.serial_steps == 8 for r in sim.layers if r.kind == "signw")  # 1 x 8 bit-serial steps


def test_toy_scheme_freezes_or_refuses(toy, tmp_path):
    torch.manual_seed(0)
    model = create("resnet20", "signw").eval()
    frozen = bitkern.freeze(model)
    assert sum(type(m) is SignWeightConv2d for m in frozen.modules()) == 18  # no packed form: kept
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x))
    frozen.save(tmp_path / "signw.safetensors")
    loaded = bitkern.load_frozen(tmp_path / "signw.safetensors")
    assert loaded.quant == "signw"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), frozen(x), rtol=0, atol=0)

    refused = create("resnet20", "signw-nofreeze")
    with pytest.raises(ValueError, match="'signw-nofreeze'.*no packed inference form"):
        bitkern.freeze(refused)


# ------------------------------------------------------------------------------------- built-in schemes
# What bitkern.sweep.method_columns returned before the registry (Table 2 of paper 000).
OLD_COLUMNS = {
    "fp": {"method": "FP", "weights": 8, "activations": 8},
    "pact-w4a4": {"method": "PACT-4", "weights": 4, "activations": 4},
    "pact-w2a4": {"method": "PACT-2-4", "weights": 2, "activations": 4},
    "xnor": {"method": "XNOR-Net", "weights": 1, "activations": 1},
    "mbn3x1": {"method": "MBN 3x1", "weights": 3, "activations": 1},
    "mbn1x3": {"method": "MBN 1x3", "weights": 1, "activations": 3},
    "prune-weight-50": {"method": "W. Pr. 50%", "weights": 8, "activations": 8},
    "prune-channel-30": {"method": "Ch. Pr. 30%", "weights": 8, "activations": 8},
}


@pytest.mark.parametrize("spec", sorted(OLD_COLUMNS))
def test_builtin_columns_unchanged(spec):
    assert method_columns(spec) == OLD_COLUMNS[spec]


def test_builtin_registry_order_and_lookup():
    assert [s.name for s in schemes()[:6]] == ["fp", "pact", "xnor", "mbn", "prune-weight", "prune-channel"]
    assert get_scheme("mbn3x1") is get_scheme("mbn") is get_scheme(parse_quant("mbn2x2"))
    with pytest.raises(ValueError, match="no scheme"):
        get_scheme(QuantSpec("nope"))
    assert str(QuantSpec("nope")) == "nope"
    assert scheme_of(nn.Linear(2, 2)) is None
    mbn = parse_quant("mbn3x2")
    assert mbn.scheme.precision(mbn) == mbn.precision == Precision("mbn", 3, 2, "binary") and mbn.binary
    assert get_scheme("prune-weight").sparsity(parse_quant("prune-weight-40")) == 0.4


@pytest.mark.parametrize("quant", ["xnor", "pact-w1a1", "mbn1x1", "XNOR", "pact-w1a2", "mbn1x2", "mbn2x1", "fp",
                                   "prune-weight-50", "pact-w4a4", None, "", "bogus"])
def test_recipe_lambda_from_scheme(quant):
    old = 0.003 if (quant or "").lower() in ("xnor", "pact-w1a1", "mbn1x1") else 3.0
    assert ODGQ.lam_for_quant(quant) == old


def test_layers_report_precision():
    assert MBNConv2d(2, 3, 3, M=3, N=2).precision == Precision("mbn", 3, 2, "binary")
    assert XNORConv2d(2, 3, 3).precision == XNORLinear(2, 3).precision == Precision("xnor", 1, 1, "binary")
    assert QConv2d(2, 3, 3, w_bits=2, a_bits=4).precision == Precision("fixed", 2, 4, "fixed")
    packed = MBNConv2d(2, 3, 3, M=3, N=2).to_packed()
    assert isinstance(packed, PackedMBNConv2d) and packed.precision == Precision("mbn", 3, 2, "binary")
    assert XNORLinear(5, 2).to_packed().precision.kind == "xnor"
    with pytest.raises(ValueError, match="arithmetic"):
        Precision("x", 1, 1, "analog")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_layering_of_nn_and_quant():
    """bitkern.nn (L4) imports neither the registry, the models nor freeze; the registry (L5) not freeze,
    bops, bitserial or the models."""
    root = Path(bitkern.__file__).parent
    for path in (root / "nn").glob("*.py"):
        bad = [m for m in _imports(path) if any(k in m for k in ("quant", "models", "freeze", "bops", "train"))]
        assert not bad, f"{path.name} imports {bad}"
    for path in (root / "quant").glob("*.py"):
        bad = [m for m in _imports(path) if any(k in m for k in ("models", "freeze", "bops", "bitserial", "train"))]
        assert not bad, f"{path.name} imports {bad}"
