"""PGD (Madry et al. 2018; paper 000 Eq. 6) and BIM (Kurakin et al. 2017; paper 003 Eq. 3)."""
from __future__ import annotations

from ._validate import check_int, check_positive, parse_eps
from .base import Attack
from .losses import attack_objective, check_loss, check_temperature


class PGD(Attack):
    """L-inf PGD: x_{t+1} = Proj_{B(x, eps) ∩ [0,1]}(x_t + alpha * sign(grad_x L(h(x_t), y))).

    random_start: x_0 = clip_[0,1](x + U(-eps, eps)) (Madry et al.), else x_0 = x.
    restarts:     independent random starts; ``atk(x, y)`` returns, per example, the strongest one
                  (misclassified first, then highest loss); ``atk.run(x, y)`` also gives the
                  per-restart correctness for mean-over-restarts statistics.
    loss:         "ce" (default), "dlr" (Croce & Hein 2020; targeted: their targeted DLR) or "cw"
                  (margin max_{j!=y} z_j - z_y); see bitkern.attacks.losses.
    temperature:  logits / T before the loss (PGD++, Gupta & Ajanthan, AAAI 2022); 1.0 = plain PGD.
    Returns the last iterate of each restart (the PGD-k convention of both papers).
    """

    def __init__(self, model, eps, alpha, steps, random_start: bool = True, restarts: int = 1, *,
                 targeted: bool = False, target_map=None, seed: int = 0, surrogate=None,
                 model_mode: str = "eval", loss: str = "ce", temperature: float = 1.0):
        super().__init__(model, targeted=targeted, target_map=target_map, seed=seed, surrogate=surrogate,
                         model_mode=model_mode)
        self._eps = parse_eps(eps)
        self.alpha = check_positive(parse_eps(alpha, "alpha"), "alpha")
        self.steps = check_int(steps, "steps", 0)
        if not isinstance(random_start, bool):
            raise TypeError(f"random_start must be a bool, got {type(random_start).__name__}")
        self.random_start = random_start
        self.restarts = check_int(restarts, "restarts", 1)
        self.loss = check_loss(loss)
        self.temperature = check_temperature(temperature)

    @property
    def stochastic(self) -> bool:
        return self.random_start and self._eps > 0

    @property
    def name(self) -> str:
        return f"{type(self).__name__}-{self.steps}"

    def params(self) -> dict:
        return {"eps": self._eps, "alpha": self.alpha, "steps": self.steps, "random_start": self.random_start,
                "restarts": self.restarts, "loss": self.loss, "temperature": self.temperature,
                **super().params()}

    def _objective(self, logits, labels, state, real: bool):
        if self.loss == "ce" and self.temperature == 1.0:
            return super()._objective(logits, labels, state, real)   # unchanged default, bit for bit
        true_labels = state.get("true_labels")
        if true_labels is None and self.targeted and self.loss == "dlr":
            true_labels = state["clean_logits"].argmax(dim=1)   # unknown true label: the clean prediction
        return attack_objective(self.loss, logits, labels, targeted=self.targeted, true_labels=true_labels,
                                temperature=self.temperature)

    def _start(self, x):
        if self.random_start:
            return x + self._noise_uniform(x, -self._eps, self._eps)
        return x

    def _perturb(self, x, labels, state, *, track, on_step):
        return self._iterate(x, self._start(x), labels, state, alpha=self.alpha, steps=self.steps,
                             track=track, on_step=on_step)


class BIM(PGD):
    """BIM / I-FGSM: PGD from x itself (no random start), one run:
    x_{t+1} = Clip_{x, eps}(x_t + alpha * sign(grad_x L(h(x_t), y))), clipped to [0, 1]."""

    def __init__(self, model, eps, alpha, steps, *, targeted: bool = False, target_map=None, seed: int = 0,
                 surrogate=None, model_mode: str = "eval", loss: str = "ce", temperature: float = 1.0):
        super().__init__(model, eps, alpha, steps, random_start=False, restarts=1, targeted=targeted,
                         target_map=target_map, seed=seed, surrogate=surrogate, model_mode=model_mode,
                         loss=loss, temperature=temperature)

    def params(self) -> dict:
        p = super().params()
        p.pop("random_start")
        p.pop("restarts")
        return p
