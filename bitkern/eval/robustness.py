"""bitkern.eval.robustness: clean + adversarial accuracy over a data set, with a sanity report."""
from __future__ import annotations

import time
import zlib

import numpy as np
import torch
from tqdm.auto import tqdm

from ..attacks import FGSM, GN, PGD, Attack, Transfer
from ..attacks._validate import check_int, check_labels_fit
from ..attacks.base import frozen_state
from .. import distributed as dist_
from .._checks import module_device
from ._data import data_size, iter_batches, num_batches, subset, take
from .result import RobustnessResult
from .sanity import check, curve_check, ordering_check, sanity_report
from .suite import masking_verdict, standard_suite

BUDGET_SLACK = 1e-6  # float32 rounding of x +/- eps


def _named_attacks(attacks, allow_empty: bool = False) -> dict:
    if isinstance(attacks, Attack):
        attacks = [attacks]
    if isinstance(attacks, dict):
        items = list(attacks.items())
    elif isinstance(attacks, (list, tuple)):
        items = [(a.name if isinstance(a, Attack) else None, a) for a in attacks]
    else:
        raise TypeError(f"attacks must be an Attack, a list of Attacks or a dict name -> Attack, "
                        f"got {type(attacks).__name__}")
    named = {}
    for name, atk in items:
        if not isinstance(atk, Attack):
            raise TypeError(f"attacks: {name!r} is a {type(atk).__name__}, not a bitkern Attack")
        key, i = str(name), 2
        while key in named:
            key, i = f"{name}#{i}", i + 1
        named[key] = atk
    if not named and not allow_empty:
        raise ValueError("attacks is empty: give at least one attack (or a suite)")
    return named


def _model_info(model) -> dict:
    return {"class": type(model).__name__, "arch": getattr(model, "arch", None),
            "quant": getattr(model, "quant", None), "num_classes": getattr(model, "num_classes", None),
            "num_params": int(sum(p.numel() for p in model.parameters()))}


def _run_seed(seed: int, *keys: int) -> int:
    """Independent seed per (attack name, run, batch): results do not depend on the attack order."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint32)[0])


def _main_attack(named):
    """The threat model the sanity report probes: the first plain PGD, else the first PGD-like."""
    white = [a for a in named.values() if isinstance(a, PGD) and not isinstance(a, Transfer)]
    exact = [a for a in white if type(a) is PGD]
    return (exact or white or [None])[0]


def robustness(model, data, attacks=(), restarts=5, batch_size=256, device="cpu", progress=True,
               record_iterations=False, seed=0, *, sanity=True, sanity_examples=256, bops=None,
               tol_pp=1.0, suite=None, eps=None, suite_options=None, distributed=None) -> RobustnessResult:
    """Clean accuracy and, per attack, accuracy under attack (in %).

    Stochastic attacks (random start, noise) run ``restarts`` times with independent seeds; the
    result has both the mean ± std over runs (papers' convention) and the per-example worst case
    over runs (an example is robust only if it survives every run). Deterministic attacks run once.
    ``data``: torch Dataset of (image, label) or an (x, y) tensor pair, images in [0, 1].
    record_iterations: accuracy after every iteration of gradient attacks (curves in the result).
    sanity: run the computed sanity report on the first ``sanity_examples`` examples.
    suite: "standard" also runs bitkern.eval.standard_suite (APGD-CE -> APGD-T -> Square, worst case)
        at ``eps`` (default: the main PGD attack's budget) with ``suite_options`` (e.g. square_queries);
        its verdicts land in ``result.suite`` and its gradient-masking flag in the sanity report.
    distributed: None (default) shards when a torch.distributed group of more than one process is
        initialized (torchrun), False never, True requires a group. Sharded, every rank attacks a
        contiguous run of whole batches (batch b keeps its global index, so its seeds are those of the
        single process); per-example verdicts are gathered and merged by global index (gaps and
        duplicates are errors), the sanity report runs on rank 0 and every rank returns the same
        result, identical to one process with the same ``batch_size`` (the suite's verdicts are
        identical for any batch size too).
    """
    if suite not in (None, "standard"):
        raise ValueError(f"suite must be None or 'standard', got {suite!r}")
    restarts = check_int(restarts, "restarts", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    seed = check_int(seed, "seed", 0)
    device = torch.device(device)
    named = _named_attacks(attacks, allow_empty=suite is not None)
    for name, atk in named.items():
        if not isinstance(atk, Transfer) and atk.model is not model:
            raise ValueError(f"attack {name!r} was built for a different model; evaluate it on that "
                             f"model or wrap it as Transfer(source_model, attack)")
        if atk.targeted and atk.target_map is None:
            raise ValueError(f"attack {name!r} is targeted without target_map: robustness needs true "
                             f"labels, so give target_map=(x, y) -> targets")
    model_on = module_device(model)
    if model_on is not None and model_on != device:
        raise ValueError(f"model is on {model_on} but device={str(device)!r}; move the model first")

    sharded = dist_.active(distributed)
    n_all = data_size(data)
    local, b0, start, stop = data, 0, 0, n_all
    if sharded:
        b0, b1 = dist_.shard_batches(n_all, batch_size)
        start, stop = min(n_all, b0 * batch_size), min(n_all, b1 * batch_size)
        local = subset(data, start, stop)
    runs = {name: restarts if atk.stochastic else 1 for name, atk in named.items()}
    correct = {name: [[] for _ in range(r)] for name, r in runs.items()}
    curves = {}
    extras = {name: {"max_linf": 0.0, "outside_unit_range": 0, "inconsistent": 0} for name in named}
    clean = []
    subset_x, subset_y = [], []
    t0 = time.perf_counter()
    total = (num_batches(local, batch_size) if stop > start else 0) * (1 + sum(runs.values()))
    show = progress and (not sharded or dist_.is_main())   # sharded: rank 0's bar only
    bar = tqdm(total=total, desc="robustness", disable=None if show else True, leave=False)
    try:
        batches = iter_batches(local, batch_size, device) if stop > start or not sharded or not n_all else ()
        for b, (xb, yb) in enumerate(batches, start=b0):
            with frozen_state([model]), torch.no_grad():
                logits = model(xb)
            check_labels_fit(yb, logits.shape[1], "data labels")
            clean_ok = logits.argmax(1) == yb
            clean.append(clean_ok.cpu().numpy())
            bar.update(1)
            have = sum(len(t) for t in subset_y)
            if sanity and have < sanity_examples and not sharded:
                subset_x.append(xb[:sanity_examples - have])
                subset_y.append(yb[:sanity_examples - have])
            for name, atk in named.items():
                white_box = not isinstance(atk, Transfer)
                record = record_iterations and white_box and hasattr(atk, "steps")
                batch_curves = []
                for r in range(runs[name]):
                    atk.manual_seed(_run_seed(seed, zlib.crc32(name.encode()), r, b))
                    out = atk.run(xb, yb, restarts=1, record=record)
                    x_adv = out.x_adv.to(device)
                    with frozen_state([model]), torch.no_grad():
                        ok = model(x_adv).argmax(1) == yb
                    _track_invariants(extras[name], atk, xb, x_adv)
                    if white_box:
                        extras[name]["inconsistent"] += int((out.correct[0].to(device) != ok).sum())
                    # x itself lies in its eps-ball: an example misclassified clean is not robust,
                    # so robust accuracy never exceeds clean accuracy (RobustBench convention).
                    correct[name][r].append((ok & clean_ok).cpu().numpy())
                    if record:
                        batch_curves.append(out.curves[0].cpu() & clean_ok.cpu())   # [T+1, b]
                    bar.update(1)
                if record:
                    stack = torch.stack(batch_curves)                     # [runs, T+1, b]
                    counts = {"per_run": stack.sum(dim=2).numpy().astype(np.int64),
                              "worst": stack.all(dim=0).sum(dim=1).numpy().astype(np.int64)}
                    if name in curves:
                        curves[name]["per_run"] += counts["per_run"]
                        curves[name]["worst"] += counts["worst"]
                    else:
                        curves[name] = counts
    finally:
        bar.close()

    main = _main_attack(named)
    suite_result = None
    if suite is not None:
        suite_eps = eps if eps is not None else (main.eps if main else None)
        if suite_eps is None:
            raise ValueError("suite: give eps= (no PGD attack to take the budget from)")
        suite_result = standard_suite(model, data, suite_eps, seed=seed, batch_size=batch_size, device=device,
                                      progress=progress, distributed=sharded, **(suite_options or {}))
    config = {"restarts": restarts, "seed": seed, "batch_size": batch_size, "device": str(device),
              "bops": bops, "record_iterations": record_iterations,
              "eps": main.eps if main else None, "alpha": getattr(main, "alpha", None),
              "steps": getattr(main, "steps", None), "main_attack": main.name if main else None}
    if sharded:
        clean_all, correct_all, curves, extras = _merge_shards(n_all, start, stop, runs, clean, correct, curves,
                                                               extras)
    else:
        clean_all = np.concatenate(clean)
        correct_all = {k: np.stack([np.concatenate(run) for run in v]) for k, v in correct.items()}
    result = RobustnessResult(
        model=_model_info(model), config=config, clean_correct=clean_all, correct=correct_all,
        params={k: a.params() for k, a in named.items()}, curve_counts=curves, extras=extras,
        suite=suite_result)
    if suite_result is not None:
        whitebox = [c.all(axis=0) for k, c in result.correct.items() if named[k].uses_gradients]
        robust_all = np.logical_and.reduce(whitebox) if whitebox else None
        suite_result.masking = masking_verdict(suite_result, robust_all)
    result.timing = {"seconds": time.perf_counter() - t0}
    if sanity and sharded:   # rank 0 alone, on the same first examples as one process; then shared
        t1 = time.perf_counter()
        report = None
        if dist_.is_main():
            sx, sy = take(data, range(min(n_all, sanity_examples)), device)
            report = _sanity_report(model, named, result, main, sx, sy, restarts, seed, tol_pp, suite_result)
        result.sanity = dist_.broadcast_object(report)
        result.timing["sanity_seconds"] = time.perf_counter() - t1
    elif sanity:
        t1 = time.perf_counter()
        result.sanity = _sanity_report(model, named, result, main, torch.cat(subset_x), torch.cat(subset_y),
                                       restarts, seed, tol_pp, suite_result)
        result.timing["sanity_seconds"] = time.perf_counter() - t1
    return result


def _sanity_report(model, named, result, main, x, y, restarts, seed, tol_pp, suite_result) -> dict:
    report = _sanity(model, named, result, main, x, y, restarts, seed, tol_pp)
    if suite_result is not None:
        m = suite_result.masking
        report["checks"].append(check("gradient_free_vs_whitebox", m["verdict"] != "gradient masking "
                                      "suspected", {"count": m["count"], "fraction": m["fraction"]},
                                      m["message"]))
        report["passed"] = all(c["passed"] is not False for c in report["checks"])
        report["violations"] = [c["name"] for c in report["checks"] if c["passed"] is False]
    return report


def _merge_shards(n, start, stop, runs, clean, correct, curves, extras):
    """Gather every rank's per-example verdicts and merge them by global index (exact, checked)."""
    k = stop - start
    arrays = {"clean": np.concatenate(clean) if clean else np.zeros(0, bool)}
    for name, r in runs.items():
        arrays[f"attack:{name}"] = (np.stack([np.concatenate(run) for run in correct[name]]) if k
                                    else np.zeros((r, 0), bool))
    merged = dist_.gather_indexed(np.arange(start, stop), arrays, n)
    correct_all = {name: merged[f"attack:{name}"] for name in runs}
    # curves are counts of robust examples per iteration: they add over disjoint shards
    curves_all = {}
    for part in dist_.all_gather_object(curves):
        for name, c in part.items():
            if name in curves_all:
                curves_all[name] = {key: curves_all[name][key] + c[key] for key in ("per_run", "worst")}
            else:
                curves_all[name] = {key: c[key].copy() for key in ("per_run", "worst")}
    extras_all = {}
    for part in dist_.all_gather_object(extras):
        for name, e in part.items():
            if name not in extras_all:
                extras_all[name] = dict(e)
                continue
            tot = extras_all[name]
            tot["max_linf"] = max(tot["max_linf"], e["max_linf"])
            tot["outside_unit_range"] += e["outside_unit_range"]
            tot["inconsistent"] += e["inconsistent"]
    return merged["clean"], correct_all, {k: curves_all[k] for k in curves_all}, extras_all


def _track_invariants(extra, atk, x, x_adv):
    extra["max_linf"] = max(extra["max_linf"], float((x_adv - x).abs().max()))
    extra["outside_unit_range"] += int(((x_adv < 0) | (x_adv > 1)).flatten(1).any(1).sum())


def _sanity(model, named, result, main, x, y, restarts, seed, tol_pp) -> dict:
    """Checks on the main results + the computed report on a subset."""
    n = result.n_examples
    stats = result.attacks
    checks = []
    bad = {k: e for k, e in result.extras.items()
           if e["outside_unit_range"] or (named[k].eps is not None
                                          and e["max_linf"] > named[k].eps + BUDGET_SLACK)}
    checks.append(check("perturbation_within_budget", not bad,
                        {k: e["max_linf"] * 255 for k, e in result.extras.items()},
                        "max |x_adv - x| in /255 per attack" if not bad else f"violations: {sorted(bad)}"))
    mismatch = {k: e["inconsistent"] for k, e in result.extras.items() if e["inconsistent"]}
    checks.append(check("attack_and_eval_agree", not mismatch, mismatch,
                        "" if not mismatch else "the attack's own forward and the evaluation disagree: "
                        "a stochastic model or train-mode layers"))
    for name, s in stats.items():
        if "curve" in s:
            checks.append(curve_check(f"iterations_non_increasing[{name}]", s["curve"]["mean"],
                                      s["curve"]["worst"], n, tol_pp))
    # a multi-step white-box attack must beat, in the same eps-ball: FGSM, noise and transfer
    white = [k for k, a in named.items() if isinstance(a, PGD)]
    for k in white:
        eps = named[k].eps
        for other, a in named.items():
            same_ball = a.eps is not None and a.eps <= eps + BUDGET_SLACK
            if isinstance(a, (FGSM, GN, Transfer)) and same_ball:
                checks.append(ordering_check(f"{k}_at_least_{other}", stats[k]["mean"], stats[other]["mean"],
                                             n, tol_pp, k, other))
    report = {"passed": None, "checks": checks}
    if main is None:
        checks.append(check("subset_report", None, message="skipped: no white-box PGD/BIM/TPGD attack"))
    else:
        transfer = next((a for a in named.values() if isinstance(a, Transfer) and a.eps == main.eps), None)
        sub = sanity_report(model, x, y, eps=main.eps, alpha=main.alpha, steps=main.steps,
                            restarts=min(restarts, 2), seed=seed, transfer=transfer, tol_pp=tol_pp)
        for c in sub["checks"]:
            c["name"] = f"subset:{c['name']}"
        checks.extend(sub["checks"])
        report["subset"] = {"n_examples": sub["n_examples"], "threat_model": sub["threat_model"]}
    report["passed"] = all(c["passed"] is not False for c in checks)
    report["violations"] = [c["name"] for c in checks if c["passed"] is False]
    return report
