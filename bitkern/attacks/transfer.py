"""Transfer (black-box) attack: craft on a source model, evaluate on the target."""
from __future__ import annotations

import copy

import torch.nn as nn

import torch

from .._checks import module_device
from ._rng import check_example_seeds, restart_seeds
from ._validate import check_int
from .base import Attack, AttackOutput, frozen_state, select_strongest


class Transfer(Attack):
    """Run ``attack``'s threat model against ``source_model`` and hand the result to the target.

    ``attack`` is any Attack; a shallow copy rebound to ``source_model`` does the crafting, so the
    caller's attack object is left untouched. Restarts are selected with the source model's objective
    (the attacker never queries the target); ``run().correct`` is measured on ``target_model`` when
    given, else on the source (curves always on the source). ``bitkern.eval.robustness`` re-measures
    the returned x_adv on the evaluated model.
    """

    def __init__(self, source_model: nn.Module, attack: Attack, target_model: nn.Module | None = None):
        if not isinstance(attack, Attack) or isinstance(attack, Transfer):
            raise TypeError(f"attack must be a (non-Transfer) bitkern Attack, got {type(attack).__name__}")
        if target_model is not None and not isinstance(target_model, nn.Module):
            raise TypeError(f"target_model must be an nn.Module or None, got {type(target_model).__name__}")
        super().__init__(source_model, targeted=attack.targeted, target_map=attack.target_map,
                         seed=attack.seed, model_mode=attack.model_mode)
        self.inner = copy.copy(attack)
        self.inner.model = source_model
        self.inner.generator = _clone_generator(attack.generator)  # independent stream
        self.target_model = target_model
        self.restarts = attack.restarts

    uses_gradients = False  # its own; the inner attack carries any surrogate

    @property
    def stochastic(self) -> bool:
        return self.inner.stochastic

    @property
    def eps(self):
        return self.inner.eps

    @property
    def name(self) -> str:
        return f"Transfer({self.inner.name})"

    def params(self) -> dict:
        return {"source": type(self.model).__name__, "attack": self.inner.name, **self.inner.params()}

    def manual_seed(self, seed: int) -> "Transfer":
        self.inner.manual_seed(seed)
        return self

    def run(self, x, y, *, restarts=None, record=False, callback=None, example_seeds=None):
        restarts = self.restarts if restarts is None else check_int(restarts, "restarts", 1)
        seeds = check_example_seeds(example_seeds, x.shape[0])
        outs = [self.inner.run(x, y, restarts=1, record=record, callback=callback,
                               example_seeds=None if seeds is None else restart_seeds(seeds, r))
                for r in range(restarts)]
        advs = torch.stack([o.x_adv for o in outs])
        source_correct = torch.cat([o.correct for o in outs])
        objective = torch.cat([o.objective for o in outs])
        x_adv, best = select_strongest(advs, ~source_correct, objective)
        correct = source_correct
        if self.target_model is not None:
            device = module_device(self.target_model, x_adv.device)
            true_labels, labels = self._labels(x.to(device), y.to(device).long())
            with frozen_state([self.target_model], self.model_mode), torch.no_grad():
                correct = torch.stack([
                    self._correct(self.target_model(a.to(device)), true_labels, labels).to(x_adv.device)
                    for a in advs])
        curves = torch.cat([o.curves for o in outs]) if record else None
        return AttackOutput(x_adv=x_adv, correct=correct, objective=objective, best_restart=best,
                            curves=curves)


def _clone_generator(gen):
    clone = type(gen)(device=gen.device)
    clone.set_state(gen.get_state())
    return clone

