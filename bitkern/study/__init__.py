"""The study (paper 000, Table 2): train each quant spec, freeze it, measure Top-1 / PGD-20 / PGD-50 (and,
with suite="standard", the APGD-CE -> APGD-T -> Square worst case) over a list of budgets and BOPS, and
write results.json / results.csv / results.md, results_by_eps.csv and plots.

One module per job:
  defaults.py  the default specs and the per-dataset defaults (epochs, budgets, attacked subset)
  config.py    SweepConfig (resolved against the defaults), its validation, derived budgets
  runner.py    run_sweep / run_config: train -> freeze -> attack -> count per spec, worker processes, resume
  results.py   the files on disk: per-config result.json (the done marker), summaries after every spec
  tables.py    results.md / results.csv / results_by_eps.csv text and the Table 2 method columns
  plots.py     robust_vs_bops.png, pgd_vs_iterations.png, robust_vs_eps.png
  presets.py   one preset per claim of the papers (bitkern sweep --preset NAME; docs/findings.md)
  compare.py   our numbers next to the papers' in their layouts (python -m bitkern.study.compare DIR ...)

bitkern.study is the top library layer: it may import everything below it (eval, train, attacks, data,
freeze, bops, models, ...); only bitkern.cli imports it. See docs/study.md.
"""
from .config import SweepConfig, SweepError
from .defaults import DEFAULT_SPECS, defaults_for
from .results import write_summaries
from .presets import PRESETS, preset_config
from .runner import run_sweep
from .tables import method_columns

__all__ = ["SweepConfig", "SweepError", "run_sweep", "DEFAULT_SPECS", "defaults_for", "method_columns",
           "write_summaries", "PRESETS", "preset_config"]
