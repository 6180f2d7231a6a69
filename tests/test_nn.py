"""bitkern.nn layers against python_ref and direct formulas; STE gradients; pruning masks."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from bitkern import ops
from bitkern.nn import (MBNConv2d, MBNLinear, QConv2d, QLinear, XNORConv2d, XNORLinear, prune_channels_l1,
                        prune_magnitude)
from bitkern.nn.binary import activation_shifts
from bitkern.nn.fixed import dorefa_weight, pact_quantize
from python_ref.layers_ref import dorefa_weight_ref, lstsq_alpha_ref, mbn_layer_ref, pact_ref, weight_bases_ref
from python_ref.ops_ref import mbn_conv2d_ref


@pytest.mark.parametrize("M,N,per_channel", [(1, 1, True), (3, 1, True), (2, 3, False), (5, 2, True)])
def test_mbn_conv_matches_reference(M, N, per_channel):
    torch.manual_seed(M * 10 + N)
    layer = MBNConv2d(5, 4, 3, stride=2, padding=1, M=M, N=N, per_channel=per_channel)
    x = torch.randn(2, 5, 7, 6)
    out = layer(x)
    ref = mbn_layer_ref(x.numpy(), layer.weight.detach().numpy(), M, layer.alpha.detach().numpy(),
                        layer.v.detach().numpy(), layer.beta.detach().numpy(), 2, 1, per_channel)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per_channel", [True, False])
def test_alpha_is_least_squares(per_channel):
    torch.manual_seed(1)
    layer = MBNConv2d(6, 3, 3, M=3, per_channel=per_channel)
    w = layer.weight.detach().numpy()
    expected = lstsq_alpha_ref(w, weight_bases_ref(w, 3, per_channel), per_channel)
    np.testing.assert_allclose(layer.alpha.detach().numpy(), expected, rtol=1e-4, atol=1e-6)
    assert layer.alpha.shape == ((3, 3) if per_channel else (3,))


def test_initial_shifts_and_scales():
    layer = MBNConv2d(4, 4, 3, M=3, N=3)
    assert torch.equal(layer.u, torch.tensor([-1.0, 0.0, 1.0]))
    assert len(set(layer.v.tolist())) == 3
    assert torch.allclose(layer.beta, torch.full((3,), 1 / 3))
    assert torch.allclose(activation_shifts(1), torch.tensor([0.5]))


def test_mbn_ste_weight_gradient_flows_through_bases():
    torch.manual_seed(2)
    layer = MBNConv2d(3, 4, 3, padding=1, M=3, N=2)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    g = torch.randn(2, 4, 5, 5)
    (layer(x) * g).sum().backward()
    bases = layer.bases().detach().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (ops.mbn_conv2d(x2, bases, layer.alpha.detach(), layer.v.detach(), layer.beta.detach(), 1, 1) * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, bases.grad.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad)
    assert layer.alpha.grad.abs().sum() > 0 and layer.v.grad.abs().sum() > 0 and layer.beta.grad.abs().sum() > 0


def test_alpha_beta_gradcheck():
    """out is linear in alpha and beta: the exact gradient matches finite differences."""
    torch.manual_seed(3)
    layer = MBNConv2d(3, 2, 3, M=2, N=2)
    x = torch.randn(1, 3, 4, 4)
    bases, v = layer.bases().detach(), layer.v.detach()

    def f(alpha, beta):
        return ops.mbn_conv2d(x, bases, alpha, v, beta, 1, 0)
    alpha = layer.alpha.detach().clone().requires_grad_()
    beta = layer.beta.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (alpha, beta), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_xnor_conv_and_linears():
    torch.manual_seed(4)
    conv = XNORConv2d(4, 3, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    scale = conv.weight.abs().mean(dim=(1, 2, 3)).reshape(1, -1, 1, 1)
    expected = scale * F.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(conv.weight >= 0, 1.0, -1.0), padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)

    lin = XNORLinear(7, 3)
    z = torch.randn(5, 7)
    exp = F.linear(torch.where(z >= 0, 1.0, -1.0), torch.where(lin.weight >= 0, 1.0, -1.0)) * lin.weight.abs().mean(1)
    torch.testing.assert_close(lin(z), exp, rtol=1e-5, atol=1e-5)

    mlin = MBNLinear(7, 3, M=3, N=2)
    w = mlin.bases().detach()[..., None, None]
    exp = mbn_conv2d_ref(z[:, :, None, None].numpy(), w.numpy(), mlin.alpha.detach().numpy(), mlin.v.detach().numpy(),
                         mlin.beta.detach().numpy())
    np.testing.assert_allclose(mlin(z).detach().numpy(), exp.reshape(5, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w_bits,a_bits", [(1, 1), (2, 2), (4, 4), (2, 4), (8, 8)])
def test_qconv_matches_reference(w_bits, a_bits):
    torch.manual_seed(w_bits + a_bits)
    layer = QConv2d(3, 4, 3, padding=1, w_bits=w_bits, a_bits=a_bits, pact_init=2.0)
    x = torch.randn(2, 3, 5, 5) * 2
    expected = F.conv2d(torch.tensor(pact_ref(x.numpy(), 2.0, a_bits), dtype=torch.float32),
                        torch.tensor(dorefa_weight_ref(layer.weight.detach().numpy(), w_bits), dtype=torch.float32),
                        padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    lin = QLinear(6, 2, w_bits=w_bits, a_bits=a_bits)
    assert lin(torch.rand(3, 6)).shape == (3, 2)


def test_pact_gradients():
    x = torch.tensor([-1.0, 0.3, 0.9, 2.5, 4.0], requires_grad=True)
    clip = torch.tensor(2.0, requires_grad=True)
    pact_quantize(x, clip, 2).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]  # STE inside [0, alpha)
    assert clip.grad.item() == 2.0                          # d/dalpha = 1 where x >= alpha
    w = torch.randn(4, 3, requires_grad=True)
    dorefa_weight(w, 3).sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [0, 9, 2.0, True])
def test_bad_bits_and_bases(bad):
    with pytest.raises(ValueError, match="w_bits"):
        QConv2d(2, 2, 3, w_bits=bad, a_bits=2)
    with pytest.raises(ValueError, match="M"):
        MBNConv2d(2, 2, 3, M=bad)


def test_magnitude_pruning_masks_persist():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2))
    prune_magnitude(model, 0.5)
    for layer in (model[0], model[2]):
        assert int(layer.weight_mask.sum()) == layer.weight_mask.numel() // 2
        kept = layer.weight_orig.abs()[layer.weight_mask.bool()].min()
        assert kept >= layer.weight_orig.abs()[~layer.weight_mask.bool()].max()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 3, 6, 6)).sum().backward()
        opt.step()
    model(torch.randn(1, 3, 6, 6))
    assert bool((model[0].weight[model[0].weight_mask == 0] == 0).all())
    assert "weight_mask" in dict(model[0].named_buffers())


def test_channel_pruning_l1():
    conv = torch.nn.Conv2d(2, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -5.0, 0.5, 3.0]).reshape(4, 1, 1, 1).expand(4, 2, 1, 1))
    prune_channels_l1(torch.nn.Sequential(conv), 0.5)
    assert conv.weight_mask[:, 0, 0, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="ratio"):
        prune_magnitude(conv, 1.5)
