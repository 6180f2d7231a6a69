"""Study presets: one reproducible ``bitkern sweep --preset NAME`` per claim of the papers (docs/findings.md).

A preset is a set of SweepConfig options; options given explicitly on the command line (or to
``preset_config``) override it, so ``--dataset cifar10 --data-dir ...`` runs the same claim on CIFAR-10
(on a GPU: ``--device cuda``, and the papers' full training with ``--train-samples 0 --epochs 200``).

The Fashion-MNIST sizes are chosen so that each claim finishes within 90 minutes on 2 CPU cores: a fixed
class-balanced subset of the training set, attacks on the first test examples, the standard suite with a
reduced Square query budget and 3 APGD-T target classes (AutoAttack's "fast" setting); every number in
the results says which. Inputs stay at Fashion-MNIST's native 1x28x28 (ResNet-20 is fully convolutional
up to its global average pool, so no padding is needed).
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from .config import SweepConfig, SweepError

__all__ = ["PRESETS", "preset_config", "preset_options"]

_FASHION = dict(dataset="fashion-mnist", train_samples=3000, epochs=8, batch_size=128, optimizer="adam", lr=2e-3,
                eval_samples=100, restarts=5, suite="standard", square_queries=500, apgd_targets=3)

PRESETS: dict[str, dict[str, Any]] = {
    # Claim 1 (paper 000, Sec. 4.2, Table 2): naturally trained Mx1 MBNs are more robust than 1xN MBNs,
    # PACT, XNOR and FP under PGD-20/50 at eps 2/255, step 0.5/255, 5 restarts.
    "paper000-natural": dict(
        _FASHION, specs=("fp", "pact-w4a4", "pact-w2a2", "xnor", "mbn1x3", "mbn3x1", "mbn5x1", "mbn3x3"),
        recipe="natural", seeds=(0, 1), eval_eps=(2 / 255, 8 / 255), table_budget=2 / 255,
        pgd_steps=(20, 50)),
    # Claim 2 (paper 000, Sec. 4.3, Table 3): FastAT-trained MBN3x3 is more robust than FP and PACT-4
    # trained the same way; the paper's AT threat model eps 8/255, step 2/255.
    "paper000-fastat": dict(
        _FASHION, specs=("fp", "pact-w4a4", "mbn3x3"), recipe="fastat", train_eps=8 / 255,
        seeds=(0,), eval_eps=(4 / 255, 8 / 255), table_budget=8 / 255, pgd_steps=(20, 50)),
    # Claim 3 (paper 003, Tables I, II, V): ODG-Q on a 4-bit ResNet-20 against natural training, DQ and
    # Free AT (m = 4): GN / FGSM / PGD-20 / BIM-20 / TPGD-20 at eps 8/255, step 4/255, white-box and
    # black-box (crafted on a naturally trained FP ResNet-20), with the training cost.
    "paper003-odgq": dict(
        _FASHION, specs=("pact-w4a4",), recipes=("natural", "odgq", "dq", "free"), train_eps=8 / 255,
        seeds=(0,), eval_eps=(4 / 255, 8 / 255), table_budget=8 / 255, alpha_ratio=0.5,
        pgd_steps=(20,), attacks=("GN", "FGSM", "PGD-20", "BIM-20", "TPGD-20"), transfer_source="fp"),
}

_FIELDS = {f.name for f in fields(SweepConfig)}
assert all(set(p) <= _FIELDS for p in PRESETS.values()), "a preset names an unknown SweepConfig option"


def preset_options(name: str) -> dict[str, Any]:
    """A copy of the preset's options; SweepError naming the presets for an unknown one."""
    if name not in PRESETS:
        raise SweepError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def preset_config(name: str, **overrides: Any) -> SweepConfig:
    """The preset's SweepConfig with ``overrides`` (explicit options) on top; output in results/<name> unless
    ``out`` is given."""
    return SweepConfig(**{"out": f"results/{name}", **preset_options(name), **overrides, "preset": name})
