"""The study's files on disk: the per-config directory, its ``result.json`` (the done marker that resume
reads) and the summary files rebuilt after every config (results.json/csv/md, results_by_eps.csv, plots)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._io import atomic_write_json, atomic_write_text
from .config import SweepConfig, SweepError, run_key
from .plots import write_plots
from .tables import results_by_eps_csv, results_csv, results_markdown

__all__ = ["RESULT_SCHEMA", "config_dir", "source_dir", "save_result", "load_done", "any_done", "write_summaries"]

RESULT_SCHEMA = "bitkern.sweep/1"


def _safe_name(spec: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in spec)


def config_dir(cfg: SweepConfig, spec: str) -> Path:
    """``<out>/configs/<key>/`` (key: the spec, plus recipe / seed where the study has several; ``cfg`` is
    the config's own, ``SweepConfig.for_run``): checkpoint, weights, frozen model, robustness files,
    result.json."""
    return Path(cfg.out) / "configs" / _safe_name(run_key(cfg, spec))


def source_dir(cfg: SweepConfig) -> Path:
    """``<out>/transfer-source/``: the naturally trained model the black-box attacks are crafted on."""
    return Path(cfg.out) / "transfer-source"


def save_result(cfg: SweepConfig, spec: str, row: dict[str, Any]) -> None:
    """Written last: marks the config as done."""
    atomic_write_json(config_dir(cfg, spec) / "result.json",
                      {"schema": RESULT_SCHEMA, "config": cfg.identity(), "row": row})


def load_done(cfg: SweepConfig, spec: str) -> dict[str, Any] | None:
    """The saved row of a done config, None if it is not done; SweepError if it was made differently."""
    path = config_dir(cfg, spec) / "result.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn file cannot exist (atomic writes) but be forgiving: redo the config
    if saved.get("config") != cfg.identity():
        raise SweepError(f"{path} was produced with a different configuration; use another --out "
                         f"or the same options as before")
    return saved["row"]


def any_done(out: str | os.PathLike) -> bool:
    configs = Path(out) / "configs"
    return configs.is_dir() and any(configs.glob("*/result.json"))


def write_summaries(cfg: SweepConfig, rows: list[dict[str, Any]], out: str | os.PathLike) -> None:
    out = Path(out)
    atomic_write_json(out / "results.json", {"schema": RESULT_SCHEMA, "config": cfg.identity(),
                                             "specs": list(cfg.specs), "rows": rows})
    atomic_write_text(out / "results.csv", results_csv(cfg, rows))
    atomic_write_text(out / "results_by_eps.csv", results_by_eps_csv(cfg, rows))
    atomic_write_text(out / "results.md", results_markdown(cfg, rows))
    write_plots(cfg, rows, out)
