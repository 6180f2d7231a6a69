"""FGSM (Goodfellow et al. 2015; paper 003 Eq. 2): one signed-gradient step of size eps."""
from __future__ import annotations

from ._validate import parse_eps
from .base import Attack


class FGSM(Attack):
    """x_adv = clip_[0,1](x + eps * sign(grad_x L(h(x), y)))  (targeted: x - eps * sign(grad CE(h(x), t))).

    ``seed`` is accepted for a uniform interface; FGSM itself is deterministic.
    """

    def __init__(self, model, eps, *, targeted: bool = False, target_map=None, seed: int = 0,
                 surrogate=None, model_mode: str = "eval"):
        super().__init__(model, targeted=targeted, target_map=target_map, seed=seed, surrogate=surrogate,
                         model_mode=model_mode)
        self._eps = parse_eps(eps)

    @property
    def name(self) -> str:
        return "FGSM"

    def params(self) -> dict:
        return {"eps": self._eps, **super().params()}

    def _perturb(self, x, labels, state, *, track, on_step):
        return self._iterate(x, x, labels, state, alpha=self._eps, steps=1, track=track, on_step=on_step)
