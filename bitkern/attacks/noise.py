"""GN: additive Gaussian noise (paper 003's "GN" row), a gradient-free baseline."""
from __future__ import annotations

from ._validate import check_positive, parse_eps
from .base import Attack


class GN(Attack):
    """x_adv = clip_[0,1](x + std * N(0, I)); with ``eps`` the noise is also clipped to the eps-ball.

    std is in input units (0.1 = 25.5 pixels); strings like "8/255" are accepted.
    """

    stochastic = True
    uses_gradients = False

    def __init__(self, model, std, *, eps=None, targeted: bool = False, target_map=None, seed: int = 0,
                 model_mode: str = "eval"):
        super().__init__(model, targeted=targeted, target_map=target_map, seed=seed, model_mode=model_mode)
        self.std = check_positive(std, "std", allow_zero=True)
        self._eps = None if eps is None else parse_eps(eps)

    @property
    def name(self) -> str:
        return "GN"

    def params(self) -> dict:
        return {"std": self.std, "eps": self._eps, **super().params()}

    def _perturb(self, x, labels, state, *, track, on_step):
        return x + self.std * self._noise_normal(x), ([] if track else None)
