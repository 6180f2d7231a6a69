"""TPGD (paper 003 Eq. 4; TRADES-style boundary term, Zhang et al. 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_positive
from .pgd import PGD


class TPGD(PGD):
    """Signed-gradient ascent on the per-example objective

        J(x_t) = CE(h(x_t), y) + KL(p(x) || p(x_t)) / rho,
        KL(p(x) || p(x_t)) = sum_k p_k(x) (log p_k(x) - log p_k(x_t)),   p = softmax(h(.)),

    with the clean prediction p(x) computed once and held fixed (no gradient through it). This is
    paper 003's L(h(x_t), h(x)) read as "loss of the prediction h(x_t) against the target distribution
    h(x)", i.e. torchattacks/TRADES ``KLDivLoss(log_softmax(h(x_t)), softmax(h(x)))``. Targeted:
    J = -CE(h(x_t), t) + KL / rho. Starts at x (random_start=False, as in Eq. 4) unless asked.
    """

    def __init__(self, model, eps, alpha, steps, rho: float = 1.0, *, random_start: bool = False,
                 restarts: int = 1, targeted: bool = False, target_map=None, seed: int = 0, surrogate=None,
                 model_mode: str = "eval"):
        super().__init__(model, eps, alpha, steps, random_start=random_start, restarts=restarts,
                         targeted=targeted, target_map=target_map, seed=seed, surrogate=surrogate,
                         model_mode=model_mode)
        self.rho = check_positive(rho, "rho")

    def params(self) -> dict:
        return {**super().params(), "rho": self.rho}

    def _prepare(self, x, labels) -> dict:
        state = {"clean_log_probs_real": F.log_softmax(self._forward_real(x), dim=1)}
        if self.surrogate.model is None and self.surrogate.spec is None:
            state["clean_log_probs_grad"] = state["clean_log_probs_real"]
        else:
            # the gradient side compares against its own clean prediction (same forward for STE modes)
            grad_model = self.surrogate.model or self.model
            with torch.no_grad(), self.surrogate.context():
                state["clean_log_probs_grad"] = F.log_softmax(grad_model(x), dim=1)
        return state

    def _objective(self, logits, labels, state, real: bool):
        ref = state["clean_log_probs_real" if real else "clean_log_probs_grad"]
        log_p = F.log_softmax(logits, dim=1)
        kl = (ref.exp() * (ref - log_p)).sum(dim=1)
        return super()._objective(logits, labels, state, real) + kl / self.rho
