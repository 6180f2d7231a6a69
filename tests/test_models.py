"""bitkern.models: architectures, quant specs, normalisation, forward_features, clear errors."""
import pytest
import torch
from torch import nn

from bitkern.models import create, parse_quant
from bitkern.nn import MBNConv2d, QConv2d, XNORConv2d

SPECS = ["fp", "pact-w2a4", "xnor", "mbn3x1", "mbn1x3", "prune-weight-50", "prune-channel-50"]


@pytest.mark.parametrize("spec", SPECS)
def test_resnet20_every_spec(spec):
    torch.manual_seed(0)
    model = create("resnet20", spec, num_classes=7)
    assert (model.arch, model.quant, model.num_classes) == ("resnet20", spec, 7)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64)
    logits = model(x)
    torch.testing.assert_close(logits, model.fc(feats))
    logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # first conv and last fc stay full precision
    assert type(model.stem[0]) is nn.Conv2d and type(model.fc) is nn.Linear


def test_layer_types_follow_spec():
    kinds = {"pact-w4a4": QConv2d, "xnor": XNORConv2d, "mbn3x1": MBNConv2d}
    for spec, cls in kinds.items():
        model = create("resnet20", spec)
        body = [m for n, m in model.named_modules() if n.startswith("layers") and isinstance(m, nn.Conv2d)]
        assert len(body) == 18 and all(isinstance(m, cls) for m in body)
    mbn = create("resnet20", "mbn5x2")
    assert all(m.M == 5 and m.N == 2 for m in mbn.modules() if isinstance(m, MBNConv2d))


def test_cifar_depths_and_parameter_free_shortcuts():
    for arch, blocks in [("resnet20", 9), ("resnet32", 15), ("resnet44", 21), ("resnet56", 27)]:
        model = create(arch)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 2 * blocks + 1  # option A: no shortcut convolutions
    # He et al. 2016 report 0.27M parameters for ResNet-20
    params = sum(p.numel() for p in create("resnet20").parameters())
    assert 269_000 < params < 273_000


def test_resnet18_structure_and_small_inputs():
    model = create("resnet18", "mbn3x1", num_classes=5, in_channels=1)
    shortcuts = [m for n, m in model.named_modules() if n.endswith("shortcut.0")]
    assert len(shortcuts) == 3 and all(isinstance(m, MBNConv2d) and m.kernel_size == (1, 1) for m in shortcuts)
    assert model.stem[0].kernel_size == (7, 7)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 5)
    assert create("resnet56", "xnor", in_channels=1)(torch.rand(1, 1, 8, 8)).shape == (1, 10)


def test_normalisation_inside_model():
    model = create("resnet20", mean=(0.1, 0.2, 0.3), std=0.5)
    assert model.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert model.std.flatten().tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="mean"):
        create("resnet20", mean=(0.1, 0.2))


def test_parse_quant_roundtrip():
    for text in ["fp", "xnor", "pact-w4a4", "pact-w2a4", "mbn3x1", "mbn8x8", "prune-weight-50", "prune-channel-30"]:
        assert str(parse_quant(text)) == text
    spec = parse_quant("mbn3x2")
    assert (spec.kind, spec.M, spec.N) == ("mbn", 3, 2)


@pytest.mark.parametrize("bad", ["mbn0x1", "mbn9x1", "pact-w9a2", "pact-w2a0", "int8", "prune-weight-100", ""])
def test_bad_specs_list_accepted_forms(bad):
    with pytest.raises(ValueError, match="accepted"):
        parse_quant(bad)
    with pytest.raises(ValueError, match="accepted"):
        create("resnet20", bad)


def test_bad_arch_and_inputs():
    with pytest.raises(ValueError, match="resnet18"):
        create("vgg16")
    model = create("resnet20")
    with pytest.raises(ValueError, match="x"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="8x8"):
        model(torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="in_channels"):
        create("resnet20", in_channels=0)
