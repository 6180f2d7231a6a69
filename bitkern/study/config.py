"""The study's configuration: ``SweepConfig`` (what the user asked for, resolved against the dataset's
defaults), its validation, and the small derived quantities every other study module reads (budgets, the
Table 2 budget, PGD step, recipe arguments per spec)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..data import canonical_name
from .defaults import DEFAULT_SPECS, defaults_for

__all__ = ["SweepConfig", "SweepError", "SUITES", "validate", "recipe_args", "eps_key", "budgets",
           "curve_attack", "table_attacks", "parse_attack", "runs", "run_key"]

SUITES = ("standard",)


class SweepError(ValueError):
    """A user-facing problem with the sweep configuration or output directory."""


@dataclass
class SweepConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    arch: str = "resnet20"
    specs: tuple[str, ...] = DEFAULT_SPECS
    recipe: str = "natural"
    recipes: tuple[str, ...] | None = None   # several recipes side by side (one config per spec x recipe);
                                             # None: (recipe,)
    seeds: tuple[int, ...] | None = None     # several training seeds (one config per spec x seed, tables show
                                             # mean and spread); None: (seed,)
    train_samples: int = 0             # > 0: train on a fixed class-balanced subset (data.balanced_subset)
    recipe_args: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None          # None: dataset default (see study.defaults)
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None        # None: the recipe's default
    augment: bool | None = None
    train_eps: float = 8 / 255         # perturbation budget of adversarial recipes
    eval_eps: tuple[float, ...] | None = None   # L-inf budgets; None: dataset default (see study.defaults)
    table_budget: float | None = None  # the budget of the main table; None: the dataset's (see table_eps)
    eval_alpha: float | None = None    # PGD step; None: eps * alpha_ratio per budget
    alpha_ratio: float = 0.25          # paper 000: 0.5/255 at 2/255; paper 003: 4/255 at 8/255 (0.5)
    pgd_steps: tuple[int, ...] = (20, 50)
    attacks: tuple[str, ...] | None = None   # the table budget's attacks (GN, FGSM, PGD-k, BIM-k, TPGD-k);
                                             # None: PGD-k for every k in pgd_steps
    transfer_source: str | None = None # a quant spec: train it naturally once and also run every table attack
                                       # crafted on it against each config (black-box, names "<attack>(B)")
    suite: str | None = None           # "standard": also APGD-CE -> APGD-T -> Square at every budget
    square_queries: int = 5000         # suite: Square's query budget
    apgd_steps: int = 100              # suite: APGD-CE / APGD-T iterations
    apgd_targets: int = 9              # suite: APGD-T target classes (AutoAttack standard: 9)
    restarts: int = 5
    eval_samples: int | None = None    # None: dataset default; 0: the whole test set
    image_size: int = 32               # imagefolder only
    device: str = "cpu"
    seed: int = 0
    out: str = "results/sweep"
    resume: bool = False
    sanity: bool = False               # bitkern.eval sanity report per config (extra attack runs)
    progress: bool | None = None
    preset: str | None = None          # the study preset these options came from (study.presets), recorded
    workers: int | None = 1            # processes running specs side by side; None (the CLI's default):
                                       # one per available CPU core when torch runs single-threaded on the
                                       # CPU, else 1. Results do not depend on it (study.runner).

    def resolved(self) -> "SweepConfig":
        d = defaults_for(self.dataset)
        c = SweepConfig(**{**asdict(self), "specs": tuple(self.specs), "pgd_steps": tuple(self.pgd_steps)})
        c.recipes = tuple(self.recipes) if self.recipes is not None else (self.recipe,)
        c.seeds = tuple(self.seeds) if self.seeds is not None else (self.seed,)
        c.recipe, c.seed = c.recipes[0], c.seeds[0]
        if self.attacks is not None:
            c.attacks = tuple(self.attacks)
        c.dataset = canonical_name(self.dataset)
        for key in ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "augment", "eval_samples"):
            if getattr(c, key) is None:
                setattr(c, key, d[key])
        if c.eval_eps is None:
            c.eval_eps = tuple(e / 255 for e in d["eval_eps"])
        elif isinstance(c.eval_eps, (int, float)):
            c.eval_eps = (float(c.eval_eps),)
        c.eval_eps = tuple(sorted(float(e) for e in c.eval_eps))
        return c

    @property
    def table_eps(self) -> float:
        """The budget Table 2 shows: table_budget if given, else the dataset's (paper 2/255; digits 16/255)
        when it is in the list, else the median of the non-zero budgets."""
        default = (self.table_budget if self.table_budget is not None
                   else defaults_for(self.dataset)["table_eps"] / 255)
        nonzero = budgets(self)
        if not nonzero:
            return 0.0
        if any(abs(e - default) < 1e-9 for e in nonzero):
            return default
        return nonzero[(len(nonzero) - 1) // 2]

    def is_table_eps(self, eps: float) -> bool:
        return abs(eps - self.table_eps) < 1e-12

    def alpha_for(self, eps: float) -> float:
        return self.eval_alpha if self.eval_alpha is not None else eps * self.alpha_ratio

    def for_run(self, recipe: str, seed: int) -> "SweepConfig":
        """The configuration one (spec, recipe, seed) config runs with (recipes / seeds lists kept)."""
        return replace(self, recipe=recipe, seed=seed)

    def identity(self) -> dict[str, Any]:
        """What must match for a saved config result to be reused on resume."""
        keys = ("dataset", "arch", "recipe", "recipe_args", "epochs", "batch_size", "optimizer", "lr",
                "weight_decay", "schedule", "augment", "train_eps", "train_samples", "eval_eps", "table_budget",
                "eval_alpha", "alpha_ratio", "pgd_steps", "attacks", "transfer_source", "restarts",
                "eval_samples", "image_size", "seed", "suite", "square_queries", "apgd_steps", "apgd_targets")
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keys}


def eps_key(eps: float) -> str:
    """A budget as the key of ``row["by_eps"]`` and of file names: its value in /255."""
    return f"{eps * 255:.6g}"


def runs(cfg: SweepConfig) -> list[tuple[str, str, int]]:
    """Every config of the study as (spec, recipe, seed), in table order (``cfg`` resolved)."""
    return [(spec, recipe, seed) for recipe in cfg.recipes for spec in cfg.specs for seed in cfg.seeds]


def run_key(cfg: SweepConfig, spec: str) -> str:
    """A config's name (its directory under configs/): the spec, plus the recipe and the seed where the
    study has several (``cfg`` resolved and set to the config's recipe and seed)."""
    key = spec
    if len(cfg.recipes) > 1:
        key += f"-{cfg.recipe}"
    if len(cfg.seeds) > 1:
        key += f"-seed{cfg.seed}"
    return key


def table_attacks(cfg: SweepConfig) -> tuple[str, ...]:
    """The white-box attacks run at the table budget, by name."""
    return cfg.attacks if cfg.attacks is not None else tuple(f"PGD-{s}" for s in cfg.pgd_steps)


def budgets(cfg: SweepConfig) -> list[float]:
    """The attacked budgets (0 is the clean accuracy, not an attack)."""
    return [e for e in cfg.eval_eps if e > 0]


def curve_attack(cfg: SweepConfig) -> str:
    """The attack run at every budget (the robust-accuracy-vs-eps curve): the shortest PGD."""
    return f"PGD-{min(cfg.pgd_steps)}"


ATTACK_NAMES = ("GN", "FGSM", "PGD-k", "BIM-k", "TPGD-k")


def parse_attack(name: str) -> tuple[str, int]:
    """'PGD-20' -> ('PGD', 20); 'GN' / 'FGSM' -> (name, 1). SweepError for anything else."""
    kind, _, steps = str(name).partition("-")
    if kind in ("GN", "FGSM") and not steps:
        return kind, 1
    if kind in ("PGD", "BIM", "TPGD") and steps.isdigit() and int(steps) >= 1:
        return kind, int(steps)
    raise SweepError(f"unknown attack {name!r}; expected one of {', '.join(ATTACK_NAMES)} (k: iterations)")


def recipe_args(cfg: SweepConfig, spec: str) -> dict[str, Any]:
    args = dict(cfg.recipe_args)
    if cfg.recipe == "odgq" and "lam" not in args:
        from ..train.recipes import ODGQ

        args["lam"] = ODGQ.lam_for_quant(spec)  # paper: 3, and 0.003 for 1-bit models
    return args


def validate(cfg: SweepConfig) -> None:
    """Every configuration mistake, raised as SweepError before any work starts (``cfg`` resolved)."""
    from ..models import ARCHS, parse_quant

    if cfg.arch not in ARCHS:
        raise SweepError(f"unknown arch {cfg.arch!r}; expected one of {', '.join(ARCHS)}")
    if not cfg.specs:
        raise SweepError("no quant specs given")
    for s in cfg.specs:
        try:
            parse_quant(s)
        except (ValueError, TypeError) as e:
            raise SweepError(str(e)) from None
    if len(set(cfg.specs)) != len(cfg.specs):
        raise SweepError(f"duplicate quant specs in {list(cfg.specs)}")
    for key in ("epochs", "batch_size", "restarts"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SweepError(f"{key} must be an integer >= 1, got {v!r}")
    if not cfg.pgd_steps or any(not isinstance(s, int) or s < 1 for s in cfg.pgd_steps):
        raise SweepError(f"pgd steps must be integers >= 1, got {list(cfg.pgd_steps)}")
    if not isinstance(cfg.eval_samples, int) or cfg.eval_samples < 0:
        raise SweepError(f"eval_samples must be an integer >= 0 (0 = whole test set), got {cfg.eval_samples!r}")
    for key in ("lr", "train_eps") + (("eval_alpha",) if cfg.eval_alpha is not None else ()):
        v = getattr(cfg, key)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise SweepError(f"{key} must be a number > 0, got {v!r}")
    if not (isinstance(cfg.weight_decay, (int, float)) and math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise SweepError(f"weight_decay must be a finite number >= 0, got {cfg.weight_decay!r}")
    for key in ("train_eps", "eval_alpha"):
        v = getattr(cfg, key)
        if v is not None and v > 1:
            raise SweepError(f"{key}={v:g} exceeds 1 but inputs are in [0, 1]; give pixel units as a fraction, "
                             f"e.g. 8/255")
    if not cfg.eval_eps or any(not (isinstance(e, float) and 0 <= e <= 1) for e in cfg.eval_eps):
        raise SweepError(f"eval budgets must be numbers in [0, 1] (e.g. 8/255), got {list(cfg.eval_eps)}")
    if len(set(cfg.eval_eps)) != len(cfg.eval_eps):
        raise SweepError(f"repeated eval budget in {list(cfg.eval_eps)}")
    if cfg.table_budget is not None and not any(abs(e - cfg.table_budget) < 1e-9 for e in budgets(cfg)):
        raise SweepError(f"table budget {cfg.table_budget * 255:g}/255 is not one of the eval budgets "
                         f"{', '.join(f'{e * 255:g}/255' for e in budgets(cfg))}")
    for key in ("recipes", "seeds"):
        values = getattr(cfg, key)
        if not values or len(set(values)) != len(values):
            raise SweepError(f"{key} must be a non-empty list without repeats, got {list(values)}")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in cfg.seeds):
        raise SweepError(f"seeds must be integers >= 0, got {list(cfg.seeds)}")
    if not isinstance(cfg.train_samples, int) or isinstance(cfg.train_samples, bool) or cfg.train_samples < 0:
        raise SweepError(f"train_samples must be an integer >= 0 (0 = whole training set), got "
                         f"{cfg.train_samples!r}")
    if not (isinstance(cfg.alpha_ratio, (int, float)) and math.isfinite(cfg.alpha_ratio) and cfg.alpha_ratio > 0):
        raise SweepError(f"alpha_ratio must be a number > 0, got {cfg.alpha_ratio!r}")
    if cfg.attacks is not None:
        if not cfg.attacks or len(set(cfg.attacks)) != len(cfg.attacks):
            raise SweepError(f"attacks must be a non-empty list without repeats, got {list(cfg.attacks)}")
        for a in cfg.attacks:
            parse_attack(a)
    if cfg.transfer_source is not None:
        try:
            parse_quant(cfg.transfer_source)
        except (ValueError, TypeError) as e:
            raise SweepError(f"transfer source: {e}") from None
    if cfg.suite not in (None, *SUITES):
        raise SweepError(f"unknown suite {cfg.suite!r}; expected one of {', '.join(SUITES)}")
    for key in ("square_queries", "apgd_steps", "apgd_targets"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SweepError(f"{key} must be an integer >= 1, got {v!r}")
    if cfg.workers is not None and (not isinstance(cfg.workers, int) or isinstance(cfg.workers, bool)
                                    or cfg.workers < 1):
        raise SweepError(f"workers must be an integer >= 1, got {cfg.workers!r}")
    from ..train import make_recipe

    from ..train import RECIPES

    for recipe in cfg.recipes:  # unknown or bad recipe arguments fail now, not after hours of training
        if recipe not in RECIPES:
            raise SweepError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
        rcfg = cfg.for_run(recipe, cfg.seed)
        for spec in cfg.specs:
            try:
                make_recipe(recipe, **{**recipe_args(rcfg, spec), "eps": cfg.train_eps})
            except (ValueError, TypeError) as e:
                raise SweepError(f"--recipe {recipe}: {e}") from None
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise SweepError(f"device {cfg.device!r} requested but CUDA is not available")
