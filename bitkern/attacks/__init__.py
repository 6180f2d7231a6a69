"""Adversarial attacks on inputs in [0, 1] (torchattacks-style: ``atk = PGD(model, ...); x_adv = atk(x, y)``).

GN, FGSM, PGD, BIM, TPGD, APGD, APGDT, Square and Transfer share one base class
(bitkern.attacks.base.Attack); see docs/robustness.md for the exact formulas and conventions.
"""
from ..ops import STE_MODES, ste_mode  # the STE surrogates `surrogate=` accepts
from ._validate import parse_eps
from .apgd import APGD, APGDT, apgd_checkpoints
from .base import Attack, AttackOutput, frozen_state, select_strongest
from .fgsm import FGSM
from .noise import GN
from .pgd import BIM, PGD
from .square import Square, square_p_selection, square_size
from .surrogate import Surrogate
from .tpgd import TPGD
from .transfer import Transfer

__all__ = ["APGD", "APGDT", "Attack", "AttackOutput", "BIM", "FGSM", "GN", "PGD", "STE_MODES", "Square",
           "Surrogate", "TPGD", "Transfer", "apgd_checkpoints", "frozen_state", "parse_eps", "select_strongest",
           "square_p_selection", "square_size", "ste_mode"]
