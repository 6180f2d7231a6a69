"""Square Attack, L-inf (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020), following fra31/auto-attack
``autoattack/square.py`` (= torchattacks 3.5.1 ``Square``) for the L-inf case.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._validate import check_int, check_positive, parse_eps
from .base import Attack
from .losses import check_loss, margin as margin_loss

_THRESHOLDS = ((10, 2), (50, 4), (200, 8), (500, 16), (1000, 32), (2000, 64), (4000, 128), (6000, 256),
               (8000, 512))


def square_p_selection(it: int, n_queries: int, p_init: float = 0.8, rescale: bool = True) -> float:
    """The reference ``p_selection``: fraction of pixels changed at iteration ``it`` (0-based).

    With ``rescale`` (the reference's ``resc_schedule=True``) the iteration is first mapped to a 10000-query
    budget, ``it = int(it / n_queries * 10000)``; then p = p_init, halved after 10, 50, 200, 500, 1000,
    2000, 4000, 6000, 8000 iterations (p_init/2, /4, ..., /512).
    """
    if rescale:
        it = int(it / n_queries * 10000)
    p = p_init
    for threshold, div in _THRESHOLDS:
        if it > threshold:
            p = p_init / div
    return p


def square_size(p: float, n_features: int, channels: int) -> int:
    """Side of the square: s = max(round(sqrt(p * n_features / c)), 1) (n_features = c * h * w)."""
    return max(int(round(math.sqrt(p * n_features / channels))), 1)


class Square(Attack):
    """Square Attack, L-inf (random search; no gradients), as the reference L-inf branch:

    * init: vertical stripes, x_best = clip01(x + eps * s), s in {-1, +1}^{c x 1 x w} per example;
    * iteration i (0-based, up to ``queries``): square side ``square_size(square_p_selection(i, queries,
      p_init), c h w, c)``, position (vh, vw) uniform in [0, h - s) x [0, w - s) (the reference's range),
      the window set to x +- eps with one random sign per channel, projected on the eps-ball and [0, 1];
      the candidate replaces x_best when it lowers the loss or misclassifies;
    * loss: "margin" (z_y - max_{j!=y} z_j, minimised) or "ce" (-CE, minimised); success = margin <= 0;
    * per-example early stop: only examples with margin > 0 are queried; examples misclassified at x are
      not attacked (1 query, returned unchanged).

    Deviations from the reference: the square position and the channel signs are drawn *per example*
    (the reference shares one position and one sign vector across the batch), so that with
    ``run(example_seeds=...)`` results do not depend on the batch; the side is also capped at min(h, w).
    Restarts are independent runs (``Attack.run`` keeps the strongest per example).

    Only the model's forward is called, always inside ``torch.inference_mode()`` (no autograd graph), so a
    frozen packed bitkern model runs on its packed kernels. ``run().queries`` [B]: forward calls per example
    (1 clean check + per restart 1 init + 1 per iteration); ``run().iterations`` [B]: iterations run.
    """

    stochastic = True
    uses_gradients = False

    def __init__(self, model, eps, queries: int = 5000, p_init: float = 0.8, restarts: int = 1, *,
                 seed: int = 0, model_mode: str = "eval", loss: str = "margin"):
        super().__init__(model, seed=seed, model_mode=model_mode)
        self._eps = parse_eps(eps)
        self.queries = check_int(queries, "queries", 0)
        self.p_init = check_positive(p_init, "p_init")
        if self.p_init > 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
        self.restarts = check_int(restarts, "restarts", 1)
        self.loss = check_loss(loss, ("margin", "ce"))

    @property
    def name(self) -> str:
        return f"Square-{self.queries}"

    def params(self) -> dict:
        return {"eps": self._eps, "queries": self.queries, "p_init": self.p_init, "restarts": self.restarts,
                "loss": self.loss, **super().params()}

    # ------------------------------------------------------------- forward only, inference mode
    def _forward_real(self, x):
        with torch.inference_mode():
            out = self.model(x)
        return out.clone()   # a normal tensor again (usable outside inference mode)

    def _margin_and_loss(self, logits, y):
        margin = margin_loss(logits, y)
        if self.loss == "margin":
            return margin, margin
        return margin, -F.cross_entropy(logits, y, reduction="none")

    def _objective(self, logits, labels, state, real: bool):
        return -self._margin_and_loss(logits, labels)[1]

    def _prepare(self, x, labels) -> dict:
        n = x.shape[0]
        return {"queries": torch.ones(n, dtype=torch.long, device=x.device),
                "iterations": torch.zeros(n, dtype=torch.long, device=x.device)}

    # ------------------------------------------------------------- one restart
    def _perturb(self, x, labels, state, *, track, on_step):
        if x.dim() != 4:
            raise ValueError(f"Square needs images [B, C, H, W], got shape {tuple(x.shape)}")
        to_fool = state["clean_logits"].argmax(dim=1) == labels
        index = to_fool.nonzero().flatten()
        rng = self._rng(x.shape[0], x.device)
        x_out = x.clone()
        curve = [] if track else None
        if index.numel() == 0:
            if track:
                curve = [on_step(i, x, None, labels, correct=to_fool.clone()) for i in range(self.queries)]
            return x_out, curve

        def hook(i, x_best, margin_min):
            full = torch.zeros_like(to_fool)
            full[index] = margin_min > 0
            x_full = x.clone()
            x_full[index] = x_best
            curve.append(on_step(i, x_full, None, labels, correct=full))

        with torch.no_grad():
            x_best, n_queries = self._single_run(x[index], labels[index], rng.subset(index),
                                                 hook if track else None)
        x_out[index] = x_best
        state["queries"][index] += n_queries
        state["iterations"][index] += n_queries - 1
        return x_out, curve

    def _single_run(self, x, y, rng, hook):
        eps = self._eps
        c, h, w = x.shape[1:]
        n_features = c * h * w
        x_best = torch.clamp(x + eps * rng.choice_sign((c, 1, w), dtype=x.dtype, counter=0), 0.0, 1.0)
        margin_min, loss_min = self._margin_and_loss(self._forward_real(x_best), y)
        n_queries = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)

        for i_iter in range(self.queries):
            if hook is not None:
                hook(i_iter, x_best, margin_min)
            idx_to_fool = (margin_min > 0.0).nonzero().flatten()
            if len(idx_to_fool) == 0:
                if hook is not None:
                    for j in range(i_iter + 1, self.queries):
                        hook(j, x_best, margin_min)
                break
            x_curr = x[idx_to_fool]
            x_best_curr = x_best[idx_to_fool]
            y_curr = y[idx_to_fool]
            margin_min_curr = margin_min[idx_to_fool]
            loss_min_curr = loss_min[idx_to_fool]

            p = square_p_selection(i_iter, self.queries, self.p_init)
            s = min(square_size(p, n_features, c), h, w)
            sub = rng.subset(idx_to_fool)
            vh = sub.randint(0, h - s, counter=3 * i_iter + 1)
            vw = sub.randint(0, w - s, counter=3 * i_iter + 2)
            signs = sub.choice_sign((c, 1, 1), dtype=x.dtype, counter=3 * i_iter + 3)
            in_h = (rows[None, :] >= vh[:, None]) & (rows[None, :] < vh[:, None] + s)     # [m, h]
            in_w = (cols[None, :] >= vw[:, None]) & (cols[None, :] < vw[:, None] + s)     # [m, w]
            window = (in_h[:, None, :, None] & in_w[:, None, None, :]).to(x.dtype)      # [m, 1, h, w]
            new_deltas = window * (2.0 * eps * signs)

            x_new = x_best_curr + new_deltas
            x_new = torch.min(torch.max(x_new, x_curr - eps), x_curr + eps)
            x_new = torch.clamp(x_new, 0.0, 1.0)

            margin, loss = self._margin_and_loss(self._forward_real(x_new), y_curr)
            idx_improved = (loss < loss_min_curr).float()
            loss_min[idx_to_fool] = idx_improved * loss + (1.0 - idx_improved) * loss_min_curr
            idx_miscl = (margin <= 0.0).float()
            idx_improved = torch.max(idx_improved, idx_miscl)
            margin_min[idx_to_fool] = idx_improved * margin + (1.0 - idx_improved) * margin_min_curr
            idx_improved = idx_improved.reshape([-1, *[1] * len(x.shape[:-1])])
            x_best[idx_to_fool] = idx_improved * x_new + (1.0 - idx_improved) * x_best_curr
            n_queries[idx_to_fool] += 1
        return x_best, n_queries
