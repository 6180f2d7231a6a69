"""Clean top-1 accuracy of a model on an (x, y) tensor pair (used by training, the study and the CLI)."""
from __future__ import annotations

import torch
from torch import nn

from ._data import tensor_pair

__all__ = ["evaluate_accuracy"]


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data, batch_size: int = 512, device: str | torch.device = "cpu") -> float:
    """Clean top-1 accuracy in % (model in eval mode; restored afterwards)."""
    x, y = tensor_pair(data, "eval data")
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        out = model(x[i:i + batch_size].to(device))
        correct += int((out.argmax(1).cpu() == y[i:i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / x.shape[0]
