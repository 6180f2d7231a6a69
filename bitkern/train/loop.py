"""The training loop: batches, optimizer, schedule, logging, checkpoints and resume.

Evaluation lives in bitkern.eval (``evaluate_accuracy``, used here for the per-epoch ``eval_data``).

Determinism: torch.manual_seed(seed) before training; batch order and augmentation come from a
generator reseeded per epoch from (seed, epoch), recipes reseed theirs the same way. So a run
resumed from the checkpoint of epoch e repeats exactly what the uninterrupted run does (on CPU,
with the same thread count), and reaches bit-identical weights.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import checkpoint as ckpt
from .. import distributed as dist_
from .._checks import int_in
from ..eval._data import tensor_pair
from ..eval.accuracy import evaluate_accuracy
from .recipes import Recipe, StepContext, make_recipe
from .schedules import SCHEDULES, lr_at

__all__ = ["fit", "TrainResult", "KILL_ENV"]

# Test hook: after the checkpoint of this epoch (1-based) is written, the process SIGKILLs itself,
# simulating an interrupted run for the resume tests.
KILL_ENV = "BITKERN_KILL_AFTER_EPOCH"

OPTIMIZERS = ("sgd", "adam")


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs_run: int = 0
    resumed_from: int | None = None
    recipe: str = "natural"
    recipe_args: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def _augment_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding + horizontal flip, the standard CIFAR augmentation."""
    b, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oh = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ow = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = (oh[:, None] + torch.arange(h)[None]).to(x.device)
    cols = ow[:, None] + torch.arange(w)[None]
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def _make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def _progress_enabled(progress: bool | None) -> bool:
    if progress is None:
        return sys.stderr.isatty() and os.environ.get("BITKERN_PROGRESS", "1") != "0"
    return bool(progress)


def fit(model: nn.Module, train_data, *, recipe: str | Recipe = "natural", epochs: int,
        batch_size: int = 128, lr: float = 0.1, optimizer: str = "sgd", momentum: float = 0.9,
        weight_decay: float = 5e-4, schedule: str | None = None, eps: float | None = None,
        recipe_args: dict[str, Any] | None = None, augment: bool = False, device: str | torch.device = "cpu",
        seed: int = 0, checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
        log_path: str | os.PathLike | None = None, eval_data=None, progress: bool | None = None,
        meta: dict[str, Any] | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
        distributed: bool | None = None) -> TrainResult:
    """Train ``model`` in place with a recipe; returns a TrainResult (model, per-epoch history).

    recipe: natural | fastat | pgd | bim | free | dq | odgq (or a Recipe instance), with recipe_args
    (e.g. {"steps": 7} for pgd, {"m": 4} for free, {"n_k": 4, "lam": 3.0} for odgq); eps (input units,
    default 8/255) is passed to the recipe. epochs is the natural-training budget: Free AT runs
    ceil(epochs / m) and ODG-Q ceil(epochs / 2) epochs. schedule: constant | step | cosine | cyclic
    (default: the recipe's, cyclic for fastat, cosine otherwise); the learning rate is set per
    optimizer step. checkpoint_dir: a checkpoint is written after every epoch; with resume=True an
    existing one is continued (the run configuration must match). log_path: JSON lines, one per epoch.

    distributed: None (default) trains with DistributedDataParallel when a torch.distributed group of
    more than one process is initialized (torchrun), False never, True requires a group. batch_size
    stays the global batch: every rank draws the same permutation, augmentation and recipe randomness
    for the whole batch and trains its contiguous share of positions (per-rank batch = global / world
    size), the loss is weighted so the averaged gradient is the one of the whole batch, and per-position
    recipe state (Free AT's delta, ODG-Q's P) is kept consistent across ranks; so a run matches the
    single process up to float rounding (exactly so without BatchNorm: BatchNorm normalises with each
    rank's own batch statistics, DDP's default, and keeps rank 0's running statistics). Rank 0 alone
    writes the checkpoint (atomically), the log and calls on_epoch; a checkpoint resumes on any number
    of processes.
    """
    if not int_in(epochs, 1):
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if not int_in(batch_size, 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    x_all, y_all = tensor_pair(train_data, "train_data")
    args = dict(recipe_args or {})
    if eps is not None:
        args["eps"] = eps
    rec = make_recipe(recipe, **args) if not isinstance(recipe, Recipe) else recipe
    schedule = schedule or rec.default_schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    sharded = dist_.active(distributed)
    lead = not sharded or dist_.is_main()   # the process that writes, logs and reports
    device = dist_.local_device(device) if sharded else torch.device(device)
    model.to(device)
    opt = _make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr, momentum,
                          weight_decay)

    n = x_all.shape[0]
    n_batches = math.ceil(n / batch_size)
    run_epochs = rec.run_epochs(epochs)
    total_steps = run_epochs * n_batches * rec.steps_per_batch
    rec.setup((min(batch_size, n), *x_all.shape[1:]), device)
    config = {"recipe": rec.name, "recipe_args": rec.args(), "epochs": epochs, "run_epochs": run_epochs,
              "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "momentum": momentum,
              "weight_decay": weight_decay, "schedule": schedule, "augment": augment, "seed": seed,
              "n_train": n}

    torch.manual_seed(seed)
    state = {"step": 0, "history": []}
    start_epoch, resumed_from = 0, None
    if checkpoint_dir is not None and resume and ckpt.has_checkpoint(checkpoint_dir):
        configured = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                      for g in opt.param_groups]
        c = ckpt.load_checkpoint(checkpoint_dir, model=model, optimizer=opt, rng=True)
        for i, (want, g) in enumerate(zip(configured, opt.param_groups)):
            bad = sorted(k for k, v in want.items() if json.dumps(g.get(k)) != json.dumps(v))
            if bad:  # the schedule sets lr; every other hyper-parameter comes from the run configuration
                raise ckpt.CheckpointError(
                    f"{c.path}: optimizer param_groups[{i}] {bad} = {[g.get(k) for k in bad]} differ from the "
                    f"run configuration's {[want[k] for k in bad]}; cannot resume")
        saved = c.state.get("config", {})
        diff = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        if diff:
            raise ckpt.CheckpointError(f"cannot resume {checkpoint_dir}: configuration differs "
                                       f"(saved, requested): {diff}")
        rec.load_state({k[len("recipe/"):]: v.to(device) for k, v in c.extra("recipe/").items()},
                       c.state.get("recipe_state", {}))
        state = {"step": int(c.state["step"]), "history": list(c.state.get("history", []))}
        start_epoch = resumed_from = int(c.state["epoch"])
    log_file = Path(log_path) if log_path is not None and lead else None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if start_epoch == 0:
            log_file.write_text("")

    weight = [1.0]   # sharded: this rank's loss weight, world * (its examples) / (global batch)

    def step(loss: torch.Tensor) -> None:
        cur = lr_at(schedule, state["step"], total_steps, lr)
        for g in opt.param_groups:
            g["lr"] = cur
        opt.zero_grad(set_to_none=True)
        (loss * weight[0] if sharded else loss).backward()
        opt.step()
        state["step"] += 1

    if sharded:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(_TrainForward(model), device_ids=[device.index] if device.type == "cuda"
                                      else None, broadcast_buffers=True)
        ctx = StepContext(ddp, step, module=model, gather=lambda t: _GatherBatch.apply(t, rec.batch_slice[2]))
        world, owner = dist_.world_size(), _Owners(rec)
    else:
        ctx = StepContext(model, step)
    show = _progress_enabled(progress) and lead
    kill_after = os.environ.get(KILL_ENV)
    from tqdm.auto import tqdm

    for epoch in range(start_epoch, run_epochs):
        model.train()
        rec.start_epoch(epoch, seed)
        gen = torch.Generator().manual_seed(int(seed) * 7_919 + int(epoch))
        perm = torch.randperm(n, generator=gen)
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(range(n_batches), desc=f"{rec.name} epoch {epoch + 1}/{run_epochs}", leave=False,
                   disable=not show, dynamic_ncols=True)
        for bi in bar:
            idx = perm[bi * batch_size:(bi + 1) * batch_size]
            x, y = x_all[idx], y_all[idx]
            if augment:
                x = _augment_crop_flip(x, gen)
            if sharded:   # this rank's contiguous share of the global batch's positions
                total = int(idx.shape[0])
                lo, hi = dist_.shard_range(total)
                owner.before(lo, hi, total)
                weight[0] = world * (hi - lo) / total
                if hi == lo:   # no example left for this rank: a weight-0 pass keeps DDP's collectives in step
                    lo, hi = 0, 1
                rec.batch_slice = (lo, hi, total)
                x, y = x[lo:hi], y[lo:hi]
            x, y = x.to(device), y.to(device)
            loss, logits = rec.train_batch(ctx, x, y, bi)
            if sharded and weight[0] == 0:
                continue
            if not math.isfinite(loss):
                raise FloatingPointError(f"training diverged: loss {loss} at epoch {epoch + 1}, batch {bi} "
                                         f"(lower the learning rate, currently {lr})")
            loss_sum += loss * y.shape[0]
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100.0 * correct / seen:.1f}")
        bar.close()
        if sharded:   # whole-batch statistics, recipe state and rank 0's BatchNorm buffers on every rank
            loss_sum, correct, seen = dist_.all_reduce_sum([loss_sum, correct, seen], device)
            correct, seen = int(correct), int(seen)
            owner.sync()
            dist_.broadcast_tensors(list(model.buffers()))
            rec.batch_slice = None
        row = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
               "lr": lr_at(schedule, max(state["step"] - 1, 0), total_steps, lr),
               "time_s": round(time.perf_counter() - t0, 3)}
        if eval_data is not None and lead:
            row["eval_acc"] = evaluate_accuracy(model, eval_data, device=device)
        if sharded:
            row = dist_.broadcast_object(row)
        state["history"].append(row)
        if log_file is not None:
            with open(log_file, "a") as f:
                f.write(json.dumps(row) + "\n")
        if checkpoint_dir is not None and lead:
            extra = {f"recipe/{k}": v for k, v in rec.state_tensors().items()}
            ckpt.save_checkpoint(checkpoint_dir, model=model, optimizer=opt, tensors=extra, state={
                **ckpt.model_meta(model), **(meta or {}), "config": config, "epoch": epoch + 1,
                "step": state["step"], "history": state["history"], "recipe_state": rec.state_json(),
                "metrics": row})
        if sharded:
            dist_.barrier()   # the checkpoint is complete before any rank goes on (or is killed)
        if on_epoch is not None and lead:
            on_epoch(row)
        if kill_after is not None and epoch + 1 == int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)

    model.eval()
    if sharded:
        del ddp
    return TrainResult(model=model, history=state["history"], epochs_run=run_epochs, resumed_from=resumed_from,
                       recipe=rec.name, recipe_args=rec.args())


class _TrainForward(nn.Module):
    """What DistributedDataParallel wraps: the model's forward, or ``fn(model, *xs)`` as one forward
    (StepContext.call, e.g. ODG-Q's features + logits of two inputs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *xs, fn=None):
        return self.model(*xs) if fn is None else fn(self.model, *xs)


class _Owners:
    """Which rank last wrote each position of the recipe's per-position state (Free AT's delta, ODG-Q's P).

    Every rank keeps the whole state but updates only its positions; before a batch whose split differs
    (the smaller last batch) and at the end of every epoch, the positions are gathered from their
    owners (an all-reduce of masked copies: exact), so every rank sees what the single process sees."""

    def __init__(self, rec: Recipe):
        self.rec = rec
        self.owner: torch.Tensor | None = None   # int [positions], -1 = the same on every rank

    def _tensors(self):
        for name, dim in self.rec.position_dims.items():
            t = getattr(self.rec, name, None)
            if isinstance(t, torch.Tensor):
                yield t, dim

    def before(self, lo: int, hi: int, total: int) -> None:
        tensors = list(self._tensors())
        if not tensors:
            return
        size = tensors[0][0].shape[tensors[0][1]]
        if self.owner is None:
            self.owner = torch.full((size,), -1, dtype=torch.long)
        split = torch.full((size,), -1, dtype=torch.long)
        world = dist_.world_size()
        for r in range(world):
            a, b = dist_.shard_range(total, r, world)
            split[a:b] = r
        # every rank computes the same owners, so they agree on whether to synchronise
        stale = (self.owner[:total] >= 0) & (self.owner[:total] != split[:total])
        if bool(stale.any()):
            self.sync()
            self.owner = torch.full((size,), -1, dtype=torch.long)
        self.owner[:total] = split[:total]

    def sync(self) -> None:
        if self.owner is None:
            return
        mine = self.owner == dist_.rank()
        keep = self.owner < 0
        for t, dim in self._tensors():
            shape = [1] * t.dim()
            shape[dim] = -1
            m_mine = mine.to(t.device).view(shape)
            m_keep = keep.to(t.device).view(shape)
            masked = torch.where(m_mine, t, torch.zeros_like(t))
            dist_.all_reduce_tensor(masked)
            t.copy_(torch.where(m_keep, t, masked))
        self.owner.fill_(-1)


class _GatherBatch(torch.autograd.Function):
    """Rows of a per-example tensor from every rank, in global batch order (rank r holds positions
    shard_range(total, r)); the same tensor on every rank.

    Every rank then computes the same coupled loss term (bitwise: same inputs, same ops); backward keeps
    this rank's rows of that (identical) gradient, scaled by total / (its rows): the training step
    weights the loss by world * rows / total and DDP averages over the world, so the term's gradient is
    exactly once the single-process one. A weight-0 rank (no rows) gets a zero gradient."""

    @staticmethod
    def forward(ctx, t, total):
        world, rank = dist_.world_size(), dist_.rank()
        shares = [dist_.shard_range(total, r, world) for r in range(world)]
        lo, hi = shares[rank]
        rows = max(b - a for a, b in shares)
        buf = t.new_zeros((rows, *t.shape[1:]))
        buf[:hi - lo] = t[:hi - lo]
        parts = [torch.empty_like(buf) for _ in range(world)]
        torch.distributed.all_gather(parts, buf.contiguous())
        ctx.local = (hi - lo, t.shape[0], total, lo)
        return torch.cat([p[:b - a] for p, (a, b) in zip(parts, shares)])

    @staticmethod
    def backward(ctx, grad):
        rows, local_rows, total, lo = ctx.local
        out = grad.new_zeros((local_rows, *grad.shape[1:]))
        if rows:
            out[:rows] = grad[lo:lo + rows] * (total / rows)
        return out, None
