"""Plain numpy references for bitkern's kernels: written to be obviously right, not fast."""
from .ops_ref import (  # noqa: F401
    binary_conv2d_ref,
    hv_sign,
    mbn_conv2d_grads_ref,
    mbn_conv2d_ref,
    pack_signs_ref,
    sign,
    unpack_signs_ref,
)
