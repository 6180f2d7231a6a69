"""numpy reference for bitkern.nn: ABC-Net weight bases, least-squares alpha, PACT and DoReFa quantizers."""
import numpy as np

from .ops_ref import mbn_conv2d_ref, sign


def weight_bases_ref(weight, M, per_channel=True):
    """B_m = W - mean + u_m * std (population std), u = linspace(-1, 1, M) (0 for M = 1)."""
    w = np.asarray(weight, dtype=np.float64)
    u = np.zeros(1) if M == 1 else np.linspace(-1.0, 1.0, M)
    if per_channel:
        flat = w.reshape(w.shape[0], -1)
        shape = (w.shape[0],) + (1,) * (w.ndim - 1)
        mean, std = flat.mean(1).reshape(shape), flat.std(1).reshape(shape)
    else:
        mean, std = w.mean(), w.std()
    return np.stack([w - mean + um * std for um in u])


def lstsq_alpha_ref(weight, bases, per_channel=True):
    """argmin_alpha ||W - sum_m alpha_m sign(B_m)||^2 per output channel ([M, Co]) or per layer ([M])."""
    w = np.asarray(weight, dtype=np.float64)
    s = sign(bases).astype(np.float64)
    M = s.shape[0]
    if not per_channel:
        return np.linalg.lstsq(s.reshape(M, -1).T, w.reshape(-1), rcond=None)[0]
    out = np.zeros((M, w.shape[0]))
    for c in range(w.shape[0]):
        out[:, c] = np.linalg.lstsq(s[:, c].reshape(M, -1).T, w[c].reshape(-1), rcond=None)[0]
    return out


def mbn_layer_ref(x, weight, M, alpha, v, beta, stride=1, padding=0, per_channel=True):
    """Forward value of MBNConv2d from its latent weight."""
    return mbn_conv2d_ref(x, weight_bases_ref(weight, M, per_channel), alpha, v, beta, stride, padding)


def pact_ref(x, clip, bits):
    levels = 2 ** bits - 1
    y = np.minimum(np.maximum(np.asarray(x, dtype=np.float64), 0.0), clip)
    return np.round(y * levels / clip) * clip / levels


def dorefa_weight_ref(weight, bits):
    w = np.asarray(weight, dtype=np.float64)
    if bits == 1:
        return sign(w) * np.abs(w).mean()
    t = np.tanh(w)
    t = t / (2 * np.abs(t).max()) + 0.5
    levels = 2 ** bits - 1
    return 2 * np.round(t * levels) / levels - 1
