"""RobustnessResult: per-example correctness + the statistics and files derived from it."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import numpy as np

from .._io import atomic_write_npz, atomic_write_text

SCHEMA = "bitkern.robustness/1"


def attack_stats(correct: np.ndarray, curve_counts: dict | None, n: int) -> dict:
    """correct bool [runs, N] -> mean/std over runs and per-example worst case, in %."""
    per_run = correct.mean(axis=1) * 100.0
    stats = {
        "runs": int(correct.shape[0]),
        "mean": float(per_run.mean()),
        # sample std over runs (ddof=1); 0 for a single (deterministic) run
        "std": float(per_run.std(ddof=1)) if correct.shape[0] > 1 else 0.0,
        "worst": float(correct.all(axis=0).mean() * 100.0),
        "per_run": [float(v) for v in per_run],
    }
    if curve_counts is not None:
        runs = curve_counts["per_run"].astype(np.float64) / n * 100.0  # [runs, T+1]
        stats["curve"] = {
            "iterations": list(range(runs.shape[1])),
            "mean": [float(v) for v in runs.mean(axis=0)],
            "std": [float(v) for v in (runs.std(axis=0, ddof=1) if runs.shape[0] > 1 else 0 * runs[0])],
            "worst": [float(v) for v in curve_counts["worst"].astype(np.float64) / n * 100.0],
        }
    return stats


@dataclass
class RobustnessResult:
    """Output of ``bitkern.eval.robustness``; accuracies in %.

    clean_correct: bool [N]; correct[name]: bool [runs, N] (one row per restart/run), so shards of a
    data set combine exactly with ``RobustnessResult.combine``.
    """

    model: dict
    config: dict
    clean_correct: np.ndarray
    correct: dict
    params: dict
    curve_counts: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)   # per attack: max_linf, inconsistent, ...
    sanity: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    suite: object = None                         # bitkern.eval.suite.SuiteResult when a suite ran

    @property
    def n_examples(self) -> int:
        return int(self.clean_correct.shape[0])

    @property
    def clean_acc(self) -> float:
        return float(self.clean_correct.mean() * 100.0)

    @property
    def attacks(self) -> dict:
        out = {}
        for name, correct in self.correct.items():
            out[name] = {"params": self.params[name],
                         **attack_stats(correct, self.curve_counts.get(name), self.n_examples),
                         **self.extras.get(name, {})}
        return out

    def nested_within(self, smaller: "RobustnessResult") -> "RobustnessResult":
        """This result with every example broken at a smaller budget counted as broken here too: the
        smaller L-inf ball lies inside this one, so its adversarial examples are valid here. For each
        attack, run r of an example stays robust only if it is robust here and, for every attack of
        `smaller`, in its run r (as many runs) or in all its runs (a different number of runs). Robust
        accuracy then falls monotonically with eps (apply in ascending order). The suite's verdicts are
        left as they are."""
        if smaller.n_examples != self.n_examples:
            raise ValueError(f"nested_within: {smaller.n_examples} examples vs {self.n_examples}")
        correct = {}
        for name, c in self.correct.items():
            for other in smaller.correct.values():
                c = c & (other if other.shape == c.shape else other.all(axis=0, keepdims=True))
            correct[name] = c
        config = {**self.config, "nested_within_eps": smaller.config.get("eps")}
        return dataclasses.replace(self, correct=correct, config=config)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "bops": self.config.get("bops"),
            "n_examples": self.n_examples,
            "eps": self.config.get("eps"),
            "eps_255": None if self.config.get("eps") is None else self.config["eps"] * 255.0,
            "alpha": self.config.get("alpha"),
            "steps": self.config.get("steps"),
            "restarts": self.config.get("restarts"),
            "seed": self.config.get("seed"),
            "config": self.config,
            "clean": {"acc": self.clean_acc, "n_correct": int(self.clean_correct.sum())},
            "attacks": self.attacks,
            "suite": None if self.suite is None else self.suite.to_dict(),
            "sanity": self.sanity,
            "timing": self.timing,
        }

    def to_json(self, path) -> str:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n")

    def to_markdown(self) -> str:
        m = self.model
        lines = [f"### {m.get('arch') or m.get('class')} ({m.get('quant') or 'n/a'}), "
                 f"{self.n_examples} examples",
                 "",
                 f"Clean accuracy: **{self.clean_acc:.2f} %**"
                 + (f" · BOPS: {self.config['bops']:.4g}" if self.config.get("bops") else ""),
                 "",
                 "| attack | eps (/255) | alpha (/255) | steps | runs | mean ± std over runs [%] "
                 "| worst case over runs [%] |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, s in self.attacks.items():
            p = s["params"]
            lines.append(f"| {name} | {_px(p.get('eps'))} | {_px(p.get('alpha'))} | {p.get('steps', '-')} | "
                         f"{s['runs']} | {s['mean']:.2f} ± {s['std']:.2f} | {s['worst']:.2f} |")
        lines += ["", "mean ± std: accuracy per run averaged over runs (papers' convention); worst case: an "
                  "example counts as robust only if it survives every run (Madry / AutoAttack convention)."]
        if self.suite is not None:
            lines += ["", self.suite.to_markdown()]
        lines += ["", sanity_markdown(self.sanity)]
        return "\n".join(lines) + "\n"

    def save(self, path) -> dict:
        """Write <stem>.json, <stem>.md and <stem>.npz (per-example arrays) atomically."""
        stem = os.fspath(path)
        if stem.endswith(".json"):
            stem = stem[:-5]
        arrays = {"clean_correct": self.clean_correct}
        for i, (name, correct) in enumerate(self.correct.items()):
            arrays[f"attack{i}_correct"] = correct
        index = {f"attack{i}": name for i, name in enumerate(self.correct)}
        if self.suite is not None:
            arrays.update(self.suite.arrays())
        data = self.to_dict()
        data["arrays"] = {"file": os.path.basename(stem) + ".npz", "attacks": index}
        paths = {"json": atomic_write_text(stem + ".json", json.dumps(data, indent=2) + "\n"),
                 "md": atomic_write_text(stem + ".md", self.to_markdown()),
                 "npz": atomic_write_npz(stem + ".npz", arrays)}
        return paths

    @staticmethod
    def combine(results) -> "RobustnessResult":
        """Concatenate results over disjoint example shards (same attacks, same runs)."""
        results = list(results)
        if not results:
            raise ValueError("combine: need at least one RobustnessResult")
        names = list(results[0].correct)
        for r in results[1:]:
            if list(r.correct) != names or any(r.correct[k].shape[0] != results[0].correct[k].shape[0]
                                               for k in names):
                raise ValueError("combine: results must have the same attacks and runs")
        curves = {}
        for k in names:
            if all(k in r.curve_counts for r in results):
                curves[k] = {"per_run": sum(r.curve_counts[k]["per_run"] for r in results),
                             "worst": sum(r.curve_counts[k]["worst"] for r in results)}
        extras = {}
        for k in names:
            e = [r.extras.get(k, {}) for r in results]
            extras[k] = {"max_linf": max(x.get("max_linf", 0.0) for x in e),
                         "inconsistent": sum(x.get("inconsistent", 0) for x in e)}
        sanity = {"passed": all(r.sanity.get("passed") is not False for r in results),
                  "shards": [r.sanity for r in results]}
        suites = [r.suite for r in results]
        if any(s is None for s in suites) and not all(s is None for s in suites):
            raise ValueError("combine: either every shard ran the suite or none did")
        from .suite import SuiteResult

        return RobustnessResult(
            suite=None if suites[0] is None else SuiteResult.combine(suites),
            model=results[0].model, config=results[0].config,
            clean_correct=np.concatenate([r.clean_correct for r in results]),
            correct={k: np.concatenate([r.correct[k] for r in results], axis=1) for k in names},
            params=results[0].params, curve_counts=curves, extras=extras, sanity=sanity,
            timing={"seconds": sum(r.timing.get("seconds", 0.0) for r in results)})


def _px(value) -> str:
    return "-" if value is None else f"{value * 255:.3g}"


def sanity_markdown(sanity: dict) -> str:
    if not sanity:
        return "Sanity report: not run."
    if "shards" in sanity:
        return "Sanity report: " + ("all shards passed." if sanity["passed"] else
                                    "**VIOLATIONS in some shards** (see JSON).")
    lines = ["Sanity report (Carlini et al. 2019 checklist): "
             + ("all checks passed." if sanity.get("passed") else "**VIOLATIONS FLAGGED**"),
             "", "| check | result | numbers |", "| --- | --- | --- |"]
    for c in sanity.get("checks", []):
        verdict = {True: "passed", False: "**FAILED**", None: "skipped"}[c["passed"]]
        numbers = ", ".join(f"{k}={_fmt(v)}" for k, v in c.get("numbers", {}).items())
        lines.append(f"| {c['name']} | {verdict} | {numbers or c.get('message', '')} |")
    return "\n".join(lines)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)
