"""Training: one loop (``fit``) with pluggable recipes (natural, fastat, pgd, bim, free, dq, odgq)."""
from .loop import KILL_ENV, TrainResult, fit
from .recipes import RECIPES, Recipe, StepContext, lipschitz_penalty, make_recipe, mmd_gaussian
from .schedules import SCHEDULES, lr_at

__all__ = ["fit", "TrainResult", "KILL_ENV", "RECIPES", "Recipe", "StepContext",
           "make_recipe", "mmd_gaussian", "lipschitz_penalty", "SCHEDULES", "lr_at"]
