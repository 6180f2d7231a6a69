"""The backend contract from the outside: a toy backend written in this file alone (numpy, on top of
python_ref) registers itself and passes every conformance check, and the ops run on it when it is forced.
That is all a new backend needs: subclass Backend, implement run_pack / run_conv, declare Capabilities,
register."""
import numpy as np
import pytest
import torch

import bitkern
from bitkern import dispatch, ops
from bitkern.backends import registry
from bitkern.backends.base import Backend, Capabilities, ConvArgs, check_conv_args
from python_ref import ops_ref

import conformance


class NumpyBackend(Backend):
    """python_ref's loops behind the contract: slow, obviously right, no fused epilogue."""
    name = "numpy_toy"
    capabilities = Capabilities(devices=("cpu",))
    available = True

    def run_pack(self, x, mode, v):
        bits = x.numpy() if mode == "sign" else ops_ref.hv_sign(x.numpy(), v).astype(np.float32)
        return torch.from_numpy(ops_ref.pack_signs_ref(bits))

    def run_conv(self, a: ConvArgs):
        channels = a.x.shape[1]
        w_bases = np.stack([ops_ref.unpack_signs_ref(a.w_packed[m].numpy(), channels)
                            for m in range(a.num_weight_bases)])
        pairs = ops_ref.mbn_pairs_ref(a.x.numpy(), w_bases, None if a.v is None else a.v.numpy(),
                                      a.stride, a.padding)
        out = None
        if a.want_out:
            out = torch.from_numpy(ops_ref.mbn_epilogue_ref(pairs, a.alpha2d.numpy(), a.beta.numpy()))
        return out, (torch.from_numpy(pairs.astype(np.int32)) if a.want_pairs else None)


@pytest.fixture
def toy():
    registry.register(NumpyBackend.name, NumpyBackend, priority={})  # never chosen unless forced
    yield dispatch.get(NumpyBackend.name)
    registry.unregister(NumpyBackend.name)


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda f: f.__name__[len("check_"):])
def test_toy_backend_passes_conformance(toy, check):
    kwargs = {"shapes": conformance.SMALL_SHAPES} if "shapes" in check.__code__.co_varnames else {}
    check(toy, **kwargs)


def test_toy_backend_runs_the_ops_and_their_gradients(toy):
    c = conformance.case(conformance.SHAPES[2], 7)
    x = c["x"].requires_grad_()
    args = (c["w_bases"], c["alpha2d"][:, 0], c["v"], c["beta"], c["stride"], c["padding"])
    with dispatch.use_backend("torch"):
        expected = ops.mbn_conv2d(x, *args)
        (grad_expected,) = torch.autograd.grad(expected.sum(), x)
    with dispatch.use_backend(toy.name):
        assert dispatch.backend_for("cpu") is toy
        got = ops.mbn_conv2d(x, *args)
        (grad,) = torch.autograd.grad(got.sum(), x)
    assert torch.equal(got, expected) and torch.equal(grad, grad_expected)
    assert toy.name in bitkern.dispatch.backends_status()


def test_registry_order_and_unknown_names(toy):
    assert registry.preference("cpu")[:2] == ("cpp", "torch") or "cpp" not in registry.preference("cpu")
    assert registry.preference("cuda")[:2] == ("cuda", "triton")
    assert toy.name not in registry.preference("cpu")  # no priority: forced only
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        dispatch.set_backend("nope")


def test_validation_is_shared_by_every_backend(toy):
    """One argument check (check_conv_args) for every backend: the same error, whichever is called."""
    c = conformance.case(conformance.SHAPES[1], 3)
    packed = conformance._packed_weights(c)
    bad = (c["x"], packed, 4, c["kernel"], c["alpha2d"], c["v"], c["beta"], c["stride"], c["padding"])
    errors = set()
    for backend in (toy, dispatch.get("torch")):
        with pytest.raises(ValueError) as info:
            backend.mbn_conv2d_packed(*bad)
        errors.add(str(info.value))
    with pytest.raises(ValueError) as info:
        check_conv_args(*bad)
    errors.add(str(info.value))
    assert len(errors) == 1 and "in_channels" in errors.pop()


def test_a_failing_build_is_reported_not_raised():
    def broken():
        raise ImportError("no such library")
    registry.register("broken_toy", broken, priority={"cpu": 100})
    try:
        backend = dispatch.get("broken_toy")
        assert not backend.available and "no such library" in backend.reason
        assert dispatch.backend_for("cpu").name != "broken_toy"  # skipped, despite its rank
    finally:
        registry.unregister("broken_toy")
