"""APGD and APGD-T (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020), L-inf, following the reference implementation
fra31/auto-attack ``autoattack/autopgd_base.py`` (``APGDAttack``, ``APGDAttack_targeted``) step by step.
"""
from __future__ import annotations

import torch

from ._validate import check_int, check_positive, parse_eps
from .base import Attack
from .losses import (attack_objective, check_loss, check_temperature, dlr_loss, dlr_loss_targeted,
                     scale_logits)


# ----------------------------------------------------------------------------- schedule helpers
def apgd_schedule(n_iter: int) -> tuple[int, int, int]:
    """(first window n_iter_2, minimal window n_iter_min, window decrease size_decr) as in the reference:
    ``max(int(0.22 n), 1), max(int(0.06 n), 1), max(int(0.03 n), 1)``."""
    return max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)


def apgd_checkpoints(n_iter: int) -> list[int]:
    """Checkpoints w_1 < w_2 < ... <= n_iter (iteration counts after which the step size is checked).

    The reference's integer form of the paper's p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
    0.06), w_j = ceil(p_j n): windows start at ``n_iter_2`` and shrink by ``size_decr`` down to
    ``n_iter_min`` (see ``apgd_schedule``); for n = 100: 22, 41, 57, 70, 80, 87, 93, 99.
    The check after iteration w_j runs at 0-based loop index w_j - 1.
    """
    n_iter = check_int(n_iter, "n_iter", 0)
    k, k_min, decr = apgd_schedule(n_iter)
    out, w = [], 0
    while w + k <= n_iter:
        w += k
        out.append(w)
        k = max(k - decr, k_min)
    return out


def apgd_halving(loss_steps: torch.Tensor, i: int, k: int, rho: float, loss_best: torch.Tensor,
                 loss_best_last_check: torch.Tensor, reduced_last_check: torch.Tensor) -> torch.Tensor:
    """bool [B]: examples whose step size is halved at the checkpoint at loop index ``i`` (window ``k``).

    Condition 1 (reference ``check_oscillation``): the number of steps in the window that increased the
    loss, sum_{c<k} [f_{i-c} > f_{i-c-1}], is <= k * rho (``loss_steps[j]`` = loss after iteration j + 1;
    as in the reference, index -1 wraps to the zero-initialised last row, so the first window compares
    its first loss with 0 rather than with the loss at the starting point).
    Condition 2: the step size was not reduced at the last checkpoint and the best loss has not improved
    since then (``loss_best_last_check >= loss_best``).
    """
    t = torch.zeros(loss_steps.shape[1], device=loss_steps.device)
    for c in range(k):
        t += (loss_steps[i - c] > loss_steps[i - c - 1]).float()
    cond1 = t <= k * rho * torch.ones_like(t)
    cond2 = (~reduced_last_check) & (loss_best_last_check >= loss_best)
    return cond1 | cond2


def _bshape(x):
    return [x.shape[0]] + [1] * (x.dim() - 1)


# ----------------------------------------------------------------------------- APGD
class APGD(Attack):
    """APGD (Croce & Hein, ICML 2020, Alg. 1), L-inf, exactly as fra31/auto-attack's ``APGDAttack``:

    * start: x_0 = clip01(x + eps * t / ||t||_inf), t ~ U[-1, 1]^d; step size eta = 2 eps;
    * z = P(x_k + eta sign(grad)); x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})), a = 1 at the
      first step, else 0.75 (momentum on the projected step), P = projection on the eps-ball and [0, 1];
    * at the checkpoints ``apgd_checkpoints(steps)`` the step size is halved where ``apgd_halving`` says so,
      and those examples restart from x_best (the highest-loss point) with its gradient;
    * x_best tracks the highest loss, x_best_adv the (latest) misclassified iterate, as in the reference.

    Returns per example the misclassified point when one was found, else the highest-loss point (the
    reference returns x there). Only examples correctly classified at x are attacked (the reference's
    ``ind_to_fool``); the others come back unchanged. Restarts are independent (``Attack.run`` keeps the
    strongest per example) instead of the reference's "restart only the still-robust examples"; the result
    per example is the same kind of worst case.

    loss: "ce" or "dlr" (targeted: -CE to the target / targeted DLR; see bitkern.attacks.losses).
    temperature: logits / T before the loss (PGD++); 1.0 = the reference.
    ``run().iterations`` [B]: iterations until the first success per restart (all steps when none), summed.
    With the default generator (no ``example_seeds``) the starting points are ``torch.rand`` draws from the
    attack's generator, i.e. the same numbers the reference draws after ``torch.manual_seed(seed)``.
    """

    stochastic = True

    def __init__(self, model, eps, steps: int = 100, restarts: int = 1, loss: str = "ce", rho: float = 0.75, *,
                 seed: int = 0, targeted: bool = False, target_map=None, surrogate=None,
                 model_mode: str = "eval", temperature: float = 1.0):
        super().__init__(model, targeted=targeted, target_map=target_map, seed=seed, surrogate=surrogate,
                         model_mode=model_mode)
        self._eps = parse_eps(eps)
        self.steps = check_int(steps, "steps", 0)
        self.restarts = check_int(restarts, "restarts", 1)
        self.loss = check_loss(loss, ("ce", "dlr"))
        self.rho = check_positive(rho, "rho")
        if self.rho > 1:
            raise ValueError(f"rho must be in (0, 1], got {rho!r}")
        self.temperature = check_temperature(temperature)

    @property
    def name(self) -> str:
        return f"APGD-{self.loss.upper()}-{self.steps}"

    def params(self) -> dict:
        return {"eps": self._eps, "steps": self.steps, "restarts": self.restarts, "loss": self.loss,
                "rho": self.rho, "temperature": self.temperature, **super().params()}

    # ------------------------------------------------------------- objective
    def _true_or_pred(self, state):
        true_labels = state.get("true_labels")
        return state["clean_logits"].argmax(dim=1) if true_labels is None else true_labels

    def _objective(self, logits, labels, state, real: bool):
        true_labels = self._true_or_pred(state) if self.targeted and self.loss == "dlr" else None
        return attack_objective(self.loss, logits, labels, targeted=self.targeted, true_labels=true_labels,
                                temperature=self.temperature)

    def _loss_fn(self, labels, state, index):
        """Per-example loss on a subset of examples, as a closure logits -> [n]."""
        lab = labels[index]
        true_sub = self._true_or_pred(state)[index] if self.targeted and self.loss == "dlr" else None
        return lambda logits: attack_objective(self.loss, logits, lab, targeted=self.targeted,
                                               true_labels=true_sub, temperature=self.temperature)

    # ------------------------------------------------------------- one restart
    def _perturb(self, x, labels, state, *, track, on_step):
        to_fool = self._correct(state["clean_logits"], state.get("true_labels"), labels)
        index = to_fool.nonzero().flatten()
        true_labels = state.get("true_labels")
        x_out = x.clone()
        curve = [] if track else None
        if index.numel() == 0:
            if track:
                curve = [on_step(s, x, None, labels, correct=torch.zeros_like(to_fool)) for s in range(self.steps)]
            self._count(state, x.shape[0], index, torch.zeros_like(index))
            return x_out, curve

        def hook(step, x_sub, acc_sub):
            full = torch.zeros_like(to_fool)
            full[index] = acc_sub
            x_full = x.clone()
            x_full[index] = x_sub
            curve.append(on_step(step, x_full, None, labels, correct=full))

        rng = self._rng(x.shape[0], x.device).subset(index)
        x_best, acc, _, x_best_adv, iters = self._single_run(
            x[index], labels[index], None if true_labels is None else true_labels[index],
            self._loss_fn(labels, state, index), rng, hook if track else None)
        x_out[index] = torch.where(acc.view(_bshape(x_best)), x_best, x_best_adv)
        self._count(state, x.shape[0], index, iters)
        return x_out, curve

    def _count(self, state, batch, index, iters):
        if "iterations" not in state:
            state["iterations"] = torch.zeros(batch, dtype=torch.long, device=index.device)
        state["iterations"][index] += iters

    # ------------------------------------------------------------- reference single run
    def _loss_grad(self, x_t, loss_fn):
        """(input gradient of sum(loss), per-example loss on the real model, real-model logits)."""
        x_t = x_t.detach().requires_grad_(True)
        grad_model = self.surrogate.model or self.model
        with torch.enable_grad(), self.surrogate.context():
            logits = grad_model(x_t)
            loss_indiv = loss_fn(logits)
            loss = loss_indiv.sum()
            grad = None
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss, [x_t], allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(x_t)
        same_forward = self.surrogate.spec is None or isinstance(self.surrogate.spec, str)
        if same_forward:
            return grad.detach(), loss_indiv.detach(), logits.detach()
        real_logits = self._forward_real(x_t.detach())
        return grad.detach(), loss_fn(real_logits).detach(), real_logits

    def _single_run(self, x, y, true_labels, loss_fn, rng, hook):
        """One APGD run on examples x (all to be attacked).

        Returns (x_best, acc, loss_best, x_best_adv, iters): ``acc`` [n] bool still not successful after
        all iterations (reference semantics); ``iters`` [n] long iterations until the first success
        (0: the starting point already succeeded; steps: never).
        """
        eps, n_iter = self._eps, self.steps
        _, n_iter_min, size_decr = apgd_schedule(n_iter)
        n = x.shape[0]

        t = 2 * rng.uniform(x.shape[1:], dtype=x.dtype) - 1
        t_max = t.abs().reshape(n, -1).max(1)[0]
        x_adv = x + eps * torch.ones_like(x) * (t / (t_max.view(_bshape(x)) + 1e-12))
        x_adv = x_adv.clamp(0.0, 1.0)
        x_best = x_adv.clone()
        x_best_adv = x_adv.clone()
        grad, loss_indiv, logits = self._loss_grad(x_adv, loss_fn)
        loss_steps = torch.zeros([n_iter, n], device=x.device, dtype=loss_indiv.dtype)
        grad_best = grad.clone()
        acc = self._correct(logits, true_labels, y)
        iters = torch.where(acc, n_iter, 0)          # iterations until the first success (n_iter: none)
        loss_best = loss_indiv.clone()

        step_size = 2.0 * eps * torch.ones(_bshape(x), device=x.device, dtype=x.dtype)
        x_adv_old = x_adv.clone()
        k, _, _ = apgd_schedule(n_iter)
        counter3 = 0
        loss_best_last_check = loss_best.clone()
        reduced_last_check = torch.ones_like(loss_best, dtype=torch.bool)

        for i in range(n_iter):
            if hook is not None:
                hook(i, x_adv.detach(), acc)
            with torch.no_grad():
                x_adv = x_adv.detach()
                grad2 = x_adv - x_adv_old
                x_adv_old = x_adv.clone()
                a = 0.75 if i > 0 else 1.0
                x_adv_1 = x_adv + step_size * torch.sign(grad)
                x_adv_1 = torch.clamp(torch.min(torch.max(x_adv_1, x - eps), x + eps), 0.0, 1.0)
                x_adv_1 = torch.clamp(torch.min(torch.max(x_adv + (x_adv_1 - x_adv) * a + grad2 * (1 - a),
                                                          x - eps), x + eps), 0.0, 1.0)
                x_adv = x_adv_1 + 0.0

            grad, loss_indiv, logits = self._loss_grad(x_adv, loss_fn)

            with torch.no_grad():
                pred = self._correct(logits, true_labels, y)
                iters[acc & ~pred] = i + 1
                acc = acc & pred
                broken = ~pred
                x_best_adv[broken] = x_adv[broken] + 0.0

                y1 = loss_indiv.clone()
                loss_steps[i] = y1
                ind = y1 > loss_best
                x_best[ind] = x_adv[ind].clone()
                grad_best[ind] = grad[ind].clone()
                loss_best[ind] = y1[ind]

                counter3 += 1
                if counter3 == k:
                    fl = apgd_halving(loss_steps, i, k, self.rho, loss_best, loss_best_last_check,
                                      reduced_last_check)
                    reduced_last_check = fl.clone()
                    loss_best_last_check = loss_best.clone()
                    if fl.any():
                        step_size[fl] /= 2.0
                        x_adv[fl] = x_best[fl].clone()
                        grad[fl] = grad_best[fl].clone()
                    k = max(k - size_decr, n_iter_min)
                    counter3 = 0
        self._last_step_size = step_size.view(-1).clone()   # for tests / diagnostics
        return x_best, acc, loss_best, x_best_adv, iters


# ----------------------------------------------------------------------------- APGD-T
class APGDT(APGD):
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss (auto-attack ``dlr_loss_targeted``),
    one run per target class: the classes ranked 2nd, 3rd, ..., (n_target_classes + 1)-th by the clean
    logits (reference ``APGDAttack_targeted``). Only examples still robust after the previous targets are
    attacked (an example stays broken once broken). The verdict is untargeted: robust = still classified
    as its true label. Per restart all targets are swept (the reference loops targets outside restarts).
    For an example never broken the returned point is the highest-loss point of the target run with the
    highest untargeted DLR loss. ``n_target_classes`` is capped at (classes - 1); needs >= 4 classes.
    Per-example randomness: target run j uses stream j of the example's restart stream.
    """

    def __init__(self, model, eps, steps: int = 100, restarts: int = 1, n_target_classes: int = 9,
                 rho: float = 0.75, *, seed: int = 0, surrogate=None, model_mode: str = "eval",
                 temperature: float = 1.0):
        super().__init__(model, eps, steps, restarts, loss="dlr", rho=rho, seed=seed, surrogate=surrogate,
                         model_mode=model_mode, temperature=temperature)
        self.n_target_classes = check_int(n_target_classes, "n_target_classes", 1)

    @property
    def name(self) -> str:
        return f"APGD-T-{self.steps}"

    def params(self) -> dict:
        p = super().params()
        p["loss"] = "dlr-targeted"
        p["n_target_classes"] = self.n_target_classes
        return p

    def _objective(self, logits, labels, state, real: bool):
        return dlr_loss(scale_logits(logits, self.temperature), labels)

    def _perturb(self, x, labels, state, *, track, on_step):
        clean_logits = state["clean_logits"]
        num_classes = clean_logits.shape[1]
        if num_classes < 4:
            raise ValueError(f"APGDT needs at least 4 classes (targeted DLR loss), the model outputs "
                             f"{num_classes}")
        n_targets = min(self.n_target_classes, num_classes - 1)
        robust = self._correct(clean_logits, labels, labels)       # still to fool
        ranking = clean_logits.sort(dim=1)[1]
        x_out = x.clone()
        best_obj = torch.full((x.shape[0],), -float("inf"), device=x.device)
        base_rng = self._rng(x.shape[0], x.device)
        iterations = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        curve = [] if track else None
        for j, target_class in enumerate(range(2, n_targets + 2)):
            index = robust.nonzero().flatten()
            if index.numel() == 0:
                if track:
                    done = torch.zeros_like(robust)
                    curve.extend(on_step(j * self.steps + s, x_out, None, labels, correct=done)
                                 for s in range(self.steps))
                continue
            y_target = ranking[index, -target_class]
            y_sub = labels[index]
            temp = self.temperature

            def loss_fn(logits, y_sub=y_sub, y_target=y_target):
                return dlr_loss_targeted(scale_logits(logits, temp), y_sub, y_target)

            def hook(step, x_sub, acc_sub, j=j, index=index):
                full = robust.clone()
                full[index] = acc_sub
                x_full = x_out.clone()
                x_full[index] = x_sub
                curve.append(on_step(j * self.steps + step, x_full, None, labels, correct=full))

            rng = base_rng.fork(j).subset(index)
            x_best, acc, _, x_best_adv, iters = self._single_run(x[index], y_sub, y_sub, loss_fn, rng,
                                                                 hook if track else None)
            iterations[index] += iters
            broken = ~acc
            x_out[index[broken]] = x_best_adv[broken]
            robust[index[broken]] = False
            # never broken so far: keep the highest-loss point of the run with the highest untargeted DLR
            keep = acc
            if keep.any():
                obj = dlr_loss(scale_logits(self._forward_real(x_best[keep]), temp), y_sub[keep])
                better = obj > best_obj[index[keep]]
                sel = index[keep][better]
                x_out[sel] = x_best[keep][better]
                best_obj[sel] = obj[better]
        if "iterations" not in state:
            state["iterations"] = torch.zeros_like(iterations)
        state["iterations"] += iterations
        return x_out, curve
