"""Training recipes: how one batch becomes one (or, for Free AT, m) optimizer steps.

Every recipe works with any model (any quant spec): it only needs ``model(x) -> logits``; ODG-Q also
needs ``model.forward_features(x)`` (and uses ``model.fc`` when present, to avoid a second forward).
The training-time perturbations live here (not in bitkern.attacks) because they are part of the
optimisation: FastAT's random start, Free AT's persistent perturbation, ODG-Q's global set P.

Perturbation sizes are in input units ([0, 1] images): eps = 8/255 means 8 pixel levels.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import parse_quant
from .._checks import int_in

__all__ = ["Recipe", "RECIPES", "make_recipe", "mmd_gaussian", "lipschitz_penalty", "StepContext"]

DEFAULT_EPS = 8 / 255


class StepContext:
    """What a recipe may do with the model: forward it, and take optimizer steps.

    ``step(loss)`` zeroes gradients, back-propagates (input tensors with requires_grad receive .grad
    too), sets the scheduled learning rate and steps the optimizer.
    ``model``: the training forward (under DistributedDataParallel, the DDP wrapper, whose backward
    averages the gradients over ranks); ``module``: the model itself, for passes that only need input
    gradients (attack steps) or attributes; ``call(fn, *xs)`` runs ``fn(module, *xs)`` as one training
    forward (through DDP when wrapped); ``gather(t)``: the whole global batch's rows of a per-example
    tensor (the identity in one process), for losses that couple examples (ODG-Q's MMD).
    """

    def __init__(self, model: nn.Module, step: Callable[[torch.Tensor], None], module: nn.Module | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self.step = step
        self.module = model if module is None else module
        self.gather = gather if gather is not None else (lambda t: t)

    def call(self, fn: Callable, *xs: torch.Tensor):
        if self.model is self.module:
            return fn(self.module, *xs)
        return self.model(*xs, fn=fn)


def _ball(x_adv: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """Project into the l_inf eps-ball around x0 and the valid image range [0, 1]."""
    return torch.min(torch.max(x_adv, x0 - eps), x0 + eps).clamp_(0.0, 1.0)


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the task loss w.r.t. the input only (parameter grads are not accumulated)."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(loss, x)
    return g


class Recipe:
    """Base: natural training (cross-entropy on clean inputs).

    epoch_divisor: the recipe runs ceil(epochs / epoch_divisor) epochs (Free AT: m, ODG-Q: 2), so a
    run is compared with natural training at about the same cost.
    steps_per_batch: optimizer steps per batch (Free AT: m replays).
    """

    name = "natural"
    default_schedule = "cosine"
    epoch_divisor = 1
    steps_per_batch = 1
    # per-position state tensors (attribute name -> the dimension indexed by position in the batch),
    # kept consistent across ranks by the training loop
    position_dims: dict[str, int] = {}

    def __init__(self, eps: float = DEFAULT_EPS, **unknown: Any):
        if unknown:
            accepted = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "unknown")]
            raise ValueError(f"recipe {self.name!r}: unknown argument(s) {sorted(unknown)}; accepted: {accepted}")
        self.eps = _check_budget("eps", eps)
        self.generator = torch.Generator()
        # Set by the training loop under DistributedDataParallel: (lo, hi, B) = this rank trains positions
        # lo..hi-1 of the global batch of B examples. Random draws are made for the whole global batch
        # and sliced, per-position state is indexed at lo..hi-1, so a rank does what the single process
        # does on those positions. None: the whole batch (one process).
        self.batch_slice: tuple[int, int, int] | None = None

    # ---- configuration -------------------------------------------------------------------------
    def args(self) -> dict[str, Any]:
        """JSON-able recipe arguments (saved in checkpoints and results)."""
        return {"eps": self.eps}

    def run_epochs(self, epochs: int) -> int:
        return max(1, math.ceil(epochs / self.epoch_divisor))

    # ---- state for resume ------------------------------------------------------------------------
    def setup(self, batch_shape: tuple[int, ...], device: torch.device | str) -> None:
        """Allocate per-run state given the (full) batch shape [B, C, H, W]."""

    def start_epoch(self, epoch: int, seed: int) -> None:
        # reseeded per epoch from (seed, epoch): a resumed run draws the same random starts
        self.generator.manual_seed(int(seed) * 1_000_003 + int(epoch) * 7919 + 17)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def state_json(self) -> dict[str, Any]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        pass

    # ---- one batch -------------------------------------------------------------------------------
    def train_batch(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor, batch_index: int):
        """Return (loss as float, logits on the trained inputs, detached) after stepping."""
        logits = ctx.model(x)
        loss = F.cross_entropy(logits, y)
        ctx.step(loss)
        return float(loss.detach()), logits.detach()

    def _uniform(self, like: torch.Tensor, eps: float) -> torch.Tensor:
        if self.batch_slice is None:
            u = torch.rand(like.shape, generator=self.generator, dtype=like.dtype)
        else:   # the draws of the whole global batch, this rank's positions
            lo, hi, total = self.batch_slice
            u = torch.rand((total, *like.shape[1:]), generator=self.generator, dtype=like.dtype)[lo:lo + like.shape[0]]
        return ((2.0 * u - 1.0) * eps).to(like.device)

    def _positions(self, b: int) -> slice:
        """Positions of this batch's b examples in per-position state ([:b] in one process)."""
        lo = 0 if self.batch_slice is None else self.batch_slice[0]
        return slice(lo, lo + b)


def _check_nonneg(name: str, value, maximum: float = math.inf, positive: bool = False) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            or (positive and value == 0) or value > maximum):
        bound = "> 0" if positive else ">= 0"
        bound += "" if maximum == math.inf else f" and <= {maximum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_budget(name: str, value, positive: bool = False) -> float:
    """A perturbation size in input units: inputs are [0, 1] images, so at most 1 (8/255, not 8)."""
    return _check_nonneg(name, value, maximum=1.0, positive=positive)


MAX_INNER_STEPS = 1000  # attack steps / replays / perturbation slots per batch: beyond is a typo, not a plan


def _check_posint(name: str, value) -> int:
    if not int_in(value, 1, MAX_INNER_STEPS):
        raise ValueError(f"{name} must be an int in 1..{MAX_INNER_STEPS}, got {value!r}")
    return value


class Natural(Recipe):
    pass


class FastAT(Recipe):
    """FastAT (Wong, Rice & Kolter 2020): FGSM from a uniform random start in [-eps, eps] with step
    alpha = 1.25 eps, projected to the eps-ball and [0, 1]; trained with the cyclic schedule."""

    name = "fastat"
    default_schedule = "cyclic"

    def __init__(self, eps: float = DEFAULT_EPS, alpha_factor: float = 1.25, **unknown):
        self.alpha_factor = _check_nonneg("alpha_factor", alpha_factor, maximum=10.0, positive=True)
        super().__init__(eps, **unknown)
        self.last_delta: torch.Tensor | None = None  # for tests / inspection

    def args(self):
        return {"eps": self.eps, "alpha_factor": self.alpha_factor}

    def train_batch(self, ctx, x, y, batch_index):
        delta = self._uniform(x, self.eps)
        x_start = (x + delta).clamp(0.0, 1.0)
        g = _input_grad(ctx.module, x_start, y)
        x_adv = _ball(x_start + self.alpha_factor * self.eps * g.sign(), x, self.eps).detach()
        self.last_delta = x_adv - x
        logits = ctx.model(x_adv)
        loss = F.cross_entropy(logits, y)
        ctx.step(loss)
        return float(loss.detach()), logits.detach()


class PGDAT(Recipe):
    """K-step PGD adversarial training (Madry et al. 2018): uniform random start, K signed-gradient
    steps of size alpha (default eps / 4, i.e. 2/255 at eps 8/255), projection after each step."""

    name = "pgd"
    random_start = True

    def __init__(self, eps: float = DEFAULT_EPS, steps: int = 7, alpha: float | None = None, **unknown):
        self.steps = _check_posint("steps", steps)
        super().__init__(eps, **unknown)
        self.alpha = self.eps / 4 if alpha is None else _check_budget("alpha", alpha, positive=True)

    def args(self):
        return {"eps": self.eps, "steps": self.steps, "alpha": self.alpha}

    def perturb(self, model, x, y):
        x_adv = _ball(x + self._uniform(x, self.eps), x, self.eps) if self.random_start else x.clone()
        for _ in range(self.steps):
            g = _input_grad(model, x_adv, y)
            x_adv = _ball(x_adv + self.alpha * g.sign(), x, self.eps)
        return x_adv.detach()

    def train_batch(self, ctx, x, y, batch_index):
        x_adv = self.perturb(ctx.module, x, y)
        logits = ctx.model(x_adv)
        loss = F.cross_entropy(logits, y)
        ctx.step(loss)
        return float(loss.detach()), logits.detach()


class BIMAT(PGDAT):
    """K-step BIM adversarial training: as PGD but starting from the clean input (no random start)."""

    name = "bim"
    random_start = False


class FreeAT(Recipe):
    """Free adversarial training (Shafahi et al. 2019): each batch is replayed m times; every replay
    takes one optimizer step and one eps-sized signed-gradient step on a perturbation that persists
    across replays and batches (it has the batch shape; the last smaller batch uses a slice).
    Runs ceil(epochs / m) epochs."""

    name = "free"

    def __init__(self, eps: float = DEFAULT_EPS, m: int = 4, **unknown):
        self.m = _check_posint("m", m)
        super().__init__(eps, **unknown)
        self.delta: torch.Tensor | None = None

    position_dims = {"delta": 0}

    @property
    def epoch_divisor(self):  # type: ignore[override]
        return self.m

    @property
    def steps_per_batch(self):  # type: ignore[override]
        return self.m

    def args(self):
        return {"eps": self.eps, "m": self.m}

    def setup(self, batch_shape, device):
        if self.delta is None or tuple(self.delta.shape) != tuple(batch_shape):
            self.delta = torch.zeros(batch_shape, device=device)

    def state_tensors(self):
        return {"delta": self.delta} if self.delta is not None else {}

    def load_state(self, tensors, state):
        if "delta" in tensors:
            self.delta = tensors["delta"].clone()

    def train_batch(self, ctx, x, y, batch_index):
        pos = self._positions(x.shape[0])
        loss_sum, logits = 0.0, None
        for _ in range(self.m):
            delta = self.delta[pos].detach().clone().requires_grad_(True)
            out = ctx.model((x + delta).clamp(0.0, 1.0))
            loss = F.cross_entropy(out, y)
            ctx.step(loss)  # one backward: parameter grads for the step, delta.grad for the replay
            self.delta[pos] = (delta.detach() + self.eps * delta.grad.sign()).clamp(-self.eps, self.eps)
            loss_sum += float(loss.detach())
            logits = out.detach()
        return loss_sum / self.m, logits


def _weight_matrices(model: nn.Module):
    """Conv / linear weights as [G, rows, cols] (G = number of weight bases, 1 for plain layers)."""
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.requires_grad or w.dim() < 2:
            continue
        if w.dim() == 5:  # multi-base weights [M, Co, C, KH, KW]: each base on its own
            yield w.reshape(w.shape[0], w.shape[1], -1)
        else:
            yield w.reshape(1, w.shape[0], -1)


def lipschitz_penalty(model: nn.Module) -> torch.Tensor:
    """sum over conv / linear layers of ||W W^T - I||_F^2, W reshaped to [out, in*kh*kw].

    The Gram matrix is taken on the smaller side (W W^T when out <= fan-in, else W^T W) so the target
    (orthonormal rows or columns) is attainable; it is the orthogonality regulariser of Defensive
    Quantization (Lin, Gan & Han 2019).
    """
    total = None
    for w in _weight_matrices(model):
        gram = w @ w.transpose(1, 2) if w.shape[1] <= w.shape[2] else w.transpose(1, 2) @ w
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        term = (gram - eye).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("lipschitz_penalty: the model has no conv / linear weights")
    return total


class DQ(Recipe):
    """Defensive Quantization (Lin et al. 2019): CE + beta * sum ||W W^T - I||^2 (see
    lipschitz_penalty). beta defaults to 3e-4, our choice for ResNet-20 (the penalty sums over ~20
    layers); raise it for a stronger Lipschitz constraint."""

    name = "dq"

    def __init__(self, eps: float = DEFAULT_EPS, beta: float = 3e-4, **unknown):
        self.beta = _check_nonneg("beta", beta)
        super().__init__(eps, **unknown)

    def args(self):
        return {"eps": self.eps, "beta": self.beta}

    def train_batch(self, ctx, x, y, batch_index):
        logits = ctx.model(x)
        loss = F.cross_entropy(logits, y) + self.beta * lipschitz_penalty(ctx.module)
        ctx.step(loss)
        return float(loss.detach()), logits.detach()


def mmd_gaussian(a: torch.Tensor, b: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Biased squared MMD between feature batches a [n, F] and b [m, F] with a sum of Gaussian kernels.

    Bandwidths are base * kernel_mul**i, i = -(kernel_num // 2) .. kernel_num // 2, where base is the
    mean pairwise squared distance of the pooled batch (detached): the multi-kernel MMD of DAN
    (Long et al. 2015), which ODG-Q's MMD loss follows.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"mmd_gaussian: expected [n, F] and [m, F] features, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    n = a.shape[0]
    z = torch.cat([a, b], 0)
    d2 = torch.cdist(z, z).pow(2)
    count = z.shape[0] * (z.shape[0] - 1)
    base = (d2.detach().sum() / max(count, 1)).clamp_min(1e-12)
    k = sum(torch.exp(-d2 / (base * kernel_mul ** i)) for i in range(-(kernel_num // 2), kernel_num // 2 + 1))
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def _features_and_logits(model: nn.Module, x: torch.Tensor):
    feats = model.forward_features(x)
    fc = getattr(model, "fc", None)
    logits = fc(feats) if isinstance(fc, nn.Module) else model(x)
    return feats, logits


def _odgq_forward(model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor):
    """ODG-Q's training forward: features + logits of x_adv, features of x (one DDP forward)."""
    feats_adv, logits = _features_and_logits(model, x_adv)
    return feats_adv, logits, model.forward_features(x)


class ODGQ(Recipe):
    """ODG-Q (Tao & Wong), Algorithm 1 of paper 003.

    A global perturbation set P of shape [N_k, B, C, H, W] (zeros) is kept across batches and epochs,
    indexed by position inside the batch (the last, smaller batch uses a slice). For each batch:
        x_g   = x0 + clip(P[k], -eps, eps)
        g     = grad_x CE(h(x_g), y)
        p_l   = eps_l * sign(g)
        P[k:N_k] += p_l
        x_adv = x_g + clip(p_l, -eps, eps), projected to the eps-ball around x0 and to [0, 1]
        loss  = CE(h(x_adv), y) + lam * MMD(features(x_adv), features(x0))
    with features = model.forward_features (pooled last conv stage); k = (k + 1) mod N_k after each
    epoch; ceil(epochs / 2) epochs are run (two backward passes per batch).

    Defaults: N_k = 4, lam = 3 (the paper's default; the paper uses 0.003 for 1-bit models, which
    ``for_quant`` selects), eps_l = eps / 2 (the paper gives no value; with eps / 2 a single local step
    stays inside the ball while P accumulates the rest across batches).
    """

    name = "odgq"
    epoch_divisor = 2
    position_dims = {"P": 1}

    def __init__(self, eps: float = DEFAULT_EPS, n_k: int = 4, lam: float = 3.0, eps_l: float | None = None,
                 **unknown):
        self.n_k = _check_posint("n_k", n_k)
        self.lam = _check_nonneg("lam", lam)
        super().__init__(eps, **unknown)
        self.eps_l = self.eps / 2 if eps_l is None else _check_budget("eps_l", eps_l, positive=True)
        self.P: torch.Tensor | None = None
        self.k = 0
        self.last_x_adv: torch.Tensor | None = None  # for tests / inspection

    def args(self):
        return {"eps": self.eps, "n_k": self.n_k, "lam": self.lam, "eps_l": self.eps_l}

    def setup(self, batch_shape, device):
        if self.P is None or tuple(self.P.shape[1:]) != tuple(batch_shape):
            self.P = torch.zeros((self.n_k, *batch_shape), device=device)
            self.k = 0

    def start_epoch(self, epoch, seed):
        super().start_epoch(epoch, seed)
        self.k = epoch % self.n_k  # line 13: k = (k + 1) mod N_k after every epoch, from k = 0

    def state_tensors(self):
        return {"P": self.P} if self.P is not None else {}

    def state_json(self):
        return {"k": self.k}

    def load_state(self, tensors, state):
        if "P" in tensors:
            self.P = tensors["P"].clone()
        self.k = int(state.get("k", 0))

    def train_batch(self, ctx, x, y, batch_index):
        pos, k, eps = self._positions(x.shape[0]), self.k, self.eps
        x_g = x + self.P[k, pos].clamp(-eps, eps)                      # lines 4-5
        g = _input_grad(ctx.module, x_g, y)                            # line 6
        p_l = self.eps_l * g.sign()                                    # line 7
        self.P[k:, pos] += p_l                                         # line 8
        x_adv = _ball(x_g + p_l.clamp(-eps, eps), x, eps).detach()     # line 9 (+ valid range)
        self.last_x_adv = x_adv
        feats_adv, logits, feats_nat = ctx.call(_odgq_forward, x_adv, x)  # line 10
        loss = F.cross_entropy(logits, y) + self.lam * mmd_gaussian(ctx.gather(feats_adv), ctx.gather(feats_nat))
        ctx.step(loss)                                                 # line 11
        return float(loss.detach()), logits.detach()

    @staticmethod
    def lam_for_quant(quant: str | None) -> float:
        """The paper's lambda: 0.003 for 1-bit models (the quant scheme says: xnor, pact-w1a1, mbn1x1), else 3
        (also for None or a spec no scheme parses)."""
        try:
            spec = parse_quant(quant)
        except (ValueError, TypeError):
            return 3.0
        return 0.003 if spec.scheme.one_bit(spec) else 3.0


RECIPES: dict[str, type[Recipe]] = {
    "natural": Natural, "fastat": FastAT, "pgd": PGDAT, "bim": BIMAT, "free": FreeAT, "dq": DQ, "odgq": ODGQ,
}


def make_recipe(name: str | Recipe, **args: Any) -> Recipe:
    """Build a recipe by name (natural, fastat, pgd, bim, free, dq, odgq) with its arguments."""
    if isinstance(name, Recipe):
        if args:
            raise ValueError("make_recipe: arguments given together with a Recipe instance")
        return name
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
    return RECIPES[key](**args)
