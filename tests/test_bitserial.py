"""bitkern.bitserial: exact bit-serial conv, AND-popcount identity, accelerator model."""
import numpy as np
import pytest
import torch

from bitkern.bitserial import (Accelerator, and_popcount_conv2d, bit_planes, bitserial_conv2d, compare_networks,
                               simulate_network)
from bitkern.bops import count
from bitkern.models import create
from python_ref.bitserial_ref import integer_conv2d_ref, twos_complement_value_ref


@pytest.mark.parametrize("seed", range(6))
def test_bitserial_exact_random(seed):
    gen = torch.Generator().manual_seed(seed)
    a_bits, w_bits = (int(v) for v in torch.randint(1, 9, (2,), generator=gen))
    c, co = (int(v) for v in torch.randint(1, 70, (2,), generator=gen))
    kh, kw = (int(v) for v in torch.randint(1, 4, (2,), generator=gen))
    stride, padding = (seed % 2 + 1, 1), (seed % 3, 1)
    a = torch.randint(0, 1 << a_bits, (2, c, 6, 5), generator=gen)
    w = torch.randint(-(1 << (w_bits - 1)), 1 << (w_bits - 1), (co, c, kh, kw), generator=gen)
    out = bitserial_conv2d(a, w, a_bits, w_bits, stride, padding, check=False)
    ref = integer_conv2d_ref(a.numpy(), w.numpy(), stride, padding)
    np.testing.assert_array_equal(out.numpy(), ref)


def test_extreme_values_and_planes():
    a = torch.full((1, 3, 4, 4), 255)
    w = torch.full((2, 3, 3, 3), -128)
    out = bitserial_conv2d(a, w, 8, 8, 1, 1)  # check=True compares with the integer conv
    assert int(out.min()) == 255 * -128 * 27
    w4 = torch.tensor([-8, -1, 0, 7]).reshape(4, 1, 1, 1)
    np.testing.assert_array_equal(twos_complement_value_ref([p.numpy() for p in bit_planes(w4, 4)]), w4.numpy())


def test_and_popcount_with_padding():
    gen = torch.Generator().manual_seed(7)
    a = torch.randint(0, 2, (2, 65, 5, 5), generator=gen).float()
    w = torch.randint(0, 2, (3, 65, 3, 3), generator=gen).float()
    got = and_popcount_conv2d(a, w, 2, 1)
    np.testing.assert_array_equal(got.numpy(), integer_conv2d_ref(a.numpy(), w.numpy(), 2, 1))


def test_bad_inputs():
    with pytest.raises(ValueError, match="a_bits"):
        bitserial_conv2d(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 1, 1), 9, 2)
    with pytest.raises(ValueError, match=r"w: values must lie in \[-2, 1\]"):
        bitserial_conv2d(torch.zeros(1, 1, 3, 3), torch.full((1, 1, 1, 1), 2), 2, 2)
    with pytest.raises(ValueError, match="a: values"):
        bitserial_conv2d(torch.full((1, 1, 3, 3), -1), torch.zeros(1, 1, 1, 1), 2, 2)
    with pytest.raises(ValueError, match="serial"):
        Accelerator(serial="nope")


def test_simulator_counts_and_modes():
    model = create("resnet20", "pact-w2a2")
    sim = simulate_network(model, accel=Accelerator(pes=4, lanes=64), verify=True)
    assert sim.bit_ops == count(model).total
    body = [r for r in sim.layers if r.kind == "fixed"]
    assert all(r.serial_steps == 4 and r.cycles == -(-r.macs * 4 // 256) for r in body)
    weights_only = simulate_network(model, accel=Accelerator(pes=4, lanes=64, serial="weights"))
    assert weights_only.cycles < sim.cycles
    assert "total" in sim.table() and sim.to_dict()["bit_ops"] == sim.bit_ops


def test_compare_pact2_mbn3x1_xnor():
    comp = compare_networks("resnet20", ("pact-w2a2", "mbn3x1", "xnor"), accel=Accelerator(pes=8, lanes=128))
    cycles = {k: r.cycles for k, r in comp.reports.items()}
    assert cycles["xnor"] < cycles["mbn3x1"] < cycles["pact-w2a2"]
    mbn = comp.reports["mbn3x1"]
    assert all(r.serial_steps == 1 for r in mbn.layers if r.kind == "mbn")
    assert "mbn3x1" in comp.table()
