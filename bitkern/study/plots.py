"""The study's plots: robust accuracy vs BOPS, accuracy over PGD iterations, robust accuracy vs eps.
With several seeds every point is the mean over seeds (one line per recipe x spec)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_save_figure
from .config import SweepConfig, budgets, curve_attack, eps_key, table_attacks
from .tables import group_rows, group_values, seed_stats

__all__ = ["write_plots"]


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def _mean(group, *path):
    m = seed_stats(group_values(group, *path))[0]
    return float("nan") if m is None else m


def _label(cfg: SweepConfig, group) -> str:
    r = group[0]
    return r["spec"] + (f" ({r.get('recipe')})" if len(cfg.recipes) > 1 else "")


def write_plots(cfg: SweepConfig, rows: list[dict[str, Any]], out: Path) -> None:
    """robust_vs_bops.png, pgd_vs_iterations.png and (with more than one budget) robust_vs_eps.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_rows(cfg, rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>p*h"
    series = [((name, "mean"), f"{name} (mean of runs)") for name in table_attacks(cfg)]
    if cfg.suite:
        series.append((("suite", "robust"), "standard suite (worst case)"))
    xs = [g[0]["bops_1e8"] for g in groups]
    for j, (path, label) in enumerate(series):
        ys = [_mean(g, *path) for g in groups]
        ax.scatter(xs, ys, marker=markers[j % len(markers)], label=label)
        if j == 0:
            for g, xv, yv in zip(groups, xs, ys):
                if not np.isnan(yv):
                    ax.annotate(f"{_label(cfg, g)}\n{_mean(g, 'top1'):.1f}%", (xv, yv), fontsize=7,
                                xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("BOPS [1e8] (log)")
    ax.set_ylabel("robust accuracy [%]")
    ax.set_title(f"{cfg.arch} {cfg.dataset} ({', '.join(cfg.recipes)}) at eps {cfg.table_eps * 255:g}/255: "
                 "robust accuracy vs BOPS (labels: Top-1)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_png(fig, out / "robust_vs_bops.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    longest = f"PGD-{max(cfg.pgd_steps)}"
    if longest not in table_attacks(cfg):
        longest = curve_attack(cfg)
    for g in groups:
        curves = [((r.get(longest) or {}).get("curve") or {}).get("mean") for r in g]
        if curves and all(curves):
            ax.plot(range(len(curves[0])), np.mean(np.asarray(curves, dtype=float), axis=0),
                    label=_label(cfg, g))
    ax.set_xlabel("PGD iteration")
    ax.set_ylabel("accuracy [%] (mean of runs" + (" and seeds)" if len(cfg.seeds) > 1 else ")"))
    ax.set_title(f"{cfg.arch} {cfg.dataset}: accuracy over {longest} iterations (eps {cfg.table_eps * 255:g}/255)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    _save_png(fig, out / "pgd_vs_iterations.png")

    nonzero = budgets(cfg)
    if len(nonzero) > 1:
        curve = curve_attack(cfg)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, g in enumerate(groups):
            color = f"C{i % 10}"
            clean = _mean(g, "clean_eval_subset")
            pts = [(0.0, clean)] + [(e * 255, _mean(g, "by_eps", eps_key(e), curve, "worst")) for e in nonzero]
            ax.plot(*zip(*pts), "o-", color=color, label=f"{_label(cfg, g)} {curve}")
            if cfg.suite:
                pts = [(0.0, clean)] + [(e * 255, _mean(g, "by_eps", eps_key(e), "suite", "robust"))
                                        for e in nonzero]
                ax.plot(*zip(*pts), "s--", color=color, alpha=0.8, label=f"{_label(cfg, g)} suite")
        ax.set_xlabel("eps [/255]")
        ax.set_ylabel("robust accuracy [%] (worst case" + (", mean of seeds)" if len(cfg.seeds) > 1 else ")"))
        ax.set_title(f"{cfg.arch} {cfg.dataset}: robust accuracy vs eps"
                     + (" (solid: PGD, dashed: standard suite)" if cfg.suite else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        _save_png(fig, out / "robust_vs_eps.png")
