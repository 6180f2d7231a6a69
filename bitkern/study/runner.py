"""Running the study: per spec train -> save -> freeze -> Top-1 -> attacks at every budget -> BOPS -> row,
specs serially or side by side in worker processes, resume, and the summaries after every spec.

Every config lives in ``<out>/configs/<spec>/`` (see study.results); a killed sweep rerun with
resume=True skips done configs and resumes a half-trained one from its last epoch checkpoint.

Worker processes (``SweepConfig.workers``; 1 by default, None = one per available CPU core when torch
runs single-threaded on the CPU, which is what ``bitkern sweep`` asks for, e.g. on digits). Like any
multiprocessing "spawn" user, a script calling run_sweep with workers != 1 needs the
``if __name__ == "__main__":`` guard. Each config is independent (seeded from cfg.seed
alone, its own directory) and every worker runs torch with the parent's thread count, so a parallel run
writes exactly the files a serial run writes; rows are always reported in spec order.

Under torchrun (a torch.distributed group of more than one process) the pending specs are spread over
the ranks (spec i of the pending list to rank i mod world size): each config is trained and evaluated
by one rank with the single-process code (no DDP, no sharding: configs are independent, so this needs
no communication and each config's files are exactly those of a serial run); rank 0 writes
sweep_config.json and the merged summaries, after each of its configs and once every rank is done.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import queue as queue_mod
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from .. import checkpoint as ckpt
from .. import distributed as dist_
from .._io import atomic_write_json
from ..data import balanced_subset, dataset_info, load_dataset
from ..eval import evaluate_accuracy
from ..train import fit
from .config import (SweepConfig, SweepError, curve_attack, eps_key, parse_attack, recipe_args, run_key, runs,
                     table_attacks, validate)
from .results import any_done, config_dir, load_done, save_result, source_dir, write_summaries
from .tables import method_columns

__all__ = ["run_sweep", "run_config", "plan_workers", "make_attack", "train_source"]

Run = tuple[str, str, int]   # (spec, recipe, seed): one config of the study


def _model_kwargs(cfg: SweepConfig, x: torch.Tensor, num_classes: int) -> dict[str, Any]:
    return {"num_classes": num_classes, "in_channels": int(x.shape[1])}


def make_attack(name: str, model, eps: float, alpha: float):
    """A table attack by name (config.parse_attack): GN (std eps, clipped to the eps-ball, paper 003's GN),
    FGSM, PGD-k (random start), BIM-k (PGD without random start), TPGD-k (TRADES' KL objective)."""
    from ..attacks import BIM, FGSM, GN, PGD, TPGD

    kind, k = parse_attack(name)
    if kind == "GN":
        return GN(model, std=eps, eps=eps)
    if kind == "FGSM":
        return FGSM(model, eps)
    cls = {"PGD": PGD, "BIM": BIM, "TPGD": TPGD}[kind]
    return cls(model, eps, alpha, k, **({"random_start": True} if kind == "PGD" else {}))


def _evaluate(cfg: SweepConfig, frozen, x, y, eps: float, source=None):
    """Robustness at one budget: every table attack (and, with a transfer source, each of them crafted
    on the source: "<name>(B)") at the table budget, the curve attack elsewhere."""
    from ..attacks import Transfer
    from ..eval import robustness

    table = cfg.is_table_eps(eps)
    alpha = cfg.alpha_for(eps)
    names = table_attacks(cfg) if table else (curve_attack(cfg),)
    attacks = {n: make_attack(n, frozen, eps, alpha) for n in names}
    if table and source is not None:
        attacks.update({f"{n}(B)": Transfer(source, make_attack(n, frozen, eps, alpha)) for n in names})
    return robustness(frozen, (x, y), attacks, restarts=cfg.restarts, batch_size=256, device=cfg.device,
                      distributed=False,
                      progress=bool(cfg.progress) if cfg.progress is not None else True,
                      record_iterations=table, seed=cfg.seed, sanity=cfg.sanity and table, suite=cfg.suite,
                      eps=eps, suite_options={"square_queries": cfg.square_queries,
                                              "apgd_steps": cfg.apgd_steps,
                                              "n_target_classes": cfg.apgd_targets})


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


def _train(cfg: SweepConfig, spec: str, data: dict, cdir: Path, tick=None):
    """Train ``spec`` with cfg's recipe and seed in ``cdir`` (resumable); returns (model, TrainResult, s)."""
    from ..models import create

    x_tr, y_tr, num_classes = data["x_tr"], data["y_tr"], data["num_classes"]
    torch.manual_seed(cfg.seed)
    model = create(cfg.arch, spec, **_model_kwargs(cfg, x_tr, num_classes))
    meta = {"arch": cfg.arch, "quant": spec, "num_classes": num_classes, "in_channels": int(x_tr.shape[1]),
            "dataset": cfg.dataset}
    t0 = time.perf_counter()
    res = fit(model, (x_tr, y_tr), recipe=cfg.recipe, recipe_args=recipe_args(cfg, spec), eps=cfg.train_eps,
              epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
              weight_decay=cfg.weight_decay, schedule=cfg.schedule, augment=cfg.augment, device=cfg.device,
              seed=cfg.seed, checkpoint_dir=cdir / "checkpoint", resume=True, log_path=cdir / "train_log.jsonl",
              progress=cfg.progress, meta=meta, on_epoch=None if tick is None else (lambda _row: tick()),
              distributed=False)
    train_s = time.perf_counter() - t0
    ckpt.save_model(cdir / "model.safetensors", model, meta)
    return model, res, train_s


SOURCE_SEED_OFFSET = 1000   # the transfer source's seed: the study's first seed + this (never a target's)


def train_source(cfg: SweepConfig, data: dict, log: Callable[[str], None]) -> None:
    """Train the transfer source (cfg.transfer_source, natural recipe) once; source.json marks it done."""
    sdir = source_dir(cfg)
    marker = sdir / "source.json"
    scfg = dataclasses.replace(cfg, recipe="natural", recipe_args={}, seed=cfg.seeds[0] + SOURCE_SEED_OFFSET)
    ident = {**scfg.identity(), "spec": cfg.transfer_source}
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text())
        except json.JSONDecodeError:
            saved = None
        if saved is not None and saved.get("config") == ident:
            log(f"transfer source {cfg.transfer_source}: trained earlier, reused")
            return
    sdir.mkdir(parents=True, exist_ok=True)
    model, res, train_s = _train(scfg, cfg.transfer_source, data, sdir)
    top1 = evaluate_accuracy(model, (data["x_te"], data["y_te"]), device=cfg.device)
    atomic_write_json(marker, {"config": ident, "top1": top1, "train_s": round(train_s, 2)})
    log(f"transfer source {cfg.transfer_source} (natural, seed {scfg.seed}): top-1 {top1:.2f}%  "
        f"train {train_s:.0f}s")


def _load_source(cfg: SweepConfig):
    from ..freeze import freeze

    if cfg.transfer_source is None:
        return None
    return freeze(ckpt.load_model(source_dir(cfg) / "model.safetensors")).to(cfg.device)


def run_config(cfg: SweepConfig, spec: str, data: dict, log: Callable[[str], None],
               tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train, freeze, evaluate and count one config (``cfg``: the config's own, ``SweepConfig.for_run``);
    returns its result row (also saved).

    tick: called after every training epoch and every attacked budget (progress of a worker)."""
    from ..bops import count
    from ..freeze import freeze

    cdir = config_dir(cfg, spec)
    cdir.mkdir(parents=True, exist_ok=True)
    x_tr, x_te, y_te = data["x_tr"], data["x_te"], data["y_te"]
    model, res, train_s = _train(cfg, spec, data, cdir, tick)

    t1 = time.perf_counter()
    frozen = freeze(model).to(cfg.device)
    frozen.save(cdir / "frozen.safetensors")
    source = _load_source(cfg)
    top1 = evaluate_accuracy(frozen, (x_te, y_te), device=cfg.device)
    n = x_te.shape[0] if cfg.eval_samples == 0 else min(cfg.eval_samples, x_te.shape[0])
    by_eps, table, smaller = {}, None, None
    for eps in cfg.eval_eps:  # ascending
        if eps == 0:
            continue   # the clean accuracy on the subset, exactly
        rob = _evaluate(cfg, frozen, x_te[:n], y_te[:n], eps, source)
        # An example broken at a smaller budget is broken here too (nested balls): monotone curves.
        rob = rob if smaller is None else rob.nested_within(smaller)
        smaller = rob
        is_table = cfg.is_table_eps(eps)
        rob.save(cdir / ("robustness" if is_table else f"robustness-eps{eps_key(eps)}"))
        by_eps[eps_key(eps)] = _budget_row(eps, rob)
        if is_table:
            table = rob
        if tick is not None:
            tick()
    eval_s = time.perf_counter() - t1
    bops = count(model, tuple(x_tr.shape[1:]))

    clean_subset = evaluate_accuracy(frozen, (x_te[:n], y_te[:n]), device=cfg.device)
    row: dict[str, Any] = {"spec": spec, "key": run_key(cfg, spec), "seed": cfg.seed, **method_columns(spec),
                           "bops": int(bops.total), "bops_1e8": bops.total / 1e8, "macs": int(bops.macs),
                           "top1": top1, "clean_eval_subset": clean_subset, "eval_samples": n,
                           "train_samples": int(x_tr.shape[0]), "table_eps": cfg.table_eps}
    if table is not None:
        row.update({k: v for k, v in by_eps[eps_key(cfg.table_eps)].items() if k not in ("eps", "eps_255")})
    row["by_eps"] = by_eps
    rd = table.to_dict() if table is not None else {}
    row.update({"train_acc": res.final.get("train_acc"), "train_loss": res.final.get("loss"),
                "epochs_run": res.epochs_run, "recipe": res.recipe, "recipe_args": res.recipe_args,
                "train_s": round(train_s, 2), "epoch_s": round(train_s / max(1, res.epochs_run), 2),
                "eval_s": round(eval_s, 2), "sanity_passed": (rd.get("sanity") or {}).get("passed")})
    save_result(cfg, spec, row)
    suite = f"  suite {row['suite']['robust']:.2f}%" if "suite" in row else ""
    log(f"{row['key']}: top-1 {top1:.2f}%  at {cfg.table_eps * 255:g}/255: "
        + "  ".join(f"{k} {row[k]['mean']:.2f}% (worst {row[k]['worst']:.2f}%)" for k in rd.get("attacks", {}))
        + suite + f"  BOPS {bops.total / 1e8:.4f}e8  train {train_s:.0f}s eval {eval_s:.0f}s")
    return row


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan_workers(cfg: SweepConfig, pending: int) -> int:
    """How many processes run the ``pending`` specs: cfg.workers if set, else (None) one per available core
    when the sweep runs on the CPU with single-threaded torch (with more torch threads, processes would
    only compete with them); never more than there are specs."""
    if pending <= 1:
        return 1
    if cfg.workers is not None:
        return min(cfg.workers, pending)
    if torch.device(cfg.device).type != "cpu" or torch.get_num_threads() != 1:
        return 1
    return max(1, min(_available_cores(), pending))


def _load_data(cfg: SweepConfig) -> dict:
    """Both splits, the training set cut to cfg.train_samples (a fixed class-balanced subset), and what
    the results record about the data (sizes, shape, the subset's sha256)."""
    x_tr, y_tr = load_dataset(cfg.dataset, cfg.data_dir, "train", image_size=cfg.image_size)
    x_te, y_te = load_dataset(cfg.dataset, cfg.data_dir, "test", image_size=cfg.image_size)
    info = dataset_info(cfg.dataset)
    num_classes = info["num_classes"] or int(max(y_tr.max(), y_te.max())) + 1
    record = {"train_size": int(x_tr.shape[0]), "test_size": int(x_te.shape[0]),
              "input_shape": list(x_tr.shape[1:])}
    if cfg.train_samples:
        try:
            idx = balanced_subset(y_tr, cfg.train_samples)
        except ValueError as e:
            raise SweepError(f"--train-samples {cfg.train_samples}: {e}") from None
        x_tr, y_tr = x_tr[idx], y_tr[idx]
        record["train_subset"] = {"samples": int(idx.numel()), "rule": "first examples of each class in file order",
                                  "indices_sha256": hashlib.sha256(idx.numpy().tobytes()).hexdigest()}
    return {"x_tr": x_tr, "y_tr": y_tr, "x_te": x_te, "y_te": y_te, "num_classes": num_classes,
            "record": record}


def _write_sweep_config(cfg: SweepConfig, out: Path, data: dict) -> None:
    atomic_write_json(out / "sweep_config.json", {**cfg.identity(), "specs": list(cfg.specs),
                                                  "recipes": list(cfg.recipes), "seeds": list(cfg.seeds),
                                                  "preset": cfg.preset, "device": cfg.device,
                                                  "data_dir": cfg.data_dir, "data": data["record"]})


def _load_runs_done(cfg: SweepConfig) -> dict[Run, dict[str, Any]]:
    return {r: row for r in runs(cfg) if (row := load_done(cfg.for_run(r[1], r[2]), r[0])) is not None}


def _describe(cfg: SweepConfig, data: dict) -> str:
    extra = (f", recipes {', '.join(cfg.recipes)}" if len(cfg.recipes) > 1 else f", recipe {cfg.recipe}")
    extra += f", seeds {', '.join(map(str, cfg.seeds))}" if len(cfg.seeds) > 1 else ""
    return (f"sweep: {cfg.arch} on {cfg.dataset} ({data['x_tr'].shape[0]} train / {data['x_te'].shape[0]} test)"
            f"{extra}, {cfg.epochs} epochs, specs {', '.join(cfg.specs)}")


def run_sweep(config: SweepConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the study; returns the result rows (one per config, in table order: recipe, spec, seed)."""
    cfg = config.resolved()
    validate(cfg)
    out = Path(cfg.out)
    if any_done(out) and not cfg.resume:
        raise SweepError(f"{out} already holds sweep results; pass --resume to continue it or choose "
                         f"another --out")
    if dist_.active():
        return _run_sweep_ranks(cfg, log)
    torch.manual_seed(cfg.seed)
    data = _load_data(cfg)
    out.mkdir(parents=True, exist_ok=True)
    _write_sweep_config(cfg, out, data)
    done = _load_runs_done(cfg)
    pending = [r for r in runs(cfg) if r not in done]
    workers = plan_workers(cfg, len(pending))
    log(_describe(cfg, data) + f" -> {out}" + (f" ({workers} worker processes)" if workers > 1 else ""))
    t0 = time.perf_counter()
    if cfg.transfer_source is not None and pending:
        train_source(cfg, data, log)

    def rows_so_far() -> list[dict[str, Any]]:
        return [done[r] for r in runs(cfg) if r in done]

    for r in runs(cfg):
        if r in done:
            log(f"{run_key(cfg.for_run(r[1], r[2]), r[0])}: done earlier, skipped")
    if done:
        write_summaries(cfg, rows_so_far(), out)
    if workers <= 1:
        for r in pending:
            done[r] = run_config(cfg.for_run(r[1], r[2]), r[0], data, log)
            write_summaries(cfg, rows_so_far(), out)
    else:
        with contextlib.closing(_run_parallel(cfg, pending, data, workers, log)) as finished:
            for r, row in finished:   # closing: the workers stop if writing the summaries fails
                done[r] = row
                write_summaries(cfg, rows_so_far(), out)
    log(f"sweep finished in {time.perf_counter() - t0:.0f}s; results in {out}/results.md")
    return rows_so_far()


def _run_sweep_ranks(cfg: SweepConfig, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The sweep under torchrun: pending configs spread over the ranks, merged summaries by rank 0."""
    out = Path(cfg.out)
    rank, world = dist_.rank(), dist_.world_size()
    # every rank decides from the same files before anyone writes
    refuse = any_done(out) and not cfg.resume
    dist_.barrier()
    if refuse:
        raise SweepError(f"{out} already holds sweep results; pass --resume to continue it or choose "
                         f"another --out")
    torch.manual_seed(cfg.seed)
    data = _load_data(cfg)
    done = _load_runs_done(cfg)
    dist_.barrier()
    pending = [r for r in runs(cfg) if r not in done]
    mine = pending[rank::world]
    if dist_.is_main():
        out.mkdir(parents=True, exist_ok=True)
        _write_sweep_config(cfg, out, data)
        log(_describe(cfg, data) + f" -> {out} ({world} ranks, {len(pending)} configs to run)")
        for r in runs(cfg):
            if r in done:
                log(f"{run_key(cfg.for_run(r[1], r[2]), r[0])}: done earlier, skipped")
        if cfg.transfer_source is not None and pending:
            train_source(cfg, data, log)
    dist_.barrier()
    wcfg = dataclasses.replace(cfg, progress=False) if world > 1 else cfg
    device = str(dist_.local_device(cfg.device))
    wcfg = dataclasses.replace(wcfg, device=device)
    prefix = f"[rank {rank}] " if rank else ""
    t0 = time.perf_counter()
    for spec, recipe, seed in mine:
        run_config(wcfg.for_run(recipe, seed), spec, data, lambda msg: log(prefix + msg))
        if dist_.is_main():   # the summaries so far: every config any rank has finished
            write_summaries(cfg, list(_load_runs_done(cfg).values()), out)
    dist_.barrier()
    done = _load_runs_done(cfg)
    missing = [run_key(cfg.for_run(r[1], r[2]), r[0]) for r in runs(cfg) if r not in done]
    if missing:
        raise SweepError(f"configs {', '.join(missing)} have no result after every rank finished")
    rows = [done[r] for r in runs(cfg)]
    if dist_.is_main():
        write_summaries(cfg, rows, out)
        log(f"sweep finished in {time.perf_counter() - t0:.0f}s; results in {out}/results.md")
    dist_.barrier()
    return rows


# ------------------------------------------------------------------------------ worker processes
def _exit_with_parent(parent_pid: int, period_s: float = 1.0) -> None:
    """Stop this worker as soon as the sweep process that started it is gone (killed by a signal, which
    skips multiprocessing's cleanup): an orphaned worker would go on taking queued configs and writing
    into the output directory under the next run's feet."""
    import threading

    def watch():
        while True:
            time.sleep(period_s)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, name="bitkern-sweep-parent-watch", daemon=True).start()


def _worker_main(cfg: SweepConfig, data: dict, threads: int, backend: str | None, tasks, events,
                 parent_pid: int) -> None:
    """One worker: run the specs it takes from ``tasks`` and report on ``events`` until it gets None.
    It runs with the parent's torch thread count and forced backend (the environment is inherited), and
    exits when the parent process dies."""
    _exit_with_parent(parent_pid)
    torch.set_num_threads(threads)
    if backend is not None:
        from ..dispatch import set_backend

        set_backend(backend)
    while True:
        run = tasks.get()
        if run is None:
            return
        spec, recipe, seed = run
        try:
            row = run_config(cfg.for_run(recipe, seed), spec, data, log=lambda msg: events.put(("log", run, msg)),
                             tick=lambda: events.put(("tick", run, None)))
            events.put(("done", run, row))
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which re-raises it
            try:
                payload = pickle.dumps(e)
            except Exception:  # noqa: BLE001 - an exception that cannot cross processes
                payload = None
            events.put(("error", run, (payload, f"{type(e).__name__}: {e}", traceback.format_exc())))
            return


def _run_parallel(cfg: SweepConfig, pending: list[Run], data: dict, workers: int, log: Callable[[str], None]):
    """Yield (run, row) as the worker processes finish the pending configs (in completion order).

    The configs are queued in table order and each worker takes the next one when it is free. Workers
    get cfg with progress bars off (several processes cannot share a terminal line); this process shows
    one bar over every spec's epochs and budgets and forwards the workers' log lines."""
    import multiprocessing as mp

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")   # fork() after torch's OpenMP pool has started can hang
    tasks, events = ctx.Queue(), ctx.Queue()
    for run in pending:
        tasks.put(run)
    for _ in range(workers):
        tasks.put(None)
    from ..dispatch import forced_backend

    wcfg = dataclasses.replace(cfg, progress=False)
    args = (wcfg, data, torch.get_num_threads(), forced_backend(), tasks, events, os.getpid())
    procs = [ctx.Process(target=_worker_main, args=args,
                         name=f"bitkern-sweep-{i}", daemon=True) for i in range(workers)]
    n_budgets = sum(1 for e in cfg.eval_eps if e > 0)
    show = cfg.progress if cfg.progress is not None else None
    bar = tqdm(total=len(pending) * (cfg.epochs + n_budgets), desc="sweep", leave=False,
               disable=None if show is None else not show, dynamic_ncols=True)
    remaining = set(pending)
    try:
        for p in procs:
            p.start()
        while remaining:
            try:
                kind, run, payload = events.get(timeout=1.0)
            except queue_mod.Empty:
                kind = None
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or (kind is None and not any(p.is_alive() for p in procs)):
                # killed (a signal, the out-of-memory killer): what it had done is on disk, resumable
                left = ", ".join(run_key(cfg.for_run(r[1], r[2]), r[0]) for r in pending if r in remaining)
                raise SweepError(f"a sweep worker process exited (code {dead[0] if dead else 0}) before "
                                 f"{left} finished; rerun with --resume to continue")
            if kind is None:
                continue
            if kind == "tick":
                bar.update(1)
            elif kind == "log":
                bar.clear()
                log(payload)
                bar.refresh()
            elif kind == "done":
                remaining.discard(run)
                yield run, payload
            else:  # "error"
                exc_bytes, text, tb = payload
                exc = None
                if exc_bytes is not None:
                    try:
                        exc = pickle.loads(exc_bytes)
                    except Exception:  # noqa: BLE001
                        exc = None
                key = run_key(cfg.for_run(run[1], run[2]), run[0])
                if os.environ.get("BITKERN_DEBUG") == "1":
                    log(f"{key}: worker traceback:\n{tb}")
                if isinstance(exc, BaseException):
                    raise exc
                raise RuntimeError(f"{key}: {text}")
        for p in procs:
            p.join()
    finally:
        bar.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join()
        tasks.close()
        events.close()
