"""The ``bitkern`` command: train, eval, sweep (the study), bops, simulate, bench.

User errors (unknown spec, missing data, bad numbers) print one line on stderr and exit with code 2;
set BITKERN_DEBUG=1 to get the traceback instead.

Under ``torchrun --nproc-per-node N -m bitkern ...`` (WORLD_SIZE > 1) train, eval and sweep start a
torch.distributed group (gloo on CPU, NCCL on CUDA, one GPU per process): train runs
DistributedDataParallel, eval shards the examples and merges the verdicts exactly, sweep spreads the
configs over the ranks; rank 0 alone prints results and writes files. The other commands run on rank 0
only (the other ranks exit at once).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

__all__ = ["main", "build_parser", "UsageError"]

PROG = "bitkern"


class UsageError(ValueError):
    """A problem with the command line or the files it names."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump) with exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


# ------------------------------------------------------------------------------- value parsers
def _number(text: str) -> float:
    """'0.03', '8/255' or '2e-3' -> float."""
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 0.03 or 8/255)") from None


def _int_at_least(minimum: int):
    """argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


_pos_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def _pos_number(text: str) -> float:
    v = _number(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


def _budget(text: str) -> float:
    """One L-inf budget in [0, 1] (inputs are [0, 1] images): '8/255', '0.03'."""
    v = _number(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is outside [0, 1]; inputs are [0, 1] images, so give pixel "
                                         f"units as a fraction, e.g. 8/255")
    return v


def _pos_budget(text: str) -> float:
    v = _budget(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


def _budget_list(text: str) -> list[float]:
    """'2/255', '0,2,4,8,16/255' (a trailing /D applies to every item without one), '0.01,0.03'."""
    items = _csv(text)
    last = items[-1]
    if len(items) > 1 and "/" in last and not any("/" in i for i in items[:-1]):
        den = last.split("/", 1)[1]
        items = [f"{i}/{den}" for i in items[:-1]] + [last]
    values = [_budget(i) for i in items]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"repeated budget in {text!r}")
    return sorted(values)


MAX_THREADS = 1024
MAX_INPUT_DIM = 4096      # bops / simulate build the model and run one forward at this shape
MAX_INPUT_CHANNELS = 1024


def _device(text: str) -> str:
    """cpu, cuda or cuda:N, and only if this machine has it."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (expected cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: bitkern runs on cpu or cuda, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} requested but this torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def _nonneg_number(text: str) -> float:
    v = _number(text)
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return v


def _csv(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("empty list")
    return items


def _int_list(text: str) -> list[int]:
    return [_pos_int(s) for s in _csv(text)]


def _seed_list(text: str) -> list[int]:
    values = [_nonneg_int(s) for s in _csv(text)]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"repeated seed in {text!r}")
    return values


def _shape(text: str) -> tuple[int, ...]:
    dims = tuple(_pos_int(s) for s in text.replace("x", ",").split(","))
    if len(dims) != 3:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,32,32), got {text!r}")
    if dims[0] > MAX_INPUT_CHANNELS or max(dims[1:]) > MAX_INPUT_DIM:
        raise argparse.ArgumentTypeError(f"{text!r} is too large (at most {MAX_INPUT_CHANNELS} channels and "
                                         f"{MAX_INPUT_DIM} pixels per side)")
    return dims


def _threads(text: str) -> int:
    v = _pos_int(text)
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_THREADS}, got {v}")
    return v


def _recipe_args(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"--recipe-arg expects key=value, got {pair!r}")
        key, val = pair.split("=", 1)
        key, val = key.strip(), val.strip()
        if key == "eps":
            raise UsageError("--recipe-arg eps: the training budget is set with --train-eps")
        if val.lower() in ("true", "false"):
            out[key] = val.lower() == "true"
            continue
        try:
            out[key] = int(val)
        except ValueError:
            try:
                out[key] = _number(val)
            except argparse.ArgumentTypeError:
                raise UsageError(f"--recipe-arg {key}: value {val!r} is not a number") from None
    return out


# ------------------------------------------------------------------------------------- parser
def _add_data_args(p, default_dataset="digits"):
    from .data import DATASETS

    p.add_argument("--dataset", default=default_dataset, choices=DATASETS, help="dataset (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="directory with the dataset files (not needed for digits)")
    p.add_argument("--image-size", type=_pos_int, default=32, help="imagefolder: resize to this size")


def _add_runtime_args(p):
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:0, ... (default: cpu)")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--threads", type=_threads, default=None,
                   help="torch CPU threads (default: 1 for digits, whose tiny tensors gain nothing from "
                        "threads, else torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _add_budget_args(p, eps_help):
    p.add_argument("--eps", type=_budget_list, default=None,
                   help=f"L-inf budget or list, e.g. 8/255 or 0,2,4,8,16/255 ({eps_help})")
    p.add_argument("--alpha", type=_pos_number, default=None,
                   help="PGD step (default eps/4 at every budget: the papers' 0.5/255 at 2/255)")
    p.add_argument("--pgd-steps", type=_int_list, default=[20, 50], help="default 20,50")
    p.add_argument("--restarts", type=_pos_int, default=5, help="PGD random restarts (default 5)")
    p.add_argument("--suite", choices=("standard",), default=None,
                   help="also run the standard suite APGD-CE -> APGD-T -> Square (worst case, gradient-free "
                        "last) at every budget and flag gradient masking")
    p.add_argument("--apgd-steps", type=_pos_int, default=100, help="suite: APGD iterations (default 100)")
    p.add_argument("--square-queries", type=_pos_int, default=5000, help="suite: Square queries (default 5000)")


def _add_train_args(p, epochs_default_help):
    from .train import RECIPES, SCHEDULES

    p.add_argument("--recipe", default="natural", choices=list(RECIPES), help="training recipe")
    p.add_argument("--recipe-arg", action="append", metavar="KEY=VALUE",
                   help="recipe argument, repeatable (pgd/bim: steps, alpha; free: m; dq: beta; "
                        "odgq: n_k, lam, eps_l; fastat: alpha_factor)")
    p.add_argument("--train-eps", type=_pos_budget, default=8 / 255,
                   help="perturbation budget of adversarial recipes (default 8/255)")
    p.add_argument("--epochs", type=_pos_int, default=None, help=epochs_default_help)
    p.add_argument("--batch-size", type=_pos_int, default=None)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=None)
    p.add_argument("--lr", type=_pos_number, default=None)
    p.add_argument("--weight-decay", type=_nonneg_number, default=None)
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help="default: the recipe's")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip (default: on for CIFAR / image folders)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="bitkern: multi-bit network kernels and their adversarial robustness")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("sweep", help="the study: train, freeze, attack and count every quant spec",
                       description="Train each quant spec, freeze it, evaluate Top-1 / PGD-20 / PGD-50 and "
                                   "BOPS; write results.{json,csv,md} and plots. With no arguments it runs the "
                                   "8-spec ResNet-20 study on the bundled digits data.")
    _add_data_args(p)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--specs", type=_csv, default=None,
                   help="comma-separated quant specs (default: fp,pact-w4a4,pact-w2a2,xnor,mbn1x3,mbn3x1,"
                        "mbn3x3,mbn5x1)")
    _add_train_args(p, "training epochs (default per dataset, digits: 8)")
    _add_budget_args(p, "default per dataset: digits 8,16,32/255 (Table 2 at 16/255, one grey level), "
                        "others 1,2,4,8/255 (Table 2 at the papers' 2/255)")
    p.add_argument("--eval-samples", type=_nonneg_int, default=None,
                   help="test examples attacked (0 = all; default per dataset, digits: 100)")
    p.add_argument("--sanity", action="store_true", help="also run bitkern.eval's sanity report per config")
    p.add_argument("--out", default=None, help="output directory (default: results/sweep, with --preset "
                                                "results/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue a killed sweep in --out")
    p.add_argument("--workers", type=_pos_int, default=None,
                   help="processes training and attacking configs side by side (default: one per CPU core when "
                        "torch runs single-threaded on the CPU, which a sweep of several configs does unless "
                        "--threads is given); the results do not depend on it")
    _add_runtime_args(p)
    from .study.presets import PRESETS

    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a study preset (docs/findings.md: one per claim of the papers); options given here "
                        "override it; output in results/<preset> unless --out is given")
    p.add_argument("--seeds", type=_seed_list, default=None,
                   help="several training seeds, e.g. 0,1: one config per spec and seed, tables show the mean "
                        "and the standard deviation over seeds")
    p.add_argument("--recipes", type=_csv, default=None,
                   help="several training recipes side by side, e.g. natural,odgq,dq,free")
    p.add_argument("--train-samples", type=_nonneg_int, default=None,
                   help="train on a fixed class-balanced subset of this many examples (0 = all, the default)")
    p.add_argument("--table-eps", type=_pos_budget, default=None,
                   help="the main table's budget (one of --eps; default: the dataset's, the papers' 2/255)")
    p.add_argument("--alpha-ratio", type=_pos_number, default=None,
                   help="step = eps x this at every budget when --alpha is not given (default 0.25)")
    p.add_argument("--attacks", type=_csv, default=None,
                   help="the table budget's attacks, e.g. GN,FGSM,PGD-20,BIM-20,TPGD-20 (default: PGD-k for "
                        "every --pgd-steps k)")
    p.add_argument("--transfer-source", default=None, metavar="SPEC",
                   help="also run every table attack crafted on a naturally trained SPEC model (black-box)")
    p.add_argument("--apgd-targets", type=_pos_int, default=None,
                   help="suite: APGD-T target classes (default 9, AutoAttack standard)")
    # a preset can set these: None unless given (SweepConfig holds the defaults the help texts name)
    p.set_defaults(dataset=None, arch=None, recipe=None, train_eps=None, pgd_steps=None, restarts=None,
                   apgd_steps=None, square_queries=None, seed=None, out=None, image_size=None)

    p = sub.add_parser("train", help="train one model")
    _add_data_args(p)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--quant", default="fp", help="quant spec, e.g. fp, pact-w4a4, xnor, mbn3x1")
    _add_train_args(p, "training epochs (default per dataset, digits: 8)")
    p.add_argument("--out", default="runs/train", help="run directory (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    _add_runtime_args(p)

    p = sub.add_parser("eval", help="evaluate a trained model (Top-1 and PGD)")
    p.add_argument("model", help="model.safetensors written by `bitkern train`/`sweep`, or a frozen model")
    _add_data_args(p)
    _add_budget_args(p, "default 2/255")
    p.add_argument("--eval-samples", type=_nonneg_int, default=0, help="0 = whole test set")
    p.add_argument("--out", default=None, help="write <out>.json/.md/.npz")
    _add_runtime_args(p)

    p = sub.add_parser("bops", help="per-layer MACs and BOPS of a model")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--quant", default="fp")
    p.add_argument("--input-shape", type=_shape, default=(3, 32, 32), help="C,H,W (default 3,32,32)")
    p.add_argument("--num-classes", type=_pos_int, default=10)
    p.add_argument("--convention", choices=("exact", "paper"), default="exact")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("simulate", help="bit-serial accelerator model of a network")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--quant", default="pact-w2a2")
    p.add_argument("--compare", type=_csv, default=None, help="comma-separated specs to compare")
    p.add_argument("--input-shape", type=_shape, default=(3, 32, 32))
    p.add_argument("--num-classes", type=_pos_int, default=10)
    p.add_argument("--pes", type=_pos_int, default=16)
    p.add_argument("--lanes", type=_pos_int, default=256)
    p.add_argument("--clock-mhz", type=_pos_number, default=1000.0)
    p.add_argument("--serial", choices=("both", "weights", "activations"), default="both")
    p.add_argument("--verify", action="store_true", help="check fixed-point layers bit-exactly")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="benchmarks: pytest-benchmark suite, or --quick op timings")
    p.add_argument("--quick", action="store_true",
                   help="in-process timing tables: the packed ops, then whole frozen models vs fp32")
    p.add_argument("--repeat", type=_pos_int, default=20, help="--quick: timed calls per op")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra arguments for pytest")
    return parser


# ---------------------------------------------------------------------------------- commands
def _setup_threads(args) -> None:
    import torch

    threads = args.threads or (1 if getattr(args, "dataset", None) == "digits" else None)
    if threads:
        torch.set_num_threads(threads)


def _check_out_dir(path: str, flag: str, resume: bool = False) -> None:
    """The output directory is a directory (or can be created) and this user can write there; with
    --resume it must exist (a mistyped --out would otherwise silently start a fresh run)."""
    p = Path(path).expanduser()
    if resume and not p.is_dir():
        raise UsageError(f"--resume: nothing to resume in {flag} {path} (no such directory)")
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable")


def _progress(args):
    return False if args.no_progress else None


# sweep options a preset may set: argparse leaves them None unless given, SweepConfig / the preset fill them
_SWEEP_OPTIONS = {"dataset": "dataset", "data_dir": "data_dir", "arch": "arch", "specs": "specs",
                  "recipe": "recipe", "recipes": "recipes", "epochs": "epochs", "batch_size": "batch_size",
                  "optimizer": "optimizer", "lr": "lr", "weight_decay": "weight_decay", "schedule": "schedule",
                  "augment": "augment", "train_eps": "train_eps", "train_samples": "train_samples", "eps": "eval_eps",
                  "table_eps": "table_budget", "alpha": "eval_alpha", "alpha_ratio": "alpha_ratio",
                  "pgd_steps": "pgd_steps", "attacks": "attacks", "transfer_source": "transfer_source",
                  "restarts": "restarts", "eval_samples": "eval_samples", "suite": "suite",
                  "square_queries": "square_queries", "apgd_steps": "apgd_steps", "apgd_targets": "apgd_targets",
                  "image_size": "image_size", "seed": "seed", "seeds": "seeds", "out": "out", "workers": "workers"}


def sweep_config(args):
    """The SweepConfig of a parsed ``bitkern sweep`` command line: the preset's options (if any) with the
    explicitly given ones on top, SweepConfig's defaults for the rest."""
    from .study import SweepConfig
    from .study.presets import preset_config

    if args.seed is not None and args.seeds is not None:
        raise UsageError("give --seed or --seeds, not both")
    if args.recipe is not None and args.recipes is not None:
        raise UsageError("give --recipe or --recipes, not both")
    opts = {field: getattr(args, dest) for dest, field in _SWEEP_OPTIONS.items() if getattr(args, dest) is not None}
    for key in ("specs", "recipes", "eval_eps", "pgd_steps", "attacks", "seeds"):
        if key in opts:
            opts[key] = tuple(opts[key])
    if "seed" in opts:
        opts["seeds"] = (opts["seed"],)
    if "recipe" in opts:
        opts["recipes"] = (opts["recipe"],)
    opts.setdefault("workers", None)   # the CLI's default: one process per core where that pays (runner)
    opts.update(recipe_args=_recipe_args(args.recipe_arg), device=args.device, resume=args.resume,
                sanity=args.sanity, progress=_progress(args))
    if args.preset is not None:
        return preset_config(args.preset, **opts)
    return SweepConfig(**opts)


def cmd_sweep(args) -> int:
    from .study import run_sweep

    cfg = sweep_config(args)
    _check_out_dir(cfg.out, "--out", resume=args.resume)
    args.dataset = cfg.dataset
    _setup_threads(args)
    resolved = cfg.resolved()
    n_configs = len(resolved.specs) * len(resolved.recipes) * len(resolved.seeds)
    if args.threads is None and n_configs > 1 and str(cfg.device) == "cpu":
        import torch

        torch.set_num_threads(1)   # several configs: one process per core beats threads on these small nets
    run_sweep(cfg, log=lambda s: print(s, flush=True))
    return 0


def cmd_train(args) -> int:
    from . import checkpoint as ckpt
    from . import distributed as dist_
    from .data import dataset_info, load_dataset
    from .models import create, parse_quant
    from .eval import evaluate_accuracy
    from .study import defaults_for
    from .train import fit

    _check_out_dir(args.out, "--out", resume=args.resume)
    _setup_threads(args)
    parse_quant(args.quant)
    from .train import make_recipe

    make_recipe(args.recipe, **{**_recipe_args(args.recipe_arg), "eps": args.train_eps})  # fail before loading
    d = defaults_for(args.dataset)
    x_tr, y_tr = load_dataset(args.dataset, args.data_dir, "train", image_size=args.image_size)
    x_te, y_te = load_dataset(args.dataset, args.data_dir, "test", image_size=args.image_size)
    num_classes = dataset_info(args.dataset)["num_classes"] or int(max(y_tr.max(), y_te.max())) + 1
    import torch

    torch.manual_seed(args.seed)
    model = create(args.arch, args.quant, num_classes=num_classes, in_channels=int(x_tr.shape[1]))
    out = Path(args.out)
    cdir = out / "checkpoint"
    if ckpt.has_checkpoint(cdir) and not args.resume:
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    meta = {"arch": args.arch, "quant": args.quant, "num_classes": num_classes, "in_channels": int(x_tr.shape[1]),
            "dataset": args.dataset}
    device = str(dist_.local_device(args.device))
    pick = lambda v, k: d[k] if v is None else v  # noqa: E731
    t0 = time.perf_counter()
    res = fit(model, (x_tr, y_tr), recipe=args.recipe, recipe_args=_recipe_args(args.recipe_arg),
              eps=args.train_eps, epochs=pick(args.epochs, "epochs"), batch_size=pick(args.batch_size, "batch_size"),
              lr=pick(args.lr, "lr"), optimizer=pick(args.optimizer, "optimizer"),
              weight_decay=pick(args.weight_decay, "weight_decay"), schedule=args.schedule,
              augment=pick(args.augment, "augment"), device=device, seed=args.seed, checkpoint_dir=cdir,
              resume=args.resume, log_path=out / "train_log.jsonl", eval_data=(x_te, y_te),
              progress=_progress(args), meta=meta,
              on_epoch=lambda r: print(json.dumps(r), flush=True))
    if not dist_.is_main():   # rank 0 writes the weights and reports
        return 0
    path = ckpt.save_model(out / "model.safetensors", model,
                           {**meta, "recipe": res.recipe, "recipe_args": res.recipe_args})
    acc = evaluate_accuracy(model, (x_te, y_te), device=device)
    procs = f", {dist_.world_size()} processes" if dist_.world_size() > 1 else ""
    print(f"trained {args.arch} {args.quant} ({res.recipe}, {res.epochs_run} epochs{procs}) in "
          f"{time.perf_counter() - t0:.1f}s: test top-1 {acc:.2f}%; weights in {path}")
    return 0


def _load_any_model(path: Path):
    from . import checkpoint as ckpt

    if not path.is_file():
        raise UsageError(f"model file not found: {path}")
    if path.with_suffix(".json").is_file():
        return ckpt.load_model(path)
    from .freeze import load_frozen

    return load_frozen(path)


def cmd_eval(args) -> int:
    from . import distributed as dist_
    from .attacks import PGD
    from .data import load_dataset
    from .eval import evaluate_accuracy, robustness
    from .freeze import freeze

    if args.out:
        _check_out_dir(str(Path(args.out).parent), "--out")
    _setup_threads(args)
    model = _load_any_model(Path(args.model))
    x, y = load_dataset(args.dataset, args.data_dir, "test", image_size=args.image_size)
    device = str(dist_.local_device(args.device))
    frozen = freeze(model).to(device)
    top1 = evaluate_accuracy(frozen, (x, y), device=device)
    n = x.shape[0] if args.eval_samples == 0 else min(args.eval_samples, x.shape[0])
    main_rank = dist_.is_main()   # under torchrun: every rank attacks its share, rank 0 reports and writes
    say = print if main_rank else (lambda *a, **k: None)
    say(f"top-1 (frozen, {x.shape[0]} test examples): {top1:.2f}%")
    budgets = [e for e in (args.eps or [2 / 255]) if e > 0]
    for eps in budgets:
        alpha = args.alpha if args.alpha is not None else eps / 4
        attacks = {f"PGD-{s}": PGD(frozen, eps=eps, alpha=alpha, steps=s) for s in args.pgd_steps}
        res = robustness(frozen, (x[:n], y[:n]), attacks, restarts=args.restarts, device=device,
                         progress=not args.no_progress, seed=args.seed, sanity=False, suite=args.suite, eps=eps,
                         suite_options={"apgd_steps": args.apgd_steps, "square_queries": args.square_queries})
        at = f" at eps {eps * 255:g}/255" if len(budgets) > 1 or args.eps else ""
        for name, s in res.attacks.items():
            say(f"{name} on {n} examples{at}: mean {s['mean']:.2f}% ± {s['std']:.2f}, worst case {s['worst']:.2f}%")
        if res.suite is not None:
            say(f"standard suite on {n} examples{at}: {res.suite.robust_acc:.2f}% "
                f"({res.suite.masking['verdict']}: {res.suite.masking['message']})")
        if args.out and main_rank:
            res.save(args.out if len(budgets) == 1 else f"{args.out}-eps{eps * 255:g}")
    return 0


def cmd_bops(args) -> int:
    from .bops import count
    from .models import create

    model = create(args.arch, args.quant, num_classes=args.num_classes, in_channels=args.input_shape[0])
    report = count(model, args.input_shape, convention=args.convention)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0


def cmd_simulate(args) -> int:
    from .bitserial import Accelerator, compare_networks, simulate_network
    from .models import create

    accel = Accelerator(pes=args.pes, lanes=args.lanes, clock_hz=args.clock_mhz * 1e6, serial=args.serial)
    if args.compare:
        cmp = compare_networks(args.arch, tuple(args.compare), args.input_shape, accel, args.num_classes)
        print(json.dumps({k: r.to_dict() for k, r in cmp.reports.items()}, indent=2) if args.json else cmp.table())
        return 0
    model = create(args.arch, args.quant, num_classes=args.num_classes, in_channels=args.input_shape[0])
    report = simulate_network(model, args.input_shape, accel, verify=args.verify)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0


def _quick_bench(repeat: int) -> str:
    """Median time per call of the packed ops on a ResNet-20-sized layer (batch 32, 16 -> 16 ch, 32x32)."""
    import torch

    from . import dispatch, ops

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, 32, 32, generator=gen)
    w = torch.randn(16, 16, 3, 3, generator=gen)
    rows = []

    def timed(name, fn):
        fn()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        times.sort()
        rows.append((name, times[len(times) // 2] * 1e3))

    timed("F.conv2d fp32 (reference)", lambda: torch.nn.functional.conv2d(x, w, padding=1))
    timed("pack_signs", lambda: ops.pack_signs(x))
    timed("binary_conv2d", lambda: ops.binary_conv2d(x, w, padding=1))
    for m, n in ((1, 1), (3, 1), (1, 3), (3, 3)):
        wb = torch.randn(m, 16, 16, 3, 3, generator=gen)
        alpha = torch.rand(m, generator=gen)
        v = torch.linspace(-0.5, 0.5, n) if n > 1 else None
        timed(f"mbn_conv2d {m}x{n}", lambda wb=wb, alpha=alpha, v=v: ops.mbn_conv2d(x, wb, alpha, v, None, padding=1))
    backend = dispatch.backend_for(x.device).name
    lines = [f"backend {backend}, {torch.get_num_threads()} threads, x [32,16,32,32], w [16,16,3,3], "
             f"median of {repeat}", f"{'op':28s} {'ms/call':>9s}", "-" * 38]
    lines += [f"{name:28s} {ms:9.3f}" for name, ms in rows]
    return "\n".join(lines)


def _quick_model_bench(repeat: int) -> str:
    """Frozen XNOR / MBN3x1 ResNets vs the fp32 model (bitkern.eval.speed, interleaved)."""
    from tqdm import tqdm

    from . import dispatch
    from .eval import speed

    backend = dispatch.backend_for("cpu")
    if not backend.capabilities.bitplane_output:  # the float emulation would take minutes here
        return f"whole models: skipped (the {backend.name} backend runs frozen models layer by layer in float)"
    rounds = max(2, repeat // 4)
    results = [speed.measure_case(case, speed.rounds_for(case, rounds)) for case in tqdm(
        speed.CASES, desc="model timings", leave=False, disable=not sys.stderr.isatty())]
    return f"whole models, median of {rounds} rounds (batch 1: {5 * rounds}), models interleaved\n" + \
        speed.speed_table(results)


def cmd_bench(args) -> int:
    if args.quick:
        print(_quick_bench(args.repeat))
        print()
        print(_quick_model_bench(args.repeat))
        return 0
    root = Path(__file__).resolve().parent.parent
    bench_dir = root / "benchmarks"
    if not bench_dir.is_dir():
        raise UsageError(f"no benchmarks directory at {bench_dir} (run from a source checkout, or use --quick)")
    extra = [a for a in args.pytest_args if a != "--"]
    cmd = [sys.executable, "-m", "pytest", str(bench_dir), "--benchmark-only", "-q", *extra]
    return subprocess.call(cmd, cwd=str(root))


def _check_environment() -> None:
    """Every BITKERN_* variable the package reads, checked before any work (one line if one is bad)."""
    from .dispatch import check_environment

    try:
        check_environment()
    except ValueError as e:
        raise UsageError(str(e)) from None


COMMANDS = {"sweep": cmd_sweep, "train": cmd_train, "eval": cmd_eval, "bops": cmd_bops,
            "simulate": cmd_simulate, "bench": cmd_bench}
DISTRIBUTED_COMMANDS = ("sweep", "train", "eval")


def _run_command(args) -> int:
    """Run the command; under a launcher with WORLD_SIZE > 1, in a torch.distributed group (train, eval,
    sweep) or on rank 0 alone (the others)."""
    from . import distributed as dist_

    if dist_.env_world_size() <= 1:
        return COMMANDS[args.command](args)
    if args.command not in DISTRIBUTED_COMMANDS:
        return COMMANDS[args.command](args) if os.environ.get("RANK", "0") == "0" else 0
    started = dist_.init_from_env(getattr(args, "device", "cpu"))
    try:
        return COMMANDS[args.command](args)
    finally:
        if started:
            import torch.distributed

            torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("BITKERN_DEBUG") == "1"
    try:
        from .checkpoint import CheckpointError
        from .data import DataError
        from .study import SweepError

        parser = build_parser()
        if not argv:
            raise UsageError(f"usage: {PROG} COMMAND ...: choose a command: {', '.join(COMMANDS)} (the study: "
                             f"{PROG} sweep; help: {PROG} --help)")
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError(f"{PROG}: choose a command: {', '.join(COMMANDS)}")
        _check_environment()
        return _run_command(args)
    except (UsageError, SweepError, DataError, CheckpointError) as e:
        if debug:
            raise
        print(_rank_prefix() + (f"{PROG}: error: {e}" if not str(e).startswith(PROG) else f"{e}"), file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        # bad values caught by the library's own checks, files the OS refuses (name too long, read-only,
        # disk full), a diverged training run (FloatingPointError names the epoch and the loss)
        if debug:
            raise
        print(f"{_rank_prefix()}{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (rerun with --resume to continue)", file=sys.stderr)
        return 130


def _rank_prefix() -> str:
    """'[rank r] ' for the ranks > 0 of a torchrun launch (their errors would otherwise look like rank 0's)."""
    rank = os.environ.get("RANK", "0")
    return f"[rank {rank}] " if rank != "0" and os.environ.get("WORLD_SIZE", "1") != "1" else ""


if __name__ == "__main__":
    sys.exit(main())
