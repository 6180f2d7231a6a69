"""The study: train each quant spec, freeze it, measure Top-1 / PGD-20 / PGD-50 (and, with
suite="standard", the APGD-CE -> APGD-T -> Square worst case) over a list of budgets and BOPS, and
write results.json / results.csv / results.md (Table 2 of paper 000) and plots.

Every config lives in ``<out>/configs/<spec>/``: ``checkpoint/`` (training, resumable),
``model.safetensors`` (trained weights), ``frozen.safetensors`` (packed model), ``robustness.*``
(per-example attack results at the table budget; ``robustness-eps<k>.*`` at the others) and ``result.json``, written last, which marks the config as done.
A killed sweep rerun with resume=True skips done configs and resumes a half-trained one from its
last epoch checkpoint. The summary files are rebuilt after every config.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from ._io import atomic_path, atomic_write_json, atomic_write_text
from .data import canonical_name, dataset_info, load_dataset
from .train import evaluate_accuracy, fit

__all__ = ["SweepConfig", "SweepError", "run_sweep", "DEFAULT_SPECS", "defaults_for", "method_columns",
           "write_summaries"]

DEFAULT_SPECS = ("fp", "pact-w4a4", "pact-w2a2", "xnor", "mbn1x3", "mbn3x1", "mbn3x3", "mbn5x1")
RESULT_SCHEMA = "bitkern.sweep/1"


class SweepError(ValueError):
    """A user-facing problem with the sweep configuration or output directory."""


# Defaults per dataset: training (epochs, batch_size, optimizer, lr, weight_decay, augment), the attacked
# test subset (eval_samples) and the L-inf budgets (eval_eps, in /255; table_eps: the one Table 2 shows).
# digits: 16 grey levels, one level = 16/255, so the paper's 2/255 cannot move an image across a level:
# the budgets span that step (accuracy falls from ~clean to far below it). The others: the papers'
# 2/255 and its neighbours. Chosen so the 8-spec digits default finishes in < 10 min on 2 CPU cores.
_PAPER_BUDGETS = dict(eval_eps=(1, 2, 4, 8), table_eps=2)
_DEFAULTS = {
    "digits": dict(epochs=8, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0, augment=False,
                   eval_samples=100, eval_eps=(8, 16, 32), table_eps=16),
    "mnist": dict(epochs=10, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0, augment=False,
                  eval_samples=1000, **_PAPER_BUDGETS),
    "fashion-mnist": dict(epochs=20, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0,
                          augment=False, eval_samples=1000, **_PAPER_BUDGETS),
    "cifar10": dict(epochs=200, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=5e-4, augment=True,
                    eval_samples=1000, **_PAPER_BUDGETS),
    "cifar100": dict(epochs=200, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=5e-4, augment=True,
                     eval_samples=1000, **_PAPER_BUDGETS),
    "imagefolder": dict(epochs=90, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=1e-4, augment=True,
                        eval_samples=1000, **_PAPER_BUDGETS),
}
SUITES = ("standard",)


def defaults_for(dataset: str) -> dict[str, Any]:
    return dict(_DEFAULTS[canonical_name(dataset)])


@dataclass
class SweepConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    arch: str = "resnet20"
    specs: tuple[str, ...] = DEFAULT_SPECS
    recipe: str = "natural"
    recipe_args: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None          # None: dataset default (see _DEFAULTS)
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None        # None: the recipe's default
    augment: bool | None = None
    train_eps: float = 8 / 255         # perturbation budget of adversarial recipes
    eval_eps: tuple[float, ...] | None = None   # L-inf budgets; None: dataset default (see _DEFAULTS)
    eval_alpha: float | None = None    # PGD step; None: eps / 4 per budget (paper 000: 0.5/255 at 2/255)
    pgd_steps: tuple[int, ...] = (20, 50)
    suite: str | None = None           # "standard": also APGD-CE -> APGD-T -> Square at every budget
    square_queries: int = 5000         # suite: Square's query budget
    apgd_steps: int = 100              # suite: APGD-CE / APGD-T iterations
    restarts: int = 5
    eval_samples: int | None = None    # None: dataset default; 0: the whole test set
    image_size: int = 32               # imagefolder only
    device: str = "cpu"
    seed: int = 0
    out: str = "results/sweep"
    resume: bool = False
    sanity: bool = False               # bitkern.eval sanity report per config (extra attack runs)
    progress: bool | None = None

    def resolved(self) -> "SweepConfig":
        d = defaults_for(self.dataset)
        c = SweepConfig(**{**asdict(self), "specs": tuple(self.specs), "pgd_steps": tuple(self.pgd_steps)})
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
        """The budget Table 2 shows: the dataset's (paper 2/255; digits 16/255) when it is in the list,
        else the median of the non-zero budgets."""
        default = defaults_for(self.dataset)["table_eps"] / 255
        budgets = [e for e in self.eval_eps if e > 0]
        if not budgets:
            return 0.0
        if any(abs(e - default) < 1e-9 for e in budgets):
            return default
        return budgets[(len(budgets) - 1) // 2]

    def alpha_for(self, eps: float) -> float:
        return self.eval_alpha if self.eval_alpha is not None else eps / 4

    def identity(self) -> dict[str, Any]:
        """What must match for a saved config result to be reused on resume."""
        keys = ("dataset", "arch", "recipe", "recipe_args", "epochs", "batch_size", "optimizer", "lr",
                "weight_decay", "schedule", "augment", "train_eps", "eval_eps", "eval_alpha", "pgd_steps",
                "restarts", "eval_samples", "image_size", "seed", "suite", "square_queries", "apgd_steps")
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keys}


# ------------------------------------------------------------------------------------ table columns
def method_columns(spec: str) -> dict[str, Any]:
    """Method name and weight / activation bases-or-bits as in Table 2 of paper 000."""
    from .models import parse_quant

    q = parse_quant(spec)
    if q.kind == "pact":
        name = f"PACT-{q.w_bits}" if q.w_bits == q.a_bits else f"PACT-{q.w_bits}-{q.a_bits}"
        return {"method": name, "weights": q.w_bits, "activations": q.a_bits}
    if q.kind == "xnor":
        return {"method": "XNOR-Net", "weights": 1, "activations": 1}
    if q.kind == "mbn":
        return {"method": f"MBN {q.M}x{q.N}", "weights": q.M, "activations": q.N}
    if q.kind == "prune-weight":
        return {"method": f"W. Pr. {q.prune_percent}%", "weights": 8, "activations": 8}
    if q.kind == "prune-channel":
        return {"method": f"Ch. Pr. {q.prune_percent}%", "weights": 8, "activations": 8}
    # full precision is counted at 8 x 8 bits for BOPS, as in the paper
    return {"method": "FP", "weights": 8, "activations": 8}


def _safe_name(spec: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in spec)


# --------------------------------------------------------------------------------------- the sweep
def _validate(cfg: SweepConfig) -> None:
    from .models import ARCHS, parse_quant

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
    if cfg.suite not in (None, *SUITES):
        raise SweepError(f"unknown suite {cfg.suite!r}; expected one of {', '.join(SUITES)}")
    for key in ("square_queries", "apgd_steps"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SweepError(f"{key} must be an integer >= 1, got {v!r}")
    from .train import make_recipe

    for spec in cfg.specs:  # unknown or bad recipe arguments fail now, not after hours of training
        try:
            make_recipe(cfg.recipe, **{**_recipe_args(cfg, spec), "eps": cfg.train_eps})
        except (ValueError, TypeError) as e:
            raise SweepError(f"--recipe {cfg.recipe}: {e}") from None
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise SweepError(f"device {cfg.device!r} requested but CUDA is not available")


def _model_kwargs(cfg: SweepConfig, x: torch.Tensor, num_classes: int) -> dict[str, Any]:
    return {"num_classes": num_classes, "in_channels": int(x.shape[1])}


def _recipe_args(cfg: SweepConfig, spec: str) -> dict[str, Any]:
    args = dict(cfg.recipe_args)
    if cfg.recipe == "odgq" and "lam" not in args:
        from .train.recipes import ODGQ

        args["lam"] = ODGQ.lam_for_quant(spec)  # paper: 3, and 0.003 for 1-bit models
    return args


def _evaluate(cfg: SweepConfig, frozen, x, y, eps: float):
    """Robustness at one budget: every PGD-k at the table budget, the shortest elsewhere (the curve)."""
    from .attacks import PGD
    from .eval import robustness

    table = abs(eps - cfg.table_eps) < 1e-12
    steps = cfg.pgd_steps if table else (min(cfg.pgd_steps),)
    attacks = {f"PGD-{s}": PGD(frozen, eps=eps, alpha=cfg.alpha_for(eps), steps=s, random_start=True)
               for s in steps}
    return robustness(frozen, (x, y), attacks, restarts=cfg.restarts, batch_size=256, device=cfg.device,
                      progress=bool(cfg.progress) if cfg.progress is not None else True,
                      record_iterations=table, seed=cfg.seed, sanity=cfg.sanity and table, suite=cfg.suite,
                      eps=eps, suite_options={"square_queries": cfg.square_queries,
                                              "apgd_steps": cfg.apgd_steps})


def _eps_key(eps: float) -> str:
    return f"{eps * 255:.6g}"


def _budget_row(eps: float, rob) -> dict[str, Any]:
    """What one budget adds to a config's row: per attack mean/std/worst, and the suite's verdict."""
    entry: dict[str, Any] = {"eps": eps, "eps_255": eps * 255}
    for name, st in rob.attacks.items():
        entry[name] = {"mean": st["mean"], "std": st["std"], "worst": st["worst"]}
        if "curve" in st:
            entry[name]["curve"] = {"mean": st["curve"]["mean"], "worst": st["curve"]["worst"]}
    if rob.suite is not None:
        entry["suite"] = {"robust": rob.suite.robust_acc, "after": rob.suite.accuracy_after(),
                          "masking": rob.suite.masking["verdict"], "masking_count": rob.suite.masking["count"]}
    return entry


def run_config(cfg: SweepConfig, spec: str, data: dict, log: Callable[[str], None]) -> dict[str, Any]:
    """Train, freeze, evaluate and count one quant spec; returns its result row (also saved)."""
    from .bops import count
    from .freeze import freeze
    from .models import create

    cdir = Path(cfg.out) / "configs" / _safe_name(spec)
    cdir.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te, num_classes = (data[k] for k in ("x_tr", "y_tr", "x_te", "y_te", "num_classes"))
    torch.manual_seed(cfg.seed)
    model = create(cfg.arch, spec, **_model_kwargs(cfg, x_tr, num_classes))
    meta = {"arch": cfg.arch, "quant": spec, "num_classes": num_classes, "in_channels": int(x_tr.shape[1]),
            "dataset": cfg.dataset}
    t0 = time.perf_counter()
    res = fit(model, (x_tr, y_tr), recipe=cfg.recipe, recipe_args=_recipe_args(cfg, spec), eps=cfg.train_eps,
              epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
              weight_decay=cfg.weight_decay, schedule=cfg.schedule, augment=cfg.augment, device=cfg.device,
              seed=cfg.seed, checkpoint_dir=cdir / "checkpoint", resume=True, log_path=cdir / "train_log.jsonl",
              progress=cfg.progress, meta=meta)
    train_s = time.perf_counter() - t0
    ckpt.save_model(cdir / "model.safetensors", model, meta)

    t1 = time.perf_counter()
    frozen = freeze(model).to(cfg.device)
    frozen.save(cdir / "frozen.safetensors")
    top1 = evaluate_accuracy(frozen, (x_te, y_te), device=cfg.device)
    n = x_te.shape[0] if cfg.eval_samples == 0 else min(cfg.eval_samples, x_te.shape[0])
    by_eps, table = {}, None
    for eps in cfg.eval_eps:
        if eps == 0:
            continue   # the clean accuracy on the subset, exactly
        rob = _evaluate(cfg, frozen, x_te[:n], y_te[:n], eps)
        is_table = abs(eps - cfg.table_eps) < 1e-12
        rob.save(cdir / ("robustness" if is_table else f"robustness-eps{_eps_key(eps)}"))
        by_eps[_eps_key(eps)] = _budget_row(eps, rob)
        if is_table:
            table = rob
    eval_s = time.perf_counter() - t1
    bops = count(model, tuple(x_tr.shape[1:]))

    clean_subset = evaluate_accuracy(frozen, (x_te[:n], y_te[:n]), device=cfg.device)
    row: dict[str, Any] = {"spec": spec, **method_columns(spec), "bops": int(bops.total),
                           "bops_1e8": bops.total / 1e8, "macs": int(bops.macs), "top1": top1,
                           "clean_eval_subset": clean_subset, "eval_samples": n, "table_eps": cfg.table_eps}
    if table is not None:
        row.update({k: v for k, v in by_eps[_eps_key(cfg.table_eps)].items() if k not in ("eps", "eps_255")})
    row["by_eps"] = by_eps
    rd = table.to_dict() if table is not None else {}
    row.update({"train_acc": res.final.get("train_acc"), "train_loss": res.final.get("loss"),
                "epochs_run": res.epochs_run, "recipe": res.recipe, "recipe_args": res.recipe_args,
                "train_s": round(train_s, 2), "eval_s": round(eval_s, 2),
                "sanity_passed": (rd.get("sanity") or {}).get("passed")})
    atomic_write_json(cdir / "result.json", {"schema": RESULT_SCHEMA, "config": cfg.identity(), "row": row})
    suite = f"  suite {row['suite']['robust']:.2f}%" if "suite" in row else ""
    log(f"{spec}: top-1 {top1:.2f}%  at {cfg.table_eps * 255:g}/255: "
        + "  ".join(f"{k} {row[k]['mean']:.2f}% (worst {row[k]['worst']:.2f}%)" for k in rd.get("attacks", {}))
        + suite + f"  BOPS {bops.total / 1e8:.4f}e8  train {train_s:.0f}s eval {eval_s:.0f}s")
    return row


def _load_done(cfg: SweepConfig, spec: str) -> dict[str, Any] | None:
    path = Path(cfg.out) / "configs" / _safe_name(spec) / "result.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn file cannot exist (atomic writes) but be forgiving: redo the config
    if saved.get("config") != cfg.identity():
        raise SweepError(f"{path} was produced with a different configuration; use another --out "
                         f"or the same options as before")
    return saved["row"]


def run_sweep(config: SweepConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the study; returns the result rows (one per spec, in spec order)."""
    cfg = config.resolved()
    _validate(cfg)
    out = Path(cfg.out)
    done_any = (out / "configs").is_dir() and any((out / "configs").glob("*/result.json"))
    if done_any and not cfg.resume:
        raise SweepError(f"{out} already holds sweep results; pass --resume to continue it or choose "
                         f"another --out")
    torch.manual_seed(cfg.seed)
    x_tr, y_tr = load_dataset(cfg.dataset, cfg.data_dir, "train", image_size=cfg.image_size)
    x_te, y_te = load_dataset(cfg.dataset, cfg.data_dir, "test", image_size=cfg.image_size)
    info = dataset_info(cfg.dataset)
    num_classes = info["num_classes"] or int(max(y_tr.max(), y_te.max())) + 1
    data = {"x_tr": x_tr, "y_tr": y_tr, "x_te": x_te, "y_te": y_te, "num_classes": num_classes}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep_config.json", {**cfg.identity(), "specs": list(cfg.specs),
                                                  "device": cfg.device, "data_dir": cfg.data_dir})
    log(f"sweep: {cfg.arch} on {cfg.dataset} ({x_tr.shape[0]} train / {x_te.shape[0]} test), recipe "
        f"{cfg.recipe}, {cfg.epochs} epochs, specs {', '.join(cfg.specs)} -> {out}")
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for spec in cfg.specs:
        row = _load_done(cfg, spec)
        if row is not None:
            log(f"{spec}: done earlier, skipped")
        else:
            row = run_config(cfg, spec, data, log)
        rows.append(row)
        write_summaries(cfg, rows, out)
    log(f"sweep finished in {time.perf_counter() - t0:.0f}s; results in {out}/results.md")
    return rows


# ------------------------------------------------------------------------------------ summaries
def _fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def _budgets(cfg: SweepConfig) -> list[float]:
    return [e for e in cfg.eval_eps if e > 0]


def _curve_attack(cfg: SweepConfig) -> str:
    return f"PGD-{min(cfg.pgd_steps)}"


def results_markdown(cfg: SweepConfig, rows: list[dict[str, Any]]) -> str:
    steps = list(cfg.pgd_steps)
    arch = cfg.arch.replace("resnet", "ResNet-")
    suite = cfg.suite is not None
    head = (["Model / Dataset", "Method", "Weights (bases/bits)", "Activations (bases/bits)", "BOPS [1e8]",
             "Top-1 [%]"] + [f"PGD-{s} [%] mean (worst)" for s in steps]
            + (["Standard suite [%]", "Masking"] if suite else []) + ["Clean on PGD subset [%]"])
    lines = [f"# {arch} on {cfg.dataset}, recipe {cfg.recipe}", "",
             f"## Table 2 layout at eps {cfg.table_eps * 255:g}/255", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [f"{arch} {cfg.dataset}" if i == 0 else "", r["method"], str(r["weights"]),
                 str(r["activations"]), _fmt(r["bops_1e8"], 4), _fmt(r["top1"])]
        for s in steps:
            a = r.get(f"PGD-{s}") or {}
            cells.append(f"{_fmt(a.get('mean'))} ({_fmt(a.get('worst'))})")
        if suite:
            st = r.get("suite") or {}
            cells += [_fmt(st.get("robust")), _masking_cell(st)]
        cells.append(_fmt(r.get("clean_eval_subset")))
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0]["eval_samples"] if rows else 0
    alpha = (f"step {cfg.eval_alpha * 255:g}/255" if cfg.eval_alpha is not None else "step eps/4")
    lines += ["", f"Top-1 on the whole test set of the frozen (packed) model; attacks on the first {n} test "
              f"examples, L-inf, {alpha}, {cfg.restarts} random restarts for PGD: mean over restarts, worst case "
              "(robust only if every restart fails) in parentheses."
              + (f" Standard suite: APGD-CE -> APGD-T -> Square ({cfg.apgd_steps} iterations, "
                 f"{cfg.square_queries} queries), an example is robust only if it survives all three; "
                 "masking: Square broke examples both gradient attacks and PGD failed on." if suite else "")
              + " BOPS = MACs x weight bits x activation bits (MBN: x M x N), first conv and last fc at "
              "8 x 8 bits.", ""]
    budgets = _budgets(cfg)
    if len(budgets) > 1:
        curve = _curve_attack(cfg)
        head = ["Method"] + [f"{e * 255:g}/255" for e in budgets]
        lines += [f"## Robust accuracy vs eps: {curve} worst case over restarts"
                  + (" / standard suite" if suite else "") + " [%]", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["method"]]
            for e in budgets:
                b = (r.get("by_eps") or {}).get(_eps_key(e)) or {}
                cell = _fmt((b.get(curve) or {}).get("worst"))
                if suite:
                    cell += f" / {_fmt((b.get('suite') or {}).get('robust'))}"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Training: {cfg.epochs} epochs ({cfg.optimizer}, lr {cfg.lr:g}, batch {cfg.batch_size}), "
              f"seed {cfg.seed}."]
    return "\n".join(lines) + "\n"


def _masking_cell(st: dict) -> str:
    if not st:
        return "-"
    return f"**suspected ({st['masking_count']})**" if st["masking"] == "gradient masking suspected" else "no"


def results_csv(cfg: SweepConfig, rows: list[dict[str, Any]]) -> str:
    steps = list(cfg.pgd_steps)
    fields = (["spec", "method", "weights", "activations", "bops", "bops_1e8", "macs", "top1",
               "clean_eval_subset", "table_eps_255"] + [f"pgd{s}_{k}" for s in steps for k in ("mean", "std", "worst")]
              + ["suite_robust", "suite_masking", "eval_samples", "train_acc", "epochs_run", "recipe", "train_s",
                 "eval_s"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        flat = {k: r.get(k) for k in fields}
        flat["table_eps_255"] = cfg.table_eps * 255
        for s in steps:
            for k in ("mean", "std", "worst"):
                flat[f"pgd{s}_{k}"] = (r.get(f"PGD-{s}") or {}).get(k)
        flat["suite_robust"] = (r.get("suite") or {}).get("robust")
        flat["suite_masking"] = (r.get("suite") or {}).get("masking")
        w.writerow(flat)
    return buf.getvalue()


def results_by_eps_csv(cfg: SweepConfig, rows: list[dict[str, Any]]) -> str:
    """Long format: one line per (spec, budget, evaluation)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["spec", "eps_255", "evaluation", "mean", "std", "worst"])
    for r in rows:
        for key, b in (r.get("by_eps") or {}).items():
            for name, st in b.items():
                if name.startswith("PGD-"):
                    w.writerow([r["spec"], key, name, st["mean"], st["std"], st["worst"]])
                elif name == "suite":
                    w.writerow([r["spec"], key, "standard-suite", st["robust"], 0.0, st["robust"]])
    return buf.getvalue()


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _plot(cfg: SweepConfig, rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(cfg.pgd_steps)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v"
    series = [(f"PGD-{s}", lambda r, s=s: (r.get(f"PGD-{s}") or {}).get("mean"), f"PGD-{s} (mean of restarts)")
              for s in steps]
    if cfg.suite:
        series.append(("suite", lambda r: (r.get("suite") or {}).get("robust"), "standard suite (worst case)"))
    xs = [r["bops_1e8"] for r in rows]
    for j, (_, value, label) in enumerate(series):
        ys = [value(r) for r in rows]
        ax.scatter(xs, [float("nan") if y is None else y for y in ys], marker=markers[j % len(markers)],
                   label=label)
        if j == 0:
            for r, xv, yv in zip(rows, xs, ys):
                if yv is not None:
                    ax.annotate(f"{r['spec']}\n{r['top1']:.1f}%", (xv, yv), fontsize=7, xytext=(4, 4),
                                textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("BOPS [1e8] (log)")
    ax.set_ylabel("robust accuracy [%]")
    ax.set_title(f"{cfg.arch} {cfg.dataset} ({cfg.recipe}) at eps {cfg.table_eps * 255:g}/255: robust accuracy "
                 "vs BOPS (labels: Top-1)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_png(fig, out / "robust_vs_bops.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    longest = f"PGD-{max(steps)}"
    for r in rows:
        curve = (r.get(longest) or {}).get("curve")
        if curve:
            ax.plot(range(len(curve["mean"])), curve["mean"], label=r["spec"])
    ax.set_xlabel("PGD iteration")
    ax.set_ylabel("accuracy [%] (mean of restarts)")
    ax.set_title(f"{cfg.arch} {cfg.dataset}: accuracy over PGD iterations (eps {cfg.table_eps * 255:g}/255)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    _save_png(fig, out / "pgd_vs_iterations.png")

    budgets = _budgets(cfg)
    if len(budgets) > 1:
        curve = _curve_attack(cfg)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, r in enumerate(rows):
            color = f"C{i % 10}"
            by = r.get("by_eps") or {}
            pts = [(0.0, r.get("clean_eval_subset"))] + [(e * 255, (by.get(_eps_key(e), {}).get(curve) or {})
                                                          .get("worst")) for e in budgets]
            ax.plot(*zip(*pts), "o-", color=color, label=f"{r['spec']} {curve}")
            if cfg.suite:
                pts = [(0.0, r.get("clean_eval_subset"))] + [
                    (e * 255, (by.get(_eps_key(e), {}).get("suite") or {}).get("robust")) for e in budgets]
                ax.plot(*zip(*pts), "s--", color=color, alpha=0.8, label=f"{r['spec']} suite")
        ax.set_xlabel("eps [/255]")
        ax.set_ylabel("robust accuracy [%] (worst case)")
        ax.set_title(f"{cfg.arch} {cfg.dataset}: robust accuracy vs eps"
                     + (" (solid: PGD, dashed: standard suite)" if cfg.suite else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        _save_png(fig, out / "robust_vs_eps.png")


def write_summaries(cfg: SweepConfig, rows: list[dict[str, Any]], out: str | os.PathLike) -> None:
    out = Path(out)
    atomic_write_json(out / "results.json", {"schema": RESULT_SCHEMA, "config": cfg.identity(),
                                             "specs": list(cfg.specs), "rows": rows})
    atomic_write_text(out / "results.csv", results_csv(cfg, rows))
    atomic_write_text(out / "results_by_eps.csv", results_by_eps_csv(cfg, rows))
    atomic_write_text(out / "results.md", results_markdown(cfg, rows))
    _plot(cfg, rows, out)
