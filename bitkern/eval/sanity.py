"""Computed sanity checks for a robustness evaluation (Carlini et al. 2019, "On evaluating
adversarial robustness", Sec. 5 checklist). Every check returns passed True/False (None = skipped)
plus the numbers it used, so a reader can judge it."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..attacks import FGSM, GN, PGD
from ..attacks.base import frozen_state

# Thresholds (documented in docs/robustness.md).
MAX_ZERO_GRAD_EXAMPLES = 0.05   # fraction of examples whose whole input gradient is exactly 0
MAX_ZERO_GRAD_ELEMENTS = 0.50   # fraction of input gradient elements exactly 0
LARGE_EPS_MAX_ACC = 5.0         # accuracy (%) PGD must reach at a huge budget
# PGD++ (Gupta & Ajanthan, AAAI 2022): logits / T before the loss. T < 1 sharpens a flat softmax, T > 1
# un-saturates one whose cross-entropy gradient vanished (the usual failure of binary networks).
PGD_TEMPERATURES = (0.1, 10.0, 100.0)


def check(name, passed, numbers=None, message=""):
    return {"name": name, "passed": None if passed is None else bool(passed),
            "numbers": numbers or {}, "message": message}


def tolerance_pp(n: int, tol_pp: float) -> float:
    """A rise is tolerated up to tol_pp or 2 examples, whichever is larger (small subsets are noisy)."""
    return max(tol_pp, 200.0 / max(n, 1))


def zero_gradient_check(model, x, y):
    with frozen_state([model]), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(xg), y, reduction="sum")
        grad = torch.autograd.grad(loss, xg, allow_unused=True)[0] if loss.requires_grad else None
    if grad is None:
        grad = torch.zeros_like(x)
    zero = grad == 0
    elem = float(zero.float().mean())
    examples = float(zero.flatten(1).all(dim=1).float().mean())
    passed = examples <= MAX_ZERO_GRAD_EXAMPLES and elem <= MAX_ZERO_GRAD_ELEMENTS
    return check("zero_input_gradient", passed,
                 {"zero_element_fraction": elem, "zero_example_fraction": examples},
                 "" if passed else "input gradients are (mostly) exactly zero: gradient masking; "
                 "attack with a surrogate (BPDA) before trusting the numbers")


def layer_zero_gradients(model, x, y) -> dict:
    """Fraction of exactly-zero loss gradient at the input of each leaf layer, grouped by layer class.

    Binary layers pass gradient only inside their STE window; a class near 1.0 is where the signal dies.
    """
    saved, hooks = [], []

    def keep_input(module, inputs):
        t = inputs[0] if inputs else None
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.retain_grad()
            saved.append((type(module).__name__, t))

    for module in model.modules():
        if next(module.children(), None) is None:
            hooks.append(module.register_forward_pre_hook(keep_input))
    try:
        with frozen_state([model]), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(model(xg), y, reduction="sum")
            if loss.requires_grad:
                loss.backward()
    finally:
        for h in hooks:
            h.remove()
    zeros, totals = {}, {}
    for name, t in saved:
        g = t.grad if t.grad is not None else torch.zeros_like(t)
        zeros[name] = zeros.get(name, 0) + int((g == 0).sum())
        totals[name] = totals.get(name, 0) + g.numel()
    return {name: zeros[name] / totals[name] for name in sorted(totals)}


def temperature_check(model, x, y, *, eps, alpha, steps, seed, temperatures=PGD_TEMPERATURES, tol_pp=1.0):
    """PGD vs PGD++ (temperature-scaled logits): a large gap means the plain CE gradient was masked."""
    n = int(x.shape[0])
    base = float(_pgd(model, x, y, eps, alpha, steps, seed).correct.float().mean() * 100)
    accs = {}
    for t in temperatures:
        out = _pgd(model, x, y, eps, alpha, steps, seed, temperature=float(t))
        accs[f"T={t:g}"] = float(out.correct.float().mean() * 100)
    best = min(accs.values())
    gap = base - best
    tol = tolerance_pp(n, tol_pp)
    return check("pgd_vs_pgd_plus_plus", gap <= tol,
                 {"pgd_acc": base, **{f"pgd++_{k}_acc": v for k, v in accs.items()}, "gap_pp": gap,
                  "tolerance_pp": tol},
                 "" if gap <= tol else f"temperature-scaled PGD is {gap:.1f} pp stronger than PGD: the plain "
                 "gradient is masked (saturated softmax or STE); trust the stronger numbers")


def curve_check(name, mean_curve, worst_curve, n, tol_pp):
    """Accuracy must not rise with more iterations (beyond noise)."""
    tol = tolerance_pp(n, tol_pp)
    rises = {}
    for label, curve in (("mean", mean_curve), ("worst", worst_curve)):
        c = np.asarray(curve, dtype=np.float64)
        rises[f"max_rise_{label}_pp"] = float((c - np.minimum.accumulate(c)).max()) if c.size else 0.0
    passed = all(v <= tol for v in rises.values())
    return check(name, passed, {**rises, "tolerance_pp": tol,
                                "first_pp": float(mean_curve[0]), "last_pp": float(mean_curve[-1])},
                 "" if passed else "accuracy rises with more iterations: step size too large or "
                 "noisy/obfuscated gradients")


def ordering_check(name, strong_acc, weak_acc, n, tol_pp, strong="pgd", weak="other"):
    tol = tolerance_pp(n, tol_pp)
    passed = strong_acc <= weak_acc + tol
    return check(name, passed, {f"{strong}_acc": strong_acc, f"{weak}_acc": weak_acc, "tolerance_pp": tol},
                 "" if passed else f"{weak} is stronger than {strong}: the gradient attack is not working")


def _accuracy(model, x_adv, y):
    with frozen_state([model]), torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean() * 100.0)


def _pgd(model, x, y, eps, alpha, steps, seed, restarts=1, record=False, temperature=1.0):
    atk = PGD(model, eps, alpha, steps, random_start=True, seed=seed, temperature=temperature)
    return atk.run(x, y, restarts=restarts, record=record)


def sanity_report(model, x, y, *, eps, alpha, steps, restarts=2, seed=0, transfer=None,
                  eps_factors=(1, 4, 16), large_eps=0.5, tol_pp=1.0, masking=True) -> dict:
    """Run the computed checks on (x, y) (a subset: this costs ~ (restarts + 5) PGD runs).

    eps/alpha/steps: the main PGD threat model. transfer: optional Transfer attack (white-box must be
    at least as strong). masking: also PGD vs PGD++ (temperature-scaled logits) and the zero-gradient
    fraction per layer class. Returns {"passed", "n_examples", "checks": [...]}.
    """
    n = int(x.shape[0])
    checks = [zero_gradient_check(model, x, y)]
    steps = max(int(steps), 1)
    if masking:
        checks[0]["numbers"]["per_layer_class"] = layer_zero_gradients(model, x, y)
        checks.append(temperature_check(model, x, y, eps=eps, alpha=alpha, steps=steps, seed=seed,
                                        tol_pp=tol_pp))

    out = _pgd(model, x, y, eps, alpha, steps, seed, restarts=restarts, record=True)
    curves = out.curves.float()                                   # [R, T+1, N]
    mean_curve = (curves.mean(dim=2).mean(dim=0) * 100).tolist()
    worst_curve = (out.curves.all(dim=0).float().mean(dim=1) * 100).tolist()
    checks.append(curve_check("iterations_non_increasing", mean_curve, worst_curve, n, tol_pp))
    pgd_acc = float(out.correct.float().mean() * 100)

    # accuracy must fall towards 0 as the budget grows
    runs = []                                                    # (budget, step size, steps)
    for k in eps_factors:
        b = min(1.0, k * eps)
        if b > 0 and all(b != r[0] for r in runs):
            runs.append((b, min(1.0, alpha * k), steps))
    if not runs or large_eps > runs[-1][0]:
        big_steps = max(steps, 10)
        runs.append((float(large_eps), 2.5 * float(large_eps) / big_steps, big_steps))
    budgets = [r[0] for r in runs]
    accs = [float(_pgd(model, x, y, b, a, t, seed + 1).correct.float().mean() * 100) for b, a, t in runs]
    tol = tolerance_pp(n, tol_pp)
    rise = float(max((np.asarray(accs) - np.minimum.accumulate(accs)).max(), 0.0))
    passed = rise <= tol and accs[-1] <= LARGE_EPS_MAX_ACC
    checks.append(check("accuracy_falls_with_eps", passed,
                        {"eps_255": [b * 255 for b in budgets], "acc": accs, "max_rise_pp": rise,
                         "max_acc_at_largest_eps": LARGE_EPS_MAX_ACC},
                        "" if passed else "accuracy does not fall to ~0 as eps grows: masked gradients "
                        "or a broken attack"))

    fgsm_acc = _accuracy(model, FGSM(model, eps)(x, y), y)
    gn_acc = _accuracy(model, GN(model, std=eps, eps=eps, seed=seed)(x, y), y)
    checks.append(ordering_check("pgd_at_least_fgsm", pgd_acc, fgsm_acc, n, tol_pp, "pgd", "fgsm"))
    checks.append(ordering_check("pgd_at_least_noise", pgd_acc, gn_acc, n, tol_pp, "pgd", "gn"))
    if transfer is not None:
        transfer.manual_seed(seed)
        t_acc = _accuracy(model, transfer(x, y).to(x.device), y)
        checks.append(ordering_check("whitebox_at_least_transfer", pgd_acc, t_acc, n, tol_pp,
                                     "whitebox", "transfer"))
    else:
        checks.append(check("whitebox_at_least_transfer", None, message="skipped: no Transfer attack given"))
    return {"passed": all(c["passed"] is not False for c in checks), "n_examples": n,
            "threat_model": {"eps": eps, "alpha": alpha, "steps": steps, "restarts": restarts},
            "checks": checks}
