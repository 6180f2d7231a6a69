"""Robustness evaluation: clean/adversarial accuracy, step-size sweeps, sanity report.

See docs/robustness.md for the JSON schema and conventions.
"""
from .result import SCHEMA, RobustnessResult
from .robustness import robustness
from .sanity import sanity_report
from .sweep import plot_sweep, step_size_sweep

__all__ = ["SCHEMA", "RobustnessResult", "plot_sweep", "robustness", "sanity_report", "step_size_sweep"]
