"""Evaluation: clean accuracy, robustness (clean/adversarial accuracy), the standard suite, step-size
sweeps, sanity report.

See docs/robustness.md for the JSON schema and conventions.
"""
from .accuracy import evaluate_accuracy
from .result import SCHEMA, RobustnessResult
from .robustness import robustness
from .sanity import sanity_report
from .step_size import plot_sweep, step_size_sweep
from .suite import SuiteResult, example_seeds, standard_attacks, standard_suite

__all__ = ["SCHEMA", "RobustnessResult", "SuiteResult", "evaluate_accuracy", "example_seeds", "plot_sweep",
           "robustness", "sanity_report", "standard_attacks", "standard_suite", "step_size_sweep"]
