"""Adversarial attacks on inputs in [0, 1] (torchattacks-style: ``atk = PGD(model, ...); x_adv = atk(x, y)``).

GN, FGSM, PGD, BIM, TPGD and Transfer share one base class (bitkern.attacks.base.Attack); see
docs/robustness.md for the exact formulas and conventions.
"""
from ._validate import parse_eps
from .base import Attack, AttackOutput, frozen_state, select_strongest
from .fgsm import FGSM
from .noise import GN
from .pgd import BIM, PGD
from .surrogate import STE_MODES, Surrogate, ste_mode
from .tpgd import TPGD
from .transfer import Transfer

__all__ = ["Attack", "AttackOutput", "BIM", "FGSM", "GN", "PGD", "STE_MODES", "Surrogate", "TPGD", "Transfer",
           "frozen_state", "parse_eps", "select_strongest", "ste_mode"]
