"""What the study runs when the user does not say: the quant specs and the per-dataset defaults."""
from __future__ import annotations

from typing import Any

from ..data import canonical_name

__all__ = ["DEFAULT_SPECS", "DATASET_DEFAULTS", "defaults_for"]

DEFAULT_SPECS = ("fp", "pact-w4a4", "pact-w2a2", "xnor", "mbn1x3", "mbn3x1", "mbn3x3", "mbn5x1")

# Defaults per dataset: training (epochs, batch_size, optimizer, lr, weight_decay, augment), the attacked
# test subset (eval_samples) and the L-inf budgets (eval_eps, in /255; table_eps: the one Table 2 shows).
# digits: 16 grey levels, one level = 16/255, so the paper's 2/255 cannot move an image across a level:
# the budgets span that step (accuracy falls from ~clean to far below it). The others: the papers'
# 2/255 and its neighbours. The 8-spec digits default takes about 5 CPU minutes, ~2.5 min wall on 2 idle
# cores with `bitkern sweep`'s one worker process per core (target: < 10 min; docs/study.md, "Run time").
_PAPER_BUDGETS = dict(eval_eps=(1, 2, 4, 8), table_eps=2)
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(epochs=8, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0, augment=False,
                   eval_samples=100, eval_eps=(8, 16, 32), table_eps=16),
    "mnist": dict(epochs=10, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0, augment=False,
                  eval_samples=1000, **_PAPER_BUDGETS),
    "fashion-mnist": dict(epochs=20, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0,
                          augment=False, eval_samples=1000, **_PAPER_BUDGETS),
    "cifar10": dict(epochs=200, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=5e-4, augment=True,
                    eval_samples=1000, **_PAPER_BUDGETS),
    "cifar100": dict(epochs=200, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=5e-4, augment=True,
                     eval_samples=1000, **_PAPER_BUDGETS),
    "imagefolder": dict(epochs=90, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=1e-4, augment=True,
                        eval_samples=1000, **_PAPER_BUDGETS),
}


def defaults_for(dataset: str) -> dict[str, Any]:
    """A copy of the dataset's defaults (any spelling ``bitkern.data`` accepts)."""
    return dict(DATASET_DEFAULTS[canonical_name(dataset)])
