"""Every registered backend, and every CPU ISA path, against python_ref and hence each other, bit for bit
(tests/conformance.py holds the checks). The Triton backend runs in its interpreter on CPU tensors; a
backend that cannot run here (CUDA without a GPU) is skipped with its reason."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (kernels decorate at import)

from bitkern import dispatch  # noqa: E402
from bitkern.backends import registry  # noqa: E402

import conformance  # noqa: E402


def _targets():
    """(backend name, ISA or None) for every registered backend; the cpp backend once per ISA path."""
    params = []
    for name in registry.names():
        if name == "cpp":
            cpp = dispatch.get("cpp")
            supported = cpp.isa_supported() if cpp.available else []
            for isa in ("avx512", "avx2", "scalar"):
                why = f"cpp backend unavailable: {cpp.reason}" if not cpp.available else f"this CPU lacks {isa}"
                params.append(pytest.param((name, isa), id=f"cpp-{isa}",
                                           marks=[] if isa in supported else pytest.mark.skip(reason=why)))
        else:
            params.append(pytest.param((name, None), id=name))
    return params


@pytest.fixture(params=_targets())
def backend(request):
    name, isa = request.param
    backend = dispatch.get(name)
    if not (backend.available and backend.supports("cpu")):
        pytest.skip(f"{name} backend cannot run on CPU tensors here: {backend.reason}")
    if isa is not None:
        dispatch.set_isa(isa)
    yield backend
    if isa is not None:
        dispatch.set_isa(None)


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda f: f.__name__[len("check_"):])
def test_conformance(backend, check):
    if backend.name == "triton" and "shapes" in check.__code__.co_varnames:
        check(backend, shapes=conformance.SMALL_SHAPES)
    else:
        check(backend)
