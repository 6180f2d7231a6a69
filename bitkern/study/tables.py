"""The study's tables as text: results.md (Table 2 layout + robust accuracy vs eps), results.csv and
results_by_eps.csv (the Table 2 method columns of a spec come from bitkern.quant)."""
from __future__ import annotations

import csv
import io
from typing import Any

from ..quant import method_columns  # each scheme labels itself (bitkern.quant)
from .config import SweepConfig, budgets, curve_attack, eps_key

__all__ = ["method_columns", "results_markdown", "results_csv", "results_by_eps_csv"]


def _fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def _masking_cell(st: dict) -> str:
    if not st:
        return "-"
    return f"**suspected ({st['masking_count']})**" if st["masking"] == "gradient masking suspected" else "no"


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
    nonzero = budgets(cfg)
    if len(nonzero) > 1:
        curve = curve_attack(cfg)
        head = ["Method"] + [f"{e * 255:g}/255" for e in nonzero]
        lines += [f"## Robust accuracy vs eps: {curve} worst case over restarts"
                  + (" / standard suite" if suite else "") + " [%]", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["method"]]
            for e in nonzero:
                b = (r.get("by_eps") or {}).get(eps_key(e)) or {}
                cell = _fmt((b.get(curve) or {}).get("worst"))
                if suite:
                    cell += f" / {_fmt((b.get('suite') or {}).get('robust'))}"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Training: {cfg.epochs} epochs ({cfg.optimizer}, lr {cfg.lr:g}, batch {cfg.batch_size}), "
              f"seed {cfg.seed}."]
    return "\n".join(lines) + "\n"


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
