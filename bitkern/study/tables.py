"""The study's tables as text: results.md (Table 2 layout + robust accuracy vs eps), results.csv and
results_by_eps.csv (the Table 2 method columns of a spec come from bitkern.quant).

With several seeds a table row is one (recipe, spec) and shows the mean over seeds with the sample
standard deviation over seeds after ``±``; results.csv and results_by_eps.csv keep one line per config."""
from __future__ import annotations

import csv
import io
import statistics
from typing import Any

from ..quant import method_columns  # each scheme labels itself (bitkern.quant)
from .config import SweepConfig, budgets, curve_attack, eps_key, table_attacks

__all__ = ["method_columns", "results_markdown", "results_csv", "results_by_eps_csv", "group_rows",
           "evaluations", "seed_stats", "group_values"]


def _fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def evaluations(cfg: SweepConfig) -> list[str]:
    """The table budget's evaluations by name: the white-box attacks, then their transfer ("(B)") runs."""
    names = list(table_attacks(cfg))
    return names + ([f"{n}(B)" for n in names] if cfg.transfer_source is not None else [])


def group_rows(cfg: SweepConfig, rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by (recipe, spec), in table order (a group holds one row per seed done so far)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("recipe", cfg.recipe), r["spec"]), []).append(r)
    return list(groups.values())


def seed_stats(values: list[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample std) over seeds; std None for a single value, both None if any value is missing."""
    if not values or any(v is None for v in values):
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float | None]) -> str:
    mean, sd = seed_stats(values)
    return _fmt(mean) + ("" if sd is None else f" ± {sd:.2f}")


def _get(row: dict, *path):
    for k in path:
        row = (row or {}).get(k)
    return row


def group_values(group: list[dict[str, Any]], *path) -> list[Any]:
    """The value at ``path`` (keys into a row, missing -> None) of every row of a group."""
    return [_get(r, *path) for r in group]


def _masking_cell(group: list[dict]) -> str:
    flags = [_get(r, "suite") for r in group]
    if not any(flags):
        return "-"
    counts = [f["masking_count"] for f in flags if f and f["masking"] == "gradient masking suspected"]
    return f"**suspected ({', '.join(map(str, counts))})**" if counts else "no"


def results_markdown(cfg: SweepConfig, rows: list[dict[str, Any]]) -> str:
    evals = evaluations(cfg)
    arch = cfg.arch.replace("resnet", "ResNet-")
    suite = cfg.suite is not None
    recipes = len(cfg.recipes) > 1
    seeds = len(cfg.seeds) > 1
    groups = group_rows(cfg, rows)
    head = ((["Training"] if recipes else [])
            + ["Model / Dataset", "Method", "Weights (bases/bits)", "Activations (bases/bits)", "BOPS [1e8]",
               "Top-1 [%]"] + [f"{e} [%] mean (worst)" for e in evals]
            + (["Standard suite [%]", "Masking"] if suite else []) + ["Clean on attacked subset [%]"]
            + (["Train [min]", "Epoch [s]"] if recipes else []) + (["Seeds"] if seeds else []))
    title = f"recipes {', '.join(cfg.recipes)}" if recipes else f"recipe {cfg.recipe}"
    lines = [f"# {arch} on {cfg.dataset}, {title}", "",
             f"## Table at eps {cfg.table_eps * 255:g}/255", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, g in enumerate(groups):
        r = g[0]
        cells = (([r.get("recipe", cfg.recipe)] if recipes else [])
                 + [f"{arch} {cfg.dataset}" if i == 0 else "", r["method"], str(r["weights"]),
                    str(r["activations"]), _fmt(r["bops_1e8"], 4), _cell(group_values(g, "top1"))])
        for e in evals:
            means, worsts = group_values(g, e, "mean"), group_values(g, e, "worst")
            cells.append(f"{_fmt(seed_stats(means)[0])} ({_cell(worsts)})")
        if suite:
            cells += [_cell(group_values(g, "suite", "robust")), _masking_cell(g)]
        cells.append(_cell(group_values(g, "clean_eval_subset")))
        if recipes:
            cells += [_fmt(seed_stats([x["train_s"] / 60 for x in g])[0], 1),
                      _fmt(seed_stats([x.get("epoch_s") for x in g])[0], 1)]
        if seeds:
            cells.append(", ".join(str(x.get("seed", cfg.seed)) for x in g))
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0]["eval_samples"] if rows else 0
    alpha = (f"step {cfg.eval_alpha * 255:g}/255" if cfg.eval_alpha is not None
             else f"step eps x {cfg.alpha_ratio:g}")
    lines += ["", f"Top-1 on the whole test set of the frozen (packed) model; attacks on the first {n} test "
              f"examples, L-inf, {alpha}, {cfg.restarts} runs of every randomized attack (random start, noise): "
              "mean over runs, worst case (robust only if every run fails) in parentheses."
              + (" (B): black-box, crafted on a naturally trained "
                 f"{cfg.transfer_source} model (transfer) and evaluated on this one." if cfg.transfer_source else "")
              + (f" Standard suite: APGD-CE -> APGD-T ({cfg.apgd_targets} targets) -> Square ({cfg.apgd_steps} "
                 f"iterations, {cfg.square_queries} queries), an example is robust only if it survives all three; "
                 "masking: Square broke examples both gradient attacks and PGD failed on."
                 if suite else "")
              + (" Several seeds: mean ± sample standard deviation over the seeds." if seeds else "")
              + " BOPS = MACs x weight bits x activation bits (MBN: x M x N), first conv and last fc at "
              "8 x 8 bits.", ""]
    nonzero = budgets(cfg)
    if len(nonzero) > 1:
        curve = curve_attack(cfg)
        head = (["Training"] if recipes else []) + ["Method"] + [f"{e * 255:g}/255" for e in nonzero]
        lines += [f"## Robust accuracy vs eps: {curve} worst case over runs"
                  + (" / standard suite" if suite else "") + " [%]", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in groups:
            r = g[0]
            cells = ([r.get("recipe", cfg.recipe)] if recipes else []) + [r["method"]]
            for e in nonzero:
                cell = _cell(group_values(g, "by_eps", eps_key(e), curve, "worst"))
                if suite:
                    cell += " / " + _cell(group_values(g, "by_eps", eps_key(e), "suite", "robust"))
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    seed_text = f"seeds {', '.join(map(str, cfg.seeds))}" if seeds else f"seed {cfg.seed}"
    n_train = rows[0].get("train_samples") if rows else None
    lines += [f"Training: {cfg.epochs} epochs ({cfg.optimizer}, lr {cfg.lr:g}, batch {cfg.batch_size})"
              + (f" on {n_train} training examples" if n_train else "") + f", {seed_text}."]
    return "\n".join(lines) + "\n"


def _column(name: str) -> str:
    """An evaluation's csv prefix: PGD-20 -> pgd20, PGD-20(B) -> pgd20_b."""
    base = name.replace("(B)", "").replace("-", "").lower()
    return base + ("_b" if name.endswith("(B)") else "")


def results_csv(cfg: SweepConfig, rows: list[dict[str, Any]]) -> str:
    evals = evaluations(cfg)
    fields = (["spec", "recipe", "seed", "method", "weights", "activations", "bops", "bops_1e8", "macs", "top1",
               "clean_eval_subset", "table_eps_255"]
              + [f"{_column(e)}_{k}" for e in evals for k in ("mean", "std", "worst")]
              + ["suite_robust", "suite_masking", "eval_samples", "train_samples", "train_acc", "epochs_run",
                 "train_s", "epoch_s", "eval_s"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        flat = {k: r.get(k) for k in fields}
        flat["seed"] = r.get("seed", cfg.seed)
        flat["table_eps_255"] = cfg.table_eps * 255
        for e in evals:
            for k in ("mean", "std", "worst"):
                flat[f"{_column(e)}_{k}"] = _get(r, e, k)
        flat["suite_robust"] = _get(r, "suite", "robust")
        flat["suite_masking"] = _get(r, "suite", "masking")
        w.writerow(flat)
    return buf.getvalue()


def results_by_eps_csv(cfg: SweepConfig, rows: list[dict[str, Any]]) -> str:
    """Long format: one line per (config, budget, evaluation)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["spec", "recipe", "seed", "eps_255", "evaluation", "mean", "std", "worst"])
    for r in rows:
        head = [r["spec"], r.get("recipe", cfg.recipe), r.get("seed", cfg.seed)]
        for key, b in (r.get("by_eps") or {}).items():
            for name, st in b.items():
                if name == "suite":
                    w.writerow(head + [key, "standard-suite", st["robust"], 0.0, st["robust"]])
                elif isinstance(st, dict) and "worst" in st:
                    w.writerow(head + [key, name, st["mean"], st["std"], st["worst"]])
    return buf.getvalue()
