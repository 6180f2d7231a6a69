"""The study's plots: robust accuracy vs BOPS, accuracy over PGD iterations, robust accuracy vs eps."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .._io import atomic_save_figure
from .config import SweepConfig, budgets, curve_attack, eps_key

__all__ = ["write_plots"]


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def write_plots(cfg: SweepConfig, rows: list[dict[str, Any]], out: Path) -> None:
    """robust_vs_bops.png, pgd_vs_iterations.png and (with more than one budget) robust_vs_eps.png."""
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

    nonzero = budgets(cfg)
    if len(nonzero) > 1:
        curve = curve_attack(cfg)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, r in enumerate(rows):
            color = f"C{i % 10}"
            by = r.get("by_eps") or {}
            pts = [(0.0, r.get("clean_eval_subset"))] + [(e * 255, (by.get(eps_key(e), {}).get(curve) or {})
                                                          .get("worst")) for e in nonzero]
            ax.plot(*zip(*pts), "o-", color=color, label=f"{r['spec']} {curve}")
            if cfg.suite:
                pts = [(0.0, r.get("clean_eval_subset"))] + [
                    (e * 255, (by.get(eps_key(e), {}).get("suite") or {}).get("robust")) for e in nonzero]
                ax.plot(*zip(*pts), "s--", color=color, alpha=0.8, label=f"{r['spec']} suite")
        ax.set_xlabel("eps [/255]")
        ax.set_ylabel("robust accuracy [%] (worst case)")
        ax.set_title(f"{cfg.arch} {cfg.dataset}: robust accuracy vs eps"
                     + (" (solid: PGD, dashed: standard suite)" if cfg.suite else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        _save_png(fig, out / "robust_vs_eps.png")
