"""numpy reference for bitkern.bitserial: integer convolution by loops and bit-plane decomposition."""
import numpy as np


def integer_conv2d_ref(a, w, stride=1, padding=0):
    """Plain integer convolution with zero padding (int64), by loops over taps."""
    s = (stride, stride) if np.isscalar(stride) else tuple(stride)
    p = (padding, padding) if np.isscalar(padding) else tuple(padding)
    a = np.pad(np.asarray(a, dtype=np.int64), ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))
    w = np.asarray(w, dtype=np.int64)
    batch, _, height, width = a.shape
    co, _, kh, kw = w.shape
    oh, ow = (height - kh) // s[0] + 1, (width - kw) // s[1] + 1
    out = np.zeros((batch, co, oh, ow), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = a[:, :, i:i + s[0] * (oh - 1) + 1:s[0], j:j + s[1] * (ow - 1) + 1:s[1]]
            out += np.einsum("bchw,oc->bohw", patch, w[:, :, i, j])
    return out


def twos_complement_value_ref(planes):
    """Rebuild signed ints from 0/1 planes (LSB first), the last plane weighing -2^(bits-1)."""
    bits = len(planes)
    return sum((-(1 << j) if j == bits - 1 else (1 << j)) * np.asarray(p, dtype=np.int64)
               for j, p in enumerate(planes))
