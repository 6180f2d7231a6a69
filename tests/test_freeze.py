"""bitkern.freeze: packed inference models give the same logits, keep input gradients, save/load safetensors."""
import json

import pytest
import torch

from bitkern.freeze import PackedMBNConv2d, freeze, load_frozen, state_dict_bytes
from bitkern.models import create


def _trained_like(spec):
    torch.manual_seed(0)
    model = create("resnet20", spec, num_classes=10)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 16, 16))  # non-trivial BN running statistics
    return model.eval()


@pytest.mark.parametrize("spec", ["mbn3x1", "xnor", "mbn2x3"])
def test_frozen_same_logits_and_roundtrip(spec, tmp_path):
    model = _trained_like(spec)
    x = torch.rand(4, 3, 16, 16)
    frozen = freeze(model)
    packed = [m for m in frozen.modules() if isinstance(m, PackedMBNConv2d)]
    assert len(packed) == 18
    assert all(m.w_packed.dtype == torch.int64 and not list(m.parameters()) for m in packed)
    with torch.no_grad():
        expected, got = model(x), frozen(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    path = tmp_path / "model.safetensors"
    frozen.save(path)
    loaded = load_frozen(path)
    assert (loaded.arch, loaded.quant, loaded.num_classes) == ("resnet20", spec, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), got, rtol=0, atol=0)
    assert path.stat().st_size < state_dict_bytes(model) / 4


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_frozen_input_gradients_match(fuse):
    model = _trained_like("mbn3x1")
    frozen = freeze(model, fuse=fuse)
    x1 = torch.rand(2, 3, 16, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(model(x1), torch.tensor([1, 2])).backward()
    torch.nn.functional.cross_entropy(frozen(x2), torch.tensor([1, 2])).backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-6)
    if fuse:  # BN folded into alpha / bias: the same values up to float32 rounding of another sum order
        torch.testing.assert_close(frozen.forward_features(x2), model.forward_features(x1), rtol=1e-5, atol=1e-6)
    else:  # same +-1 bits, same op, same BN: bit-identical
        assert torch.equal(frozen.forward_features(x2), model.forward_features(x1))


def test_freeze_pruned_and_fp_models(tmp_path):
    model = _trained_like("prune-weight-50")
    frozen = freeze(model)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x))
    frozen.save(tmp_path / "p.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(load_frozen(tmp_path / "p.safetensors")(x), model(x))
    assert hasattr(model.stem[0], "weight_mask")  # the original keeps its masks


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="bitkern metadata"):
        load_frozen(path)
    with pytest.raises(TypeError, match="model"):
        freeze("resnet20")


def _with_random_bn(model):
    """Non-trivial BN affine parameters (negative gammas too) and running statistics."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(-1.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 16, 16))
    return model.eval()


@pytest.mark.parametrize("spec", ["xnor", "mbn3x1"])
def test_fused_frozen_resnet20_logits_and_input_grads(spec):
    """BN after every packed conv folded into alpha / bias; act1 (feeds conv2 only) fused as conv1's
    clamp; the residual add and act2 fused into conv2's epilogue (ResidualFusedBlock). Tolerance: the BN
    is now inside the sum (float32 rounding of a different order, ~1e-7 relative); predictions identical."""
    from bitkern.freeze import ResidualFusedBlock
    from bitkern.models.resnet import BasicBlock
    model = _with_random_bn(_trained_like(spec))
    frozen = freeze(model)
    assert frozen.meta["fused"] is True
    assert not any(isinstance(m, BasicBlock) for m in frozen.modules())
    blocks = [m for m in frozen.modules() if isinstance(m, ResidualFusedBlock)]
    assert len(blocks) == 9
    for block in blocks:
        assert isinstance(block.bn1, torch.nn.Identity) and isinstance(block.act1, torch.nn.Identity)
        assert isinstance(block.bn2, torch.nn.Identity) and isinstance(block.act2, torch.nn.Identity)
        assert block.conv1.clamp == (-1.0, 1.0) and block.conv2.clamp == (-1.0, 1.0)
        assert block.conv1.alpha.shape == (block.conv1.M, block.conv1.out_channels)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules()) == 1  # the fp stem's
    x1 = torch.rand(8, 3, 16, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    expected, got = model(x1), frozen(x2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    labels = torch.arange(8) % 10
    torch.nn.functional.cross_entropy(expected, labels).backward()
    torch.nn.functional.cross_entropy(got, labels).backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(frozen.forward_features(x1.detach()), model.forward_features(x1.detach()),
                               rtol=1e-4, atol=1e-4)
    assert frozen.fc is frozen.net.fc


def test_fused_frozen_roundtrip_unfused_files_and_old_versions(tmp_path):
    from safetensors.torch import load_file, save_file
    model = _with_random_bn(_trained_like("mbn3x1"))
    x = torch.rand(4, 3, 16, 16)
    fused = freeze(model)
    fused.save(tmp_path / "fused.safetensors")
    loaded = load_frozen(tmp_path / "fused.safetensors")
    assert loaded.meta["fused"] is True and loaded.meta["version"] == 3
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))
    # An unfused file (BN kept) loads and is fused on load.
    unfused = freeze(model, fuse=False)
    unfused.save(tmp_path / "unfused.safetensors")
    old = load_frozen(tmp_path / "unfused.safetensors")
    assert old.meta["fused"] is True
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in old.modules()) == 1
    with torch.no_grad():
        torch.testing.assert_close(old(x), fused(x), rtol=0, atol=0)
    assert set(load_file(str(tmp_path / "fused.safetensors"))) == set(fused.state_dict())
    # v1 / v2 files (written before the content hash) carry no hash: refused, with how to re-create them.
    for version in (1, 2):
        path = tmp_path / f"v{version}.safetensors"
        meta = {k: v for k, v in unfused.meta.items() if k != "fused" or version == 2}
        meta["version"] = version
        save_file(unfused.state_dict(), str(path), metadata={"bitkern": json.dumps(meta)})
        with pytest.raises(ValueError, match=f"v{version}.safetensors: frozen format v{version}.*re-create"):
            load_frozen(path)


def test_freeze_fuse_argument_checked():
    with pytest.raises(TypeError, match="fuse"):
        freeze(_trained_like("xnor"), fuse="yes")


def test_fusion_follows_declared_chains_not_block_names():
    """The fusion pass knows no block class: a module declares its (conv, bn, act) chains and may offer a
    fused replacement of itself through fuse_residual()."""
    from bitkern.nn import MBNConv2d, PackedMBNConv2d

    class Block(torch.nn.Module):
        fusion_chains = (("conv", "bn", "act"),)

        def __init__(self):
            super().__init__()
            self.conv = MBNConv2d(3, 4, 3, padding=1, M=2, N=1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.act = torch.nn.Hardtanh()
            self.head = torch.nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.act(self.bn(self.conv(x))))

    class Undeclared(Block):
        fusion_chains = ()

    torch.manual_seed(3)
    x = torch.rand(2, 3, 6, 6)
    for cls, folded in ((Block, True), (Undeclared, False)):
        model = cls()
        model.train()
        with torch.no_grad():
            model(torch.rand(8, 3, 6, 6))
        model.eval()
        frozen = freeze(model)
        assert isinstance(frozen.net.conv, PackedMBNConv2d)
        assert isinstance(frozen.net.bn, torch.nn.Identity) is folded
        assert isinstance(frozen.net.act, torch.nn.Identity) is folded
        with torch.no_grad():
            torch.testing.assert_close(frozen(x), model(x), rtol=1e-4, atol=1e-4)
