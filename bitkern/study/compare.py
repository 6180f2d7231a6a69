"""Our numbers next to the papers': the tables of docs/findings.md, in the papers' layouts.

    python -m bitkern.study.compare results/paper000-natural results/paper000-fastat results/paper003-odgq

reads each sweep's results.json (any of the three presets, recognised by its recorded preset) and prints
markdown: the paper's rows (CIFAR-10, and MNIST for paper 003) beside ours, and per claim the pairwise
comparisons the verdict rests on. The paper numbers below are copied from the papers in shared/papers
(paper 000 Tables 2 and 3, paper 003 Tables I and II).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from .tables import group_rows, group_values, seed_stats

__all__ = ["PAPER000_TABLE2", "PAPER000_TABLE3", "PAPER003_TABLE1", "PAPER003_TABLE2", "compare_markdown"]

# paper 000, Table 2, ResNet-20 CIFAR-10, natural training: spec -> (BOPS 1e8, Top-1, PGD-20, PGD-50),
# PGD at eps 2/255, step 0.5/255, averaged over five runs.
PAPER000_TABLE2 = {
    "fp": (25.95, 92.49, 1.02, 0.81), "pact-w4a4": (6.70, 92.21, 1.49, 1.27),
    "pact-w2a2": (1.89, 89.63, 3.94, 3.33), "xnor": (0.68, 83.98, 9.93, 8.28),
    "mbn1x1": (0.68, 84.44, 11.10, 9.59), "mbn3x1": (1.49, 87.19, 14.28, 12.54),
    "mbn1x3": (1.49, 87.54, 9.09, 7.96), "mbn5x1": (2.29, 87.01, 14.13, 12.55),
    "mbn1x5": (2.29, 89.02, 8.68, 7.71), "mbn3x3": (3.98, 89.03, 10.00, 8.78),
}
# paper 000, Table 3, ResNet-56 CIFAR-10, FastAT: spec -> (BOPS 1e8, Top-1, PGD-20) at eps 8/255, step 2/255.
PAPER000_TABLE3 = {
    "fp": (80.31, 84.03, 38.45), "pact-w4a4": (20.29, 85.56, 40.48), "pact-w2a2": (5.29, 81.80, 45.98),
    "xnor": (1.53, 75.64, 44.15), "mbn3x1": (4.03, 77.01, 51.98), "mbn1x3": (4.03, 79.42, 51.00),
    "mbn5x1": (6.54, 75.27, 50.10), "mbn1x5": (6.54, 80.76, 50.02), "mbn3x3": (11.54, 81.65, 52.02),
}
# paper 003, 4-bit ResNet-20 at eps 8/255 (step 4/255): recipe -> (Natural, GN, FGSM, PGD-20, BIM-20, TPGD-20,
# GN(B), FGSM(B), PGD-20(B), BIM-20(B), TPGD-20(B), total training [min], per epoch [s]).
# Table I (CIFAR-10); ODG-Q row: N_k = 4 (bitkern's default); free: AdvFree m = 4.
PAPER003_TABLE1 = {
    "natural": (87.5, 72.9, 31.1, 9.1, 9.1, 41.0, 56.1, 43.9, 22.8, 22.8, 50.4, 40.5, 8.1),
    "free": (83.9, 69.1, 40.5, 22.9, 22.9, 43.8, 68.5, 41.1, 28.8, 28.8, 59.2, 63.8, 51.0),
    "dq": (84.7, 73.3, 45.9, 24.3, 24.4, 55.1, 72.1, 41.0, 29.7, 29.9, 59.9, 46.0, 9.2),
    "odgq": (84.9, 82.2, 81.5, 81.1, 81.1, 83.2, 82.4, 61.6, 46.7, 46.8, 67.1, 41.0, 16.4),
}
# Table II (MNIST), same layout.
PAPER003_TABLE2 = {
    "natural": (99.5, 99.3, 82.4, 63.9, 63.9, 79.3, 99.4, 97.0, 95.9, 96.0, 97.2, 35.5, 7.1),
    "free": (99.5, 99.0, 89.4, 64.9, 64.9, 73.6, 99.4, 98.0, 97.8, 98.3, 98.0, 50.3, 40.3),
    "dq": (99.4, 99.3, 84.2, 65.3, 65.3, 79.2, 99.4, 98.9, 99.0, 99.0, 99.2, 39.0, 7.8),
    "odgq": (99.4, 99.3, 99.2, 99.2, 99.3, 99.3, 99.5, 99.2, 99.2, 99.3, 99.4, 39.2, 15.7),
}
PAPER003_ATTACKS = ("GN", "FGSM", "PGD-20", "BIM-20", "TPGD-20")
RECIPE_NAMES = {"natural": "Natural", "free": "AdvFree (m = 4)", "dq": "DQ", "odgq": "ODG-Q (N_k = 4)",
                "fastat": "FastAT"}


def _fmt(v, nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _ms(group, *path) -> str:
    """mean ± sd over seeds (sd only with several seeds)."""
    m, sd = seed_stats(group_values(group, *path))
    return _fmt(m) + ("" if sd is None else f" ± {sd:.2f}")


def _mean(group, *path):
    return seed_stats(group_values(group, *path))[0]


class _Cfg:
    """The little of a sweep's configuration the grouping needs, from results.json."""

    def __init__(self, config: dict):
        self.recipe = config["recipe"]


def load(path: str | Path) -> tuple[dict, list[dict]]:
    """(config, rows) of a sweep directory (or its results.json)."""
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    data = json.loads(p.read_text())
    sweep = json.loads((p.parent / "sweep_config.json").read_text())
    return {**data["config"], **sweep}, data["rows"]


def _paper000_table(groups, paper: dict, note: str) -> list[str]:
    """Table 2 / Table 3 layout: the paper's numbers (BOPS, Top-1, PGD-20[, PGD-50]) / ours, and the suite."""
    pgd50_paper = len(next(iter(paper.values()))) > 3
    lines = ["| Method | W | A | BOPS [1e8] paper / ours | Top-1 paper / ours | PGD-20 paper / ours mean (worst) | "
             + ("PGD-50 paper / ours" if pgd50_paper else "PGD-50 ours") + " mean (worst) | Standard suite ours |",
             "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        r = g[0]
        p = paper.get(r["spec"])
        pgd50 = f"{_ms(g, 'PGD-50', 'mean')} ({_ms(g, 'PGD-50', 'worst')})"
        cells = [r["method"], str(r["weights"]), str(r["activations"]),
                 f"{_fmt(p and p[0])} / {_fmt(r['bops_1e8'], 4)}", f"{_fmt(p and p[1])} / {_ms(g, 'top1')}",
                 f"{_fmt(p and p[2])} / {_ms(g, 'PGD-20', 'mean')} ({_ms(g, 'PGD-20', 'worst')})",
                 f"{_fmt(p and p[3])} / {pgd50}" if pgd50_paper else pgd50, _ms(g, "suite", "robust")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", note, ""]


def _claim1(config: dict, rows: list[dict]) -> list[str]:
    groups = group_rows(_Cfg(config), rows)
    tk = f"{config['table_budget'] * 255:g}"
    lines = _paper000_table(groups, PAPER000_TABLE2,
                            f"Ours at {tk}/255 (the paper's threat model); paper: ResNet-20 on CIFAR-10.")
    lines += _eps_table(config, groups)
    lines += ["", "Mx1 (MBN 3x1, 5x1) against every other spec, per evaluation and budget: how many of the other "
              "specs each Mx1 spec beats (mean over seeds, higher robust accuracy), of 6:", ""]
    lines += _mx1_wins(config, groups)
    return lines


def _eps_table(config: dict, groups) -> list[str]:
    eps = [e for e in config["eval_eps"] if e > 0]
    curve = f"PGD-{min(config['pgd_steps'])}"
    head = ["Method", "Clean (attacked subset)"] + [f"{curve} worst / suite at {e * 255:g}/255" for e in eps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        r = g[0]
        label = r["method"] + (f" ({RECIPE_NAMES.get(r['recipe'], r['recipe'])})"
                               if len(config.get("recipes", [])) > 1 else "")
        cells = [label, _ms(g, "clean_eval_subset")]
        for e in eps:
            k = f"{e * 255:.6g}"
            cells.append(f"{_ms(g, 'by_eps', k, curve, 'worst')} / {_ms(g, 'by_eps', k, 'suite', 'robust')}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mx1_wins(config: dict, groups) -> list[str]:
    eps = [e for e in config["eval_eps"] if e > 0]
    by_spec = {g[0]["spec"]: g for g in groups}
    mx1 = [s for s in ("mbn3x1", "mbn5x1") if s in by_spec]
    others = [s for s in by_spec if s not in mx1]
    evals = [("PGD-20 mean", ("PGD-20", "mean")), ("PGD-20 worst", ("PGD-20", "worst")),
             ("suite", ("suite", "robust"))]
    head = ["Mx1 spec", "evaluation"] + [f"{e * 255:g}/255" for e in eps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in mx1:
        for label, path in evals:
            cells = [by_spec[s][0]["method"], label]
            for e in eps:
                k = f"{e * 255:.6g}"
                mine = _mean(by_spec[s], "by_eps", k, *path)
                theirs = [_mean(by_spec[o], "by_eps", k, *path) for o in others]
                if mine is None or any(t is None for t in theirs):
                    cells.append("-")
                    continue
                beaten = [o for o, t in zip(others, theirs) if mine > t]
                lost = [by_spec[o][0]["method"] for o, t in zip(others, theirs) if mine < t]
                cells.append(f"{len(beaten)}/{len(others)}" + (f" (below: {', '.join(lost)})" if lost else ""))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _claim2(config: dict, rows: list[dict]) -> list[str]:
    groups = group_rows(_Cfg(config), rows)
    tk = f"{config['table_budget'] * 255:g}"
    return _paper000_table(groups, PAPER000_TABLE3, f"Ours at {tk}/255 (the paper's AT threat model, step "
                           "2/255); paper: ResNet-56 on CIFAR-10.") + _eps_table(config, groups)


def _imp(values: list[float | None], natural: list[float | None]) -> float | None:
    if any(v is None for v in values + natural):
        return None
    return sum(v - n for v, n in zip(values, natural)) / len(values)


def _claim3(config: dict, rows: list[dict]) -> list[str]:
    groups = group_rows(_Cfg(config), rows)
    by_recipe = {g[0]["recipe"]: g for g in groups}
    head = (["Method", "source", "Natural"] + list(PAPER003_ATTACKS) + ["Imp."]
            + [f"{a}(B)" for a in PAPER003_ATTACKS] + ["Imp.(B)", "Suite", "Total [min]", "Epoch [s]"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    nat = by_recipe.get("natural")
    nat_white = [_mean(nat, a, "mean") for a in PAPER003_ATTACKS] if nat else None
    nat_black = [_mean(nat, f"{a}(B)", "mean") for a in PAPER003_ATTACKS] if nat else None
    for recipe in ("natural", "free", "dq", "odgq"):
        name = RECIPE_NAMES[recipe]
        for source, table in (("paper CIFAR-10", PAPER003_TABLE1), ("paper MNIST", PAPER003_TABLE2)):
            p = table[recipe]
            imp_w = None if recipe == "natural" else _imp(list(p[1:6]), list(table["natural"][1:6]))
            imp_b = None if recipe == "natural" else _imp(list(p[6:11]), list(table["natural"][6:11]))
            cells = ([name, source] + [_fmt(v, 1) for v in p[:6]] + [_signed(imp_w)] + [_fmt(v, 1) for v in p[6:11]]
                     + [_signed(imp_b), "-", _fmt(p[11], 1), _fmt(p[12], 1)])
            lines.append("| " + " | ".join(cells) + " |")
        g = by_recipe.get(recipe)
        if g is None:
            continue
        white = [_mean(g, a, "mean") for a in PAPER003_ATTACKS]
        black = [_mean(g, f"{a}(B)", "mean") for a in PAPER003_ATTACKS]
        worst = [_mean(g, a, "worst") for a in PAPER003_ATTACKS]
        cells = ([name, f"**ours {config['dataset']}**", _fmt(_mean(g, "clean_eval_subset"), 1)]
                 + [f"{_fmt(m, 1)}" + ("" if w is None or m is None or abs(w - m) < 1e-9 else f" ({_fmt(w, 1)})")
                    for m, w in zip(white, worst)]
                 + [_signed(None if recipe == "natural" else _imp(white, nat_white))]
                 + [_fmt(v, 1) for v in black]
                 + [_signed(None if recipe == "natural" else _imp(black, nat_black)),
                    _fmt(_mean(g, "suite", "robust"), 1), _fmt(_mean(g, "train_s") / 60, 1),
                    _fmt(_mean(g, "epoch_s"), 1)])
        lines.append("| " + " | ".join(cells) + " |")
    top1 = {r: _mean(g, "top1") for r, g in by_recipe.items()}
    lines += ["", "Ours: the Natural column is the clean accuracy on the attacked subset (Top-1 on the whole test "
              "set: " + ", ".join(f"{RECIPE_NAMES[r]} {_fmt(v)} %" for r, v in top1.items()) + "); randomized "
              "attacks (GN, PGD) show the mean over runs and the worst case in parentheses; (B): crafted on a "
              "naturally trained FP ResNet-20; Imp.: mean improvement over natural training across the five "
              "attacks, in points; Suite: APGD-CE -> APGD-T -> Square worst case. Times: wall seconds on this "
              "machine's shared cores (the paper: one RTX 3090).", ""]
    lines += _eps_table(config, groups)
    return lines


def _signed(v) -> str:
    return "-" if v is None else f"{v:+.1f}"


CLAIMS = {"paper000-natural": ("Claim 1: naturally trained MBNs (paper 000, Table 2 layout)", _claim1),
          "paper000-fastat": ("Claim 2: FastAT-trained MBNs (paper 000, Table 3 layout)", _claim2),
          "paper003-odgq": ("Claim 3: ODG-Q on a 4-bit ResNet-20 (paper 003, Table I layout)", _claim3)}


def compare_markdown(paths: list[str | Path]) -> str:
    out = []
    for path in paths:
        config, rows = load(path)
        preset = config.get("preset")
        if preset not in CLAIMS:
            raise SystemExit(f"{path}: not a sweep made with one of the presets {', '.join(CLAIMS)}")
        title, table = CLAIMS[preset]
        out += [f"### {title}", "", f"`{path}`: {config['dataset']}, "
                f"{config['data']['train_subset']['samples'] if 'train_subset' in config['data'] else 'all'} "
                f"training examples, {config['epochs']} epochs, {rows[0]['eval_samples'] if rows else 0} attacked "
                f"test examples, seeds {', '.join(map(str, config['seeds']))}.", ""]
        out += table(config, rows) + [""]
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m bitkern.study.compare RESULTS_DIR [RESULTS_DIR ...]")
    print(compare_markdown(sys.argv[1:]))
