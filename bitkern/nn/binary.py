"""Binary (XNOR-Net) and multi-bit (ABC-Net / MBN M x N) layers.

Every forward pass binarizes inside the op (never by swapping weights) and computes through
``bitkern.ops.mbn_conv2d``, so the packed kernel of the active backend runs in training, evaluation and
attacks alike. Gradients follow the straight-through estimator of docs/architecture.md.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .packed import PackedMBNConv2d, packed_from_bases
from .precision import Precision


def _check_bases(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise ValueError(f"{name}: expected an int number of binary bases in 1..8, got {value!r}")
    return value


def weight_shifts(M: int) -> torch.Tensor:
    """ABC-Net shifts u_m spread over [-1, 1] (u = 0 for a single base)."""
    return torch.zeros(1) if M == 1 else torch.linspace(-1.0, 1.0, M)


def activation_shifts(N: int) -> torch.Tensor:
    """Initial shifts v_n of the activation bases H_v(x) = sign(clip(x + v, 0, 1) - 0.5).

    H_v fires where x >= 0.5 - v. The thresholds 0.5 - v_n are spread evenly inside (-1, 1)
    (N = 1: threshold 0, i.e. v = 0.5, the sign of a zero-centred BN output; N = 3: -0.5, 0, 0.5).
    """
    thresholds = torch.linspace(-1.0, 1.0, N + 2)[1:-1]
    return 0.5 - thresholds


def weight_bases(weight: torch.Tensor, u: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Real-valued bases W - mean(W) + u_m * std(W), [M, *weight.shape]; the op takes their sign.

    mean/std are detached: the STE gradient of every base flows to W unchanged (paper 000 Eq. 3).
    """
    with torch.no_grad():
        if per_channel:
            flat = weight.reshape(weight.shape[0], -1)
            shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
            mean = flat.mean(dim=1).reshape(shape)
            std = flat.std(dim=1, unbiased=False).reshape(shape) if flat.shape[1] > 1 else torch.zeros(shape)
        else:
            mean, std = weight.mean(), weight.std(unbiased=False)
    u = u.to(weight.dtype).reshape((-1,) + (1,) * weight.dim())
    return (weight - mean).unsqueeze(0) + u * std.unsqueeze(0)


def least_squares_alpha(weight: torch.Tensor, bases: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """alpha = argmin ||W - sum_m alpha_m sign(B_m)||^2 (no intercept), [M, Co] or [M].

    Solved through the M x M normal equations in float64 with the minimum-norm (SVD) solver, which is
    the least-squares solution of minimum norm also when bases coincide (rank-deficient channels).
    """
    signs = torch.where(bases >= 0, 1.0, -1.0).to(torch.float64)
    target = weight.detach().to(torch.float64)
    M = bases.shape[0]
    if per_channel:
        a = signs.reshape(M, weight.shape[0], -1).permute(1, 2, 0)  # [Co, K, M]
        b = target.reshape(weight.shape[0], -1, 1)                  # [Co, K, 1]
    else:
        a, b = signs.reshape(1, M, -1).transpose(1, 2), target.reshape(1, -1, 1)
    gram, rhs = a.transpose(1, 2) @ a, a.transpose(1, 2) @ b        # [G, M, M], [G, M, 1]
    sol = (torch.linalg.pinv(gram, hermitian=True) @ rhs)[..., 0]   # [G, M]
    return (sol.t().contiguous() if per_channel else sol[0]).to(torch.float32)


class _MultiBitBases:
    """ABC-Net weight bases, alpha, activation shifts v and beta, shared by MBNConv2d and MBNLinear."""

    def _init_bases(self, M: int, N: int, per_channel: bool, out_channels: int) -> None:
        self.M, self.N = _check_bases("M", M), _check_bases("N", N)
        self.per_channel = bool(per_channel)
        self.register_buffer("u", weight_shifts(self.M))
        self.alpha = nn.Parameter(torch.empty(self.M, out_channels) if self.per_channel else torch.empty(self.M))
        self.v = nn.Parameter(activation_shifts(self.N))
        self.beta = nn.Parameter(torch.full((self.N,), 1.0 / self.N))
        self.reset_alpha()

    @torch.no_grad()
    def reset_alpha(self) -> None:
        """Re-fit alpha to the current latent weights by least squares (e.g. after loading fp weights)."""
        self.alpha.copy_(least_squares_alpha(self.weight, self.bases(), self.per_channel))

    def bases(self) -> torch.Tensor:
        return weight_bases(self.weight, self.u, self.per_channel)

    @property
    def precision(self) -> Precision:
        return Precision("mbn", self.M, self.N, "binary")

    @torch.no_grad()
    def to_packed(self) -> PackedMBNConv2d:
        """The inference-only packed layer (sign bits of the bases, alpha / v / beta as buffers)."""
        return _to_packed(self, self.bases(), self.alpha, self.v, self.beta, xnor=False)


class MBNConv2d(_MultiBitBases, nn.Conv2d):
    """ABC-Net multi-bit convolution: M weight bases x N activation bases (paper 000 Eq. 2).

    out = sum_m sum_n alpha_m beta_n conv(sign(W - mean + u_m std), H_{v_n}(x)). alpha is trainable and
    initialised by least squares; v (activation shifts) and beta (init 1/N) are trainable. ``per_channel``
    (default True, the ABC-Net choice) takes mean/std and alpha per output channel instead of per layer.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 M: int = 3, N: int = 1, bias: bool = False, per_channel: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self._init_bases(M, N, per_channel, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = ops.mbn_conv2d(x, self.bases(), self.alpha, self.v, self.beta, self.stride, self.padding)
        return out if self.bias is None else out + self.bias.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", M={self.M}, N={self.N}, per_channel={self.per_channel}"


def _to_packed(module: nn.Module, bases: torch.Tensor, alpha, v, beta, xnor: bool) -> PackedMBNConv2d:
    if isinstance(module, nn.Linear):
        return packed_from_bases(bases[..., None, None], alpha, v, beta, module.bias,
                                 in_channels=module.in_features, out_channels=module.out_features, xnor=xnor,
                                 is_linear=True)
    return packed_from_bases(bases, alpha, v, beta, module.bias, in_channels=module.in_channels,
                             out_channels=module.out_channels, kernel_size=module.kernel_size,
                             stride=module.stride, padding=module.padding, xnor=xnor)


class _XNORWeights:
    """XNOR-Net: sign weights scaled by mean|W| per output, sign activations (M = N = 1)."""

    M = 1
    N = 1

    @property
    def precision(self) -> Precision:
        return Precision("xnor", 1, 1, "binary")

    @torch.no_grad()
    def to_packed(self) -> PackedMBNConv2d:
        """The inference-only packed layer (sign bits of W, mean|W| as alpha)."""
        return _to_packed(self, self.weight.unsqueeze(0), self.scale(), None, None, xnor=True)


class XNORConv2d(_XNORWeights, nn.Conv2d):
    """XNOR-Net convolution: sign weights scaled by mean|W| per output channel, sign activations.

    Runs the MBN op with M = 1, v = None (activation bit = x >= 0, STE window |x| <= 1) and
    alpha = mean|W| (differentiable, as in XNOR-Net).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)

    def scale(self) -> torch.Tensor:
        return self.weight.abs().mean(dim=(1, 2, 3)).unsqueeze(0)  # [1, Co]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = ops.mbn_conv2d(x, self.weight.unsqueeze(0), self.scale(), None, None, self.stride, self.padding)
        return out if self.bias is None else out + self.bias.reshape(1, -1, 1, 1)


class _LinearAsConv(nn.Linear):
    """Linear layer computed as a 1x1 convolution through the MBN op."""

    def _conv_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected [..., {self.in_features}], got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        return x.reshape(-1, self.in_features, 1, 1), lead

    def _finish(self, out: torch.Tensor, lead: tuple) -> torch.Tensor:
        out = out.reshape(*lead, self.out_features)
        return out if self.bias is None else out + self.bias


class MBNLinear(_MultiBitBases, _LinearAsConv):
    """Multi-bit fully connected layer (same bases, alpha, v, beta as MBNConv2d)."""

    def __init__(self, in_features: int, out_features: int, M: int = 3, N: int = 1, bias: bool = False,
                 per_channel: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self._init_bases(M, N, per_channel, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x4, lead = self._conv_input(x)
        w = self.bases()[..., None, None]
        return self._finish(ops.mbn_conv2d(x4, w, self.alpha, self.v, self.beta, 1, 0), lead)


class XNORLinear(_XNORWeights, _LinearAsConv):
    """XNOR-Net fully connected layer: sign(W) * mean|W| per output, sign activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)

    def scale(self) -> torch.Tensor:
        return self.weight.abs().mean(dim=1).unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x4, lead = self._conv_input(x)
        w = self.weight[None, :, :, None, None]
        return self._finish(ops.mbn_conv2d(x4, w, self.scale(), None, None, 1, 0), lead)


__all__ = ["MBNConv2d", "MBNLinear", "XNORConv2d", "XNORLinear", "weight_shifts", "activation_shifts",
           "weight_bases", "least_squares_alpha"]
