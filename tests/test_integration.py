"""Integration: FP and MBN ResNet-20 really learn the bundled digits data, and stay correct when frozen."""
import time

import pytest
import torch

from bitkern.data import load_dataset
from bitkern.eval import evaluate_accuracy
from bitkern.freeze import freeze
from bitkern.models import create
from bitkern.train import fit


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train"), load_dataset("digits", split="test")


@pytest.mark.parametrize("spec, epochs", [("fp", 3), ("mbn1x3", 4)])
def test_resnet20_learns_digits(digits, spec, epochs):
    (xtr, ytr), (xte, yte) = digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 8x8 images: threads only add overhead (and stall on a shared CPU)
    try:
        torch.manual_seed(0)
        model = create("resnet20", spec, num_classes=10, in_channels=1)
        t0 = time.perf_counter()
        res = fit(model, (xtr, ytr), epochs=epochs, batch_size=64, optimizer="adam", lr=2e-3 if spec == "fp" else 5e-3,
                  weight_decay=0.0, progress=False)
        elapsed = time.perf_counter() - t0
        acc = evaluate_accuracy(model, (xte, yte))
        frozen_acc = evaluate_accuracy(freeze(model), (xte, yte))
    finally:
        torch.set_num_threads(threads)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert acc > 60.0, f"{spec}: test accuracy {acc:.1f}% after {epochs} epochs ({elapsed:.0f}s)"
    assert abs(frozen_acc - acc) <= 100.0 / len(yte) + 1e-9  # packed kernels: same predictions (±1 example)
