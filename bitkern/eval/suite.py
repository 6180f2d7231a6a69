"""The standard suite: APGD-CE -> APGD-T -> Square, each run only on the examples still robust.

This is AutoAttack's "standard" protocol (Croce & Hein, ICML 2020) on bitkern's own attacks:
* an example is robust only if it is classified correctly clean and survives every attack (worst case
  over attacks, never an average);
* every attack runs on the examples that all earlier attacks failed on, so the expensive ones cost
  little on a weak model;
* the randomness of attack A on example i comes only from (seed, global index i, A, restart), so the
  verdicts do not depend on batch size, order or how the data set is sharded;
* Square uses no gradients at all (forward passes under ``torch.inference_mode``), so it cannot be
  fooled by the straight-through estimator of a binary network; when it breaks examples that both
  gradient attacks failed on, the gradient was masked and the flag says so.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..attacks import APGD, APGDT, Square
from ..attacks._rng import derive_seeds
from ..attacks._validate import check_int, check_labels_fit, parse_eps
from ..attacks.base import frozen_state
from .. import distributed as dist_
from ._data import data_size, iter_batches, subset, take

SUITE_SCHEMA = "bitkern.suite/1"
BUDGET_SLACK = 1e-6               # float32 rounding of x +/- eps
MASKING_FRACTION = 0.002          # gradient-free successes above 0.2 % of examples -> masking suspected
NOT_BROKEN, CLEAN_ERROR = -1, 0   # codes of SuiteResult.broken_by; attack k is code k + 1


def example_seeds(seed: int, indices, attack: str) -> torch.Tensor:
    """int64 seed per example from (seed, global example index, attack name), SplitMix64-mixed."""
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    return derive_seeds(derive_seeds(idx, int(seed)), zlib.crc32(attack.encode()))


def standard_attacks(model, eps, *, apgd_steps: int = 100, n_target_classes: int = 9,
                     square_queries: int = 5000, seed: int = 0) -> dict:
    """The suite's attacks in order (AutoAttack "standard", L-inf): name -> Attack."""
    return {"APGD-CE": APGD(model, eps, steps=apgd_steps, loss="ce", seed=seed),
            "APGD-T": APGDT(model, eps, steps=apgd_steps, n_target_classes=n_target_classes, seed=seed),
            "Square": Square(model, eps, queries=square_queries, seed=seed)}


@dataclass
class SuiteResult:
    """Per-example verdicts of the standard suite.

    clean_correct: bool [N]; broken_by: int [N] (-1 robust, 0 misclassified clean, k + 1 broken by
    attack k); cost: int [N] queries (Square) or iterations (APGD) the breaking attack spent on the
    example, 0 where none broke it; attacked: per attack, how many examples it ran on and broke.
    """

    eps: float
    attacks: list
    params: dict
    clean_correct: np.ndarray
    broken_by: np.ndarray
    cost: np.ndarray
    attacked: dict
    masking: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        return int(self.clean_correct.shape[0])

    @property
    def robust(self) -> np.ndarray:
        return self.broken_by == NOT_BROKEN

    @property
    def robust_acc(self) -> float:
        return float(self.robust.mean() * 100.0)

    @property
    def clean_acc(self) -> float:
        return float(self.clean_correct.mean() * 100.0)

    def accuracy_after(self) -> dict:
        """Robust accuracy (%) after each attack of the chain (monotone by construction)."""
        out, alive = {}, self.clean_correct.copy()
        for k, name in enumerate(self.attacks):
            alive &= self.broken_by != k + 1
            out[name] = float(alive.mean() * 100.0)
        return out

    def to_dict(self) -> dict:
        return {"schema": SUITE_SCHEMA, "eps": self.eps, "eps_255": self.eps * 255.0,
                "n_examples": self.n_examples, "clean_acc": self.clean_acc, "robust_acc": self.robust_acc,
                "accuracy_after": self.accuracy_after(), "attacked": self.attacked, "params": self.params,
                "masking": self.masking, "timing": self.timing, "config": self.config}

    def arrays(self) -> dict:
        return {"suite_clean_correct": self.clean_correct, "suite_broken_by": self.broken_by.astype(np.int16),
                "suite_cost": self.cost.astype(np.int64)}

    def to_markdown(self) -> str:
        lines = [f"Standard suite at eps {self.eps * 255:.4g}/255 on {self.n_examples} examples: "
                 f"clean {self.clean_acc:.2f} %, robust **{self.robust_acc:.2f} %** (worst case over "
                 f"{' -> '.join(self.attacks)})", "",
                 "| attack | ran on | broke | robust accuracy after [%] |", "| --- | --- | --- | --- |"]
        after = self.accuracy_after()
        for name in self.attacks:
            a = self.attacked[name]
            lines.append(f"| {name} | {a['ran_on']} | {a['broke']} | {after[name]:.2f} |")
        m = self.masking
        if m:
            lines += ["", f"Gradient masking: **{m['verdict']}** ({m['message']})"]
        return "\n".join(lines) + "\n"

    @staticmethod
    def combine(results) -> "SuiteResult":
        """Concatenate results over disjoint shards in order (same eps and attacks)."""
        results = list(results)
        if not results:
            raise ValueError("combine: need at least one SuiteResult")
        first = results[0]
        for r in results[1:]:
            if r.attacks != first.attacks or r.eps != first.eps:
                raise ValueError("combine: results must have the same eps and attacks")
        attacked = {k: {"ran_on": sum(r.attacked[k]["ran_on"] for r in results),
                        "broke": sum(r.attacked[k]["broke"] for r in results)} for k in first.attacks}
        out = SuiteResult(eps=first.eps, attacks=first.attacks, params=first.params,
                          clean_correct=np.concatenate([r.clean_correct for r in results]),
                          broken_by=np.concatenate([r.broken_by for r in results]),
                          cost=np.concatenate([r.cost for r in results]), attacked=attacked,
                          timing={"seconds": sum(r.timing.get("seconds", 0.0) for r in results)},
                          config=first.config)
        out.masking = masking_verdict(out)
        return out


def masking_verdict(result: SuiteResult, whitebox_robust: np.ndarray | None = None) -> dict:
    """Flag gradient masking: gradient-free successes on examples every white-box attack failed on.

    whitebox_robust: optional bool [N], examples that further white-box attacks (e.g. PGD-20 over all
    restarts) also failed on; the count then needs all of them to have failed.
    """
    free = [k + 1 for k, name in enumerate(result.attacks) if not result.params[name].get("uses_gradients", True)]
    only_free = np.isin(result.broken_by, free)
    if whitebox_robust is not None:
        only_free &= np.asarray(whitebox_robust, dtype=bool)
    count = int(only_free.sum())
    n = result.n_examples
    limit = MASKING_FRACTION * n
    if not free:
        return {"verdict": "not checked", "count": 0, "fraction": 0.0,
                "message": "no gradient-free attack in the suite"}
    suspected = count > limit
    return {"verdict": "gradient masking suspected" if suspected else "no sign of masking", "count": count,
            "fraction": count / max(n, 1), "threshold_fraction": MASKING_FRACTION,
            "message": (f"the gradient-free attack broke {count} of {n} examples that every white-box attack "
                        f"failed on (threshold {MASKING_FRACTION:.1%})")}


def standard_suite(model, data, eps, *, seed: int = 0, batch_size: int = 256, device="cpu",
                   apgd_steps: int = 100, n_target_classes: int = 9, square_queries: int = 5000,
                   attacks: dict | None = None, index_offset: int = 0, progress=True,
                   distributed=None) -> SuiteResult:
    """Worst-case robust accuracy under APGD-CE -> APGD-T -> Square (AutoAttack "standard", L-inf).

    data: a torch Dataset of (image, label) or an (x, y) tensor pair, images in [0, 1].
    eps: L-inf budget ("8/255" or a float in [0, 1]); 0 gives the clean accuracy.
    attacks: replace the chain (name -> Attack built for ``model``), e.g. fewer queries for a quick look.
    index_offset: global index of data's first example (shards of one data set seed like the whole).
    distributed: None (default) shards when a torch.distributed group of more than one process is
        initialized (torchrun), False never, True requires a group. Every rank runs the suite on a
        contiguous share of the examples (seeded by global index), the verdicts are gathered and merged
        by index (gaps and duplicates are errors); every rank returns the same, complete result,
        identical to one process for any batch size.
    """
    eps = parse_eps(eps)
    seed = check_int(seed, "seed", 0)
    batch_size = check_int(batch_size, "batch_size", 1)
    index_offset = check_int(index_offset, "index_offset", 0)
    device = torch.device(device)
    chain = attacks if attacks is not None else standard_attacks(
        model, eps, apgd_steps=apgd_steps, n_target_classes=n_target_classes, square_queries=square_queries,
        seed=seed)
    for name, atk in chain.items():
        if atk.model is not model:
            raise ValueError(f"suite attack {name!r} was built for a different model")
        if atk.eps is not None and abs(atk.eps - eps) > BUDGET_SLACK:
            raise ValueError(f"suite attack {name!r} has eps {atk.eps} but the suite runs at {eps}")
    if dist_.active(distributed):
        return _sharded_suite(model, data, eps, chain, seed, batch_size, device, index_offset, progress)
    n = data_size(data)
    names = list(chain)
    clean = np.zeros(n, dtype=bool)
    broken_by = np.full(n, NOT_BROKEN, dtype=np.int64)
    cost = np.zeros(n, dtype=np.int64)
    attacked = {name: {"ran_on": 0, "broke": 0} for name in names}
    seconds = {}
    t0 = time.perf_counter()
    bar = tqdm(total=n * (1 + len(names)), desc=f"suite eps {eps * 255:.3g}/255", unit="ex",
               disable=None if progress else True, leave=False)
    try:
        start = 0
        for xb, yb in iter_batches(data, batch_size, device):
            with frozen_state([model]), torch.inference_mode():
                logits = model(xb)
            check_labels_fit(yb, logits.shape[1], "data labels")
            ok = (logits.argmax(1) == yb).cpu().numpy()
            clean[start:start + len(ok)] = ok
            start += len(ok)
            bar.update(len(ok))
        broken_by[~clean] = CLEAN_ERROR
        for k, name in enumerate(names):
            t1 = time.perf_counter()
            alive = np.flatnonzero(broken_by == NOT_BROKEN)
            bar.update(n - len(alive))
            if eps > 0:
                for i in range(0, len(alive), batch_size):
                    idx = alive[i:i + batch_size]
                    broke, spent = _attack_batch(model, chain[name], data, idx, index_offset, seed, name, eps,
                                                 device)
                    broken_by[idx[broke]] = k + 1
                    cost[idx[broke]] = spent[broke]
                    attacked[name]["ran_on"] += len(idx)
                    attacked[name]["broke"] += int(broke.sum())
                    bar.update(len(idx))
            else:
                bar.update(len(alive))
            seconds[name] = time.perf_counter() - t1
    finally:
        bar.close()
    params = {}
    for name, atk in chain.items():
        params[name] = {"attack": type(atk).__name__, **atk.params(), "uses_gradients": atk.uses_gradients}
    result = SuiteResult(eps=eps, attacks=names, params=params, clean_correct=clean, broken_by=broken_by,
                         cost=cost, attacked=attacked,
                         timing={"seconds": time.perf_counter() - t0, "per_attack": seconds},
                         config={"seed": seed, "batch_size": batch_size, "device": str(device),
                                 "index_offset": index_offset})
    result.masking = masking_verdict(result)
    return result


def _sharded_suite(model, data, eps, chain, seed, batch_size, device, index_offset, progress) -> SuiteResult:
    """standard_suite on this rank's contiguous share, gathered and merged by global index on every rank."""
    t0 = time.perf_counter()
    n = data_size(data)
    start, stop = dist_.shard_range(n)
    part = None
    if stop > start:
        part = standard_suite(model, subset(data, start, stop), eps, seed=seed, batch_size=batch_size,
                              device=device, attacks=chain, index_offset=index_offset + start,
                              progress=progress and dist_.is_main(), distributed=False)
    parts = [p for p in dist_.all_gather_object(None if part is None else (start, part)) if p is not None]
    merged = dist_.merge_indexed([(np.arange(s, s + r.n_examples), {"clean": r.clean_correct,
                                                                    "broken_by": r.broken_by, "cost": r.cost})
                                  for s, r in parts], n)
    first = parts[0][1]
    attacked = {k: {"ran_on": sum(r.attacked[k]["ran_on"] for _, r in parts),
                    "broke": sum(r.attacked[k]["broke"] for _, r in parts)} for k in first.attacks}
    per_attack = {k: max(r.timing.get("per_attack", {}).get(k, 0.0) for _, r in parts) for k in first.attacks}
    result = SuiteResult(eps=first.eps, attacks=first.attacks, params=first.params,
                         clean_correct=merged["clean"], broken_by=merged["broken_by"], cost=merged["cost"],
                         attacked=attacked,
                         timing={"seconds": time.perf_counter() - t0, "per_attack": per_attack,
                                 "processes": dist_.world_size()},
                         config={**first.config, "index_offset": index_offset})
    result.masking = masking_verdict(result)
    return result


def _attack_batch(model, atk, data, idx, index_offset, seed, name, eps, device):
    """Run one attack on examples idx; return (broken bool [b], cost int [b]) checked on the model."""
    xb, yb = take(data, idx, device)
    seeds = example_seeds(seed, idx + index_offset, name)
    out = atk.run(xb, yb, example_seeds=seeds)
    x_adv = out.x_adv.to(device)
    linf = float((x_adv - xb).abs().max())
    if linf > eps + BUDGET_SLACK or float(x_adv.min()) < 0 or float(x_adv.max()) > 1:
        raise RuntimeError(f"{name} left the threat model (max |x_adv - x| = {linf * 255:.4g}/255 for eps "
                           f"{eps * 255:.4g}/255): a bug in the attack")
    with frozen_state([model]), torch.inference_mode():
        broke = (model(x_adv).argmax(1) != yb).cpu().numpy()
    spent = getattr(out, "queries", None)
    if spent is None:
        spent = getattr(out, "iterations", None)
    spent = np.zeros(len(idx), np.int64) if spent is None else spent.cpu().numpy().astype(np.int64)
    return broke, spent
