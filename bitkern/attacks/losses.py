"""Per-example attack losses (one place for PGD, BIM, APGD, APGD-T and Square).

* ``cross_entropy``: CE(z, y).
* ``dlr_loss`` (Croce & Hein, ICML 2020, Eq. 5; auto-attack ``dlr_loss``):
  ``-(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3 + 1e-12)`` with z sorted decreasingly (needs >= 3 classes).
* ``dlr_loss_targeted`` (auto-attack ``dlr_loss_targeted``):
  ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` (needs >= 4 classes).
* ``cw_loss`` (Carlini & Wagner 2017 margin, no kappa clamp so the gradient never vanishes):
  ``max_{j!=y} z_j - z_y`` (> 0 iff misclassified).
* ``margin`` (Square's ``margin_and_loss``): ``z_y - max_{j!=y} z_j`` (minimised by Square).
* temperature (PGD++, Gupta & Ajanthan, AAAI 2022): the logits are divided by ``T`` before the loss;
  ``T == 1`` leaves them untouched (bit for bit).

Every loss returns a float tensor [B]; the attack *ascends* ``attack_objective``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_positive

LOSSES = ("ce", "dlr", "cw")


def check_loss(loss, allowed=LOSSES) -> str:
    if not isinstance(loss, str) or loss not in allowed:
        raise ValueError(f"loss must be one of {allowed}, got {loss!r}")
    return loss


def check_temperature(temperature) -> float:
    return check_positive(temperature, "temperature")


def scale_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits / T (PGD++); returned unchanged for T == 1."""
    return logits if temperature == 1.0 else logits / temperature


def _need_classes(logits, k, name):
    if logits.shape[1] < k:
        raise ValueError(f"{name} needs at least {k} classes, the model outputs {logits.shape[1]}")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference-of-logits-ratio loss (exactly auto-attack's ``dlr_loss``)."""
    _need_classes(logits, 3, "the DLR loss")
    x_sorted, ind_sorted = logits.sort(dim=1)
    ind = (ind_sorted[:, -1] == y).float()
    u = torch.arange(logits.shape[0], device=logits.device)
    return -(logits[u, y] - x_sorted[:, -2] * ind - x_sorted[:, -1] * (1.0 - ind)) / (
        x_sorted[:, -1] - x_sorted[:, -3] + 1e-12)


def dlr_loss_targeted(logits: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss (exactly auto-attack's ``dlr_loss_targeted``); y true, y_target target labels."""
    _need_classes(logits, 4, "the targeted DLR loss")
    x_sorted, _ = logits.sort(dim=1)
    u = torch.arange(logits.shape[0], device=logits.device)
    return -(logits[u, y] - logits[u, y_target]) / (
        x_sorted[:, -1] - 0.5 * (x_sorted[:, -3] + x_sorted[:, -4]) + 1e-12)


def _max_other(logits, y):
    onehot = F.one_hot(y, logits.shape[1]).bool()
    return logits.masked_fill(onehot, -float("inf")).max(dim=1)[0]


def cw_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin max_{j!=y} z_j - z_y (ascended by untargeted attacks)."""
    _need_classes(logits, 2, "the CW loss")
    return _max_other(logits, y) - logits.gather(1, y[:, None])[:, 0]


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j!=y} z_j: <= 0 iff misclassified (Square's margin, minimised)."""
    return -cw_loss(logits, y)


def attack_objective(loss: str, logits: torch.Tensor, labels: torch.Tensor, *, targeted: bool = False,
                     true_labels: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """The per-example objective an attack ascends.

    untargeted: CE(z/T, y), DLR(z/T, y) or CW(z/T, y) with ``labels`` = y.
    targeted (``labels`` = targets t): -CE(z/T, t), targeted DLR(z/T, y_true, t) (``true_labels`` needed;
    callers pass the clean prediction when the true label is unknown), or -CW(z/T, t) = z_t - max_{j!=t} z_j.
    """
    z = scale_logits(logits, temperature)
    if not targeted:
        if loss == "ce":
            return cross_entropy(z, labels)
        if loss == "dlr":
            return dlr_loss(z, labels)
        if loss == "cw":
            return cw_loss(z, labels)
    else:
        if loss == "ce":
            return -cross_entropy(z, labels)
        if loss == "dlr":
            if true_labels is None:
                raise ValueError("the targeted DLR loss needs the true (or predicted) labels")
            return dlr_loss_targeted(z, true_labels, labels)
        if loss == "cw":
            return -cw_loss(z, labels)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
