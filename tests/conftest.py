"""Shared fixtures: every CPU backend / ISA path the machine has, so each test runs on all of them."""
import os

import pytest
import torch

from bitkern import dispatch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _cpu_backend_params():
    params = [pytest.param(("torch", None), id="torch")]
    cpp = dispatch.get("cpp")
    isas = cpp.isa_supported() if cpp.available else []
    for isa in ("avx512", "avx2", "scalar"):
        reason = (f"cpp backend unavailable: {cpp.reason}" if not cpp.available
                  else f"this CPU lacks {isa}")
        params.append(pytest.param(("cpp", isa), id=f"cpp-{isa}",
                                   marks=[] if isa in isas else pytest.mark.skip(reason=reason)))
    return params


@pytest.fixture(params=_cpu_backend_params())
def cpu_backend(request):
    """Force one backend (and, for cpp, one ISA path) for the duration of a test."""
    name, isa = request.param
    dispatch.set_backend(name)
    if isa is not None:
        dispatch.set_isa(isa)
    yield name, isa
    dispatch.set_backend(None)
    if isa is not None:
        dispatch.set_isa(None)
