"""Step-size sweep for the worst-case PGD threat model (paper 000 Sec. 4.1, Figs. 2-4)."""
from __future__ import annotations

import os

from ..attacks import PGD, parse_eps
from ..attacks._validate import check_int
from .._io import atomic_save_figure, atomic_write_text
from .robustness import robustness


def step_size_sweep(model, data, eps, alphas, steps, restarts=5, batch_size=256, device="cpu",
                    progress=True, seed=0, plot_path=None, json_path=None) -> dict:
    """PGD accuracy after every iteration for each step size alpha (same eps, same random starts).

    Returns {"eps", "steps", "restarts", "clean_acc", "alphas": {label: {alpha, mean, std, worst,
    final_mean, final_worst, iters_to_final}}, "worst_case_alpha"}; accuracies in %, curves have
    steps + 1 points (iteration 0 = the random start). The worst-case alpha has the lowest final
    mean accuracy, ties broken by fewer iterations needed. Optionally writes a PNG and a JSON file.
    """
    eps = parse_eps(eps)
    steps = check_int(steps, "steps", 1)
    alphas = [parse_eps(a, "alphas") for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty: give at least one step size")
    attacks = {_label(a): PGD(model, eps, a, steps, random_start=True, seed=seed) for a in alphas}
    res = robustness(model, data, attacks, restarts=restarts, batch_size=batch_size, device=device,
                     progress=progress, record_iterations=True, seed=seed, sanity=False)
    stats = res.attacks
    out = {"eps": eps, "eps_255": eps * 255, "steps": steps, "restarts": restarts, "seed": seed,
           "n_examples": res.n_examples, "clean_acc": res.clean_acc, "alphas": {}}
    for label, a in zip(attacks, alphas):
        c = stats[label]["curve"]
        final = c["mean"][-1]
        reach = next(i for i, v in enumerate(c["mean"]) if v <= final + 1e-9)
        out["alphas"][label] = {"alpha": a, "alpha_255": a * 255, "mean": c["mean"], "std": c["std"],
                                "worst": c["worst"], "final_mean": final, "final_worst": c["worst"][-1],
                                "iters_to_final": reach}
    out["worst_case_alpha"] = min(out["alphas"], key=lambda k: (round(out["alphas"][k]["final_mean"], 9),
                                                                out["alphas"][k]["iters_to_final"]))
    if plot_path is not None:
        out["plot"] = plot_sweep(out, plot_path)
    if json_path is not None:
        import json
        atomic_write_text(json_path, json.dumps(out, indent=2) + "\n")
    return out


def _label(alpha: float) -> str:
    return f"alpha={alpha * 255:.4g}/255"


def plot_sweep(sweep: dict, path) -> str:
    """Accuracy vs PGD iterations per step size: mean over restarts (± std band), worst case dashed."""
    # Figure + its own Agg canvas: no pyplot, so no global backend state and no display needed
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, s) in enumerate(sweep["alphas"].items()):
        it = list(range(len(s["mean"])))
        color = colormaps["tab10"](i % 10)
        ax.plot(it, s["mean"], color=color, label=f"{label} (mean of {sweep['restarts']})")
        lo = [m - d for m, d in zip(s["mean"], s["std"])]
        hi = [m + d for m, d in zip(s["mean"], s["std"])]
        ax.fill_between(it, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.plot(it, s["worst"], color=color, linestyle="--", linewidth=1, label=f"{label} (worst case)")
    ax.set_xlabel("PGD iterations")
    ax.set_ylabel("accuracy [%]")
    ax.set_title(f"PGD step-size sweep, eps = {sweep['eps_255']:.3g}/255, n = {sweep['n_examples']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return atomic_save_figure(fig, os.fspath(path), bbox_inches="tight")
