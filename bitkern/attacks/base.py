"""Base class shared by all attacks (torchattacks-style ``atk(x, y) -> x_adv``).

Conventions (documented in docs/robustness.md):
* inputs and outputs are images in [0, 1]; budgets are L-inf radii in the same units (8/255 = 8 pixels);
* the attack runs the model in eval mode with parameter gradients off and restores every module's
  train/eval flag and every parameter's ``requires_grad`` afterwards, even on exception;
* gradients come from the model's own autograd (for bitkern models: the training STE) unless a
  ``surrogate`` is given (see bitkern.attacks.surrogate);
* randomness comes from the attack's own CPU ``torch.Generator`` seeded with ``seed``; the global RNG is
  never touched. The generator is a stream: call ``manual_seed`` to restart it. With
  ``run(..., example_seeds=s)`` every random draw for example i comes instead from its own counter-based
  stream keyed by (s[i], restart, draw counter) (bitkern.attacks._rng), so per-example results do not
  depend on how examples are batched;
* the step direction is ``torch.sign(grad)`` (a zero gradient does not move the input).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import module_device
from ._rng import ExampleRNG, GeneratorRNG, check_example_seeds
from ._validate import check_inputs, check_int, check_labels_fit
from .surrogate import Surrogate


@dataclass
class AttackOutput:
    """Everything one ``Attack.run`` call measured.

    x_adv:        [B, ...] the strongest iterate per example over restarts (detached, in [0, 1]).
    correct:      bool [R, B] per restart: prediction == true label (targeted without ``target_map``:
                  prediction != target, i.e. "the attack failed").
    objective:    float [R, B] attack objective at the final iterate of each restart (real model).
    best_restart: long [B] which restart x_adv comes from.
    curves:       bool [R, T+1, B] ``correct`` after 0..T iterations (``record=True`` only), else None.
    queries:      long [B] model forward calls the attack spent per example, over all restarts (query-based
                  attacks such as Square; else None).
    iterations:   long [B] iterations spent per example, summed over restarts: APGD / APGD-T count the
                  iterations until the first success in each restart (all of them when none), Square the
                  query iterations run (early stop); examples misclassified at x count 0. Else None.
    """

    x_adv: torch.Tensor
    correct: torch.Tensor
    objective: torch.Tensor
    best_restart: torch.Tensor
    curves: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    iterations: torch.Tensor | None = None


@contextlib.contextmanager
def frozen_state(models, mode: str = "eval"):
    """Set models to eval mode (mode="eval") with parameters frozen; restore all flags afterwards."""
    saved_training, saved_grad = [], []
    for model in models:
        if model is None:
            continue
        saved_training.extend((m, m.training) for m in model.modules())
        saved_grad.extend((p, p.requires_grad) for p in model.parameters())
    try:
        for model in models:
            if model is None:
                continue
            if mode == "eval":
                model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        yield
    finally:
        for module, flag in saved_training:
            module.training = flag
        for param, flag in saved_grad:
            param.requires_grad_(flag)


def select_strongest(advs, success, objective):
    """Per example, the restart that succeeded, ties broken by the highest objective.

    advs [R, B, ...], success bool [R, B], objective [R, B] -> (x_adv [B, ...], restart index [B]).
    """
    objective = torch.nan_to_num(objective.float(), nan=-1e30, neginf=-1e30, posinf=1e30)
    among_success = torch.where(success, objective, torch.full_like(objective, -float("inf")))
    best = torch.where(success.any(dim=0), among_success.argmax(dim=0), objective.argmax(dim=0))
    return advs[best, torch.arange(advs.shape[1], device=advs.device)].detach(), best


class Attack:
    """One attack = a model + a threat model. Subclasses implement ``_perturb`` for one restart."""

    #: True when two runs with different seeds can differ (then evaluations repeat it over restarts).
    stochastic: bool = False
    #: True when the attack follows input gradients (only these take ``surrogate``).
    uses_gradients: bool = True

    def __init__(self, model: nn.Module, *, targeted: bool = False, target_map=None, seed: int = 0,
                 surrogate=None, model_mode: str = "eval"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(targeted, bool):
            raise TypeError(f"targeted must be a bool, got {type(targeted).__name__}")
        if target_map is not None and not callable(target_map):
            raise TypeError("target_map must be a callable (x, y) -> target labels, or None")
        if model_mode not in ("eval", "keep"):
            raise ValueError(f"model_mode must be 'eval' or 'keep', got {model_mode!r}")
        self.model = model
        self.targeted = targeted
        self.target_map = target_map
        self.model_mode = model_mode
        self.seed = check_int(seed, "seed", 0)
        self.surrogate = Surrogate(surrogate)
        if surrogate is not None and not self.uses_gradients:
            raise ValueError(f"{type(self).__name__} uses no gradients, so surrogate must be None")
        self.restarts = 1
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self._example_rng = None

    # ----------------------------------------------------------------- public API
    @property
    def name(self) -> str:
        return type(self).__name__

    def params(self) -> dict:
        """The threat model as plain JSON-able values (used in result files)."""
        return {"targeted": self.targeted, "seed": self.seed, "surrogate": self.surrogate.describe()}

    def manual_seed(self, seed: int) -> "Attack":
        self.generator.manual_seed(check_int(seed, "seed", 0))
        return self

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(x, y).x_adv

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    def run(self, x: torch.Tensor, y: torch.Tensor, *, restarts: int | None = None, record: bool = False,
            callback=None, example_seeds: torch.Tensor | None = None) -> AttackOutput:
        """Attack a batch; ``y`` are true labels (targets when targeted without ``target_map``).

        restarts: independent restarts (default: the attack's own ``restarts``); per example the
            strongest restart is kept: a successful one first, then the highest objective.
        record:   also return correctness after every iteration (accuracy-vs-iteration curves).
        callback: optional ``callback(restart, step, x_t, correct_t)`` after every iteration.
        example_seeds: optional int64 [B] seeds >= 0. When given, all randomness for example i (random
            starts, noise, Square's positions and signs; restart r = 0..R-1) derives only from
            (example_seeds[i], r, draw counter), never from the batch or the attack's generator (which is
            not advanced): splitting or permuting a batch gives bit-identical per-example results, given a
            per-example deterministic model. None: the attack's generator stream (batch-dependent).
        """
        x, y = check_inputs(x, y)
        seeds = check_example_seeds(example_seeds, x.shape[0])
        restarts = self.restarts if restarts is None else check_int(restarts, "restarts", 1)
        device = module_device(self.model, x.device)
        x, y = x.to(device), y.to(device)
        seeds = None if seeds is None else seeds.to(device)
        true_labels, labels = self._labels(x, y)

        try:
            with frozen_state(self._models(), self.model_mode):
                clean_logits = self._forward_real(x)
                check_labels_fit(y, clean_logits.shape[1])
                check_labels_fit(labels, clean_logits.shape[1], "target labels")
                state = self._prepare(x, labels)
                state.setdefault("clean_logits", clean_logits)
                state.setdefault("true_labels", true_labels)
                advs, corrects, objectives, curves = [], [], [], []
                for r in range(restarts):
                    self._example_rng = None if seeds is None else ExampleRNG(seeds, r)
                    track = record or callback is not None
                    x_adv, curve = self._perturb(x, labels, state, track=track,
                                                 on_step=self._step_hook(r, callback, true_labels))
                    x_adv = self._project(x_adv, x).detach()
                    logits = self._forward_real(x_adv)
                    correct = self._correct(logits, true_labels, labels)
                    if track:
                        curve = (curve or []) + [correct]
                        if callback is not None:
                            callback(r, len(curve) - 1, x_adv, correct)
                    advs.append(x_adv)
                    corrects.append(correct)
                    objectives.append(self._objective(logits, labels, state, real=True).detach())
                    if record:
                        curves.append(torch.stack(curve))
        finally:
            self._example_rng = None
        correct, objective = torch.stack(corrects), torch.stack(objectives)
        x_best, best = select_strongest(torch.stack(advs), ~correct, objective)
        return AttackOutput(x_adv=x_best, correct=correct, objective=objective,
                            best_restart=best, curves=torch.stack(curves) if record else None,
                            queries=state.get("queries"), iterations=state.get("iterations"))

    # ----------------------------------------------------------------- subclass hooks
    def _perturb(self, x, labels, state, *, track: bool, on_step):
        """One restart: return (x_adv, list of bool [B] correctness per iteration before the last)."""
        raise NotImplementedError

    def _prepare(self, x, labels) -> dict:
        """Per-batch state computed once before the restarts (e.g. clean predictions for TPGD)."""
        return {}

    def _objective(self, logits, labels, state, real: bool):
        """Per-example objective the attack ascends (targeted: minus the loss to the target)."""
        ce = F.cross_entropy(logits, labels, reduction="none")
        return -ce if self.targeted else ce

    @property
    def eps(self) -> float | None:
        return getattr(self, "_eps", None)

    # ----------------------------------------------------------------- helpers
    def _models(self):
        return [self.model, self.surrogate.model]

    def _labels(self, x, y):
        """(true labels or None, labels the objective uses)."""
        if not self.targeted:
            return y, y
        if self.target_map is None:
            return None, y
        targets = self.target_map(x, y)
        if not isinstance(targets, torch.Tensor) or targets.shape != y.shape:
            raise ValueError(f"target_map must return a label tensor of shape {tuple(y.shape)}")
        return y, targets.to(y.device).long()

    def _correct(self, logits, true_labels, labels):
        pred = logits.argmax(dim=1)
        if true_labels is not None:
            return pred == true_labels
        return pred != labels

    @torch.no_grad()
    def _forward_real(self, x):
        return self.model(x)

    def _project(self, x_adv, x):
        eps = self.eps
        if eps is not None:
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        return x_adv.clamp(0.0, 1.0)

    def _rng(self, batch: int, device):
        """This restart's random source for a batch: the per-example streams when ``run`` got
        ``example_seeds``, else the attack's generator (same interface, see bitkern.attacks._rng)."""
        rng = getattr(self, "_example_rng", None)
        if rng is not None:
            if rng.batch != batch:
                raise RuntimeError(f"per-example RNG holds {rng.batch} examples, asked for {batch}")
            return rng
        return GeneratorRNG(self.generator, batch, device)

    def _noise_uniform(self, like, low, high):
        if getattr(self, "_example_rng", None) is not None:
            u = self._rng(like.shape[0], like.device).uniform(like.shape[1:], dtype=like.dtype)
            return (u * (high - low) + low).to(like.device)
        u = torch.rand(like.shape, generator=self.generator, dtype=like.dtype)
        return (u * (high - low) + low).to(like.device)

    def _noise_normal(self, like):
        if getattr(self, "_example_rng", None) is not None:
            return self._rng(like.shape[0], like.device).normal(like.shape[1:], dtype=like.dtype).to(like.device)
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype).to(like.device)

    def _input_grad(self, x_t, labels, state):
        """Gradient of the objective w.r.t. the input, and the real-model logits if they came for free.

        A model whose output does not depend on its input (fully masked gradient) gives a zero
        gradient rather than an autograd error, so that the sanity report can flag it.
        """
        x_t = x_t.detach().requires_grad_(True)
        grad_model = self.surrogate.model or self.model
        with torch.enable_grad(), self.surrogate.context():
            logits = grad_model(x_t)
            loss = self._objective(logits, labels, state, real=False).sum()
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss, x_t, allow_unused=True)
            else:
                grad = None
        if grad is None:
            grad = torch.zeros_like(x_t)
        # An STE switch changes only the backward pass, so its forward logits are the real ones.
        same_forward = self.surrogate.spec is None or isinstance(self.surrogate.spec, str)
        real_logits = logits.detach() if same_forward else None
        return grad.detach(), real_logits

    def _step_hook(self, restart, callback, true_labels):
        def hook(step, x_t, logits, labels, correct=None):
            if correct is None:
                if logits is None:
                    logits = self._forward_real(x_t)
                correct = self._correct(logits, true_labels, labels)
            if callback is not None:
                callback(restart, step, x_t, correct)
            return correct
        return hook

    def _iterate(self, x, x0, labels, state, *, alpha, steps, track, on_step):
        """Signed-gradient ascent with projection onto the eps-ball and [0, 1] (FGSM/BIM/PGD/TPGD)."""
        x_t = self._project(x0, x).detach()
        curve = [] if track else None
        for step in range(steps):
            grad, logits = self._input_grad(x_t, labels, state)
            if track:
                curve.append(on_step(step, x_t, logits, labels))
            x_t = self._project(x_t + alpha * grad.sign(), x).detach()
        return x_t, curve
