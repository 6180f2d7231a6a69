"""scikit-learn's bundled 8x8 digits, split 80/20 (stratified, fixed seed) and checked."""
from __future__ import annotations

import numpy as np
import torch

from ._common import DataError, check_split

DIGITS_SEED = 0          # fixed seed of the stratified 80/20 digits split
DIGITS_TEST_FRACTION = 0.2
DIGITS_SHAPE = (1797, 8, 8)
DIGITS_CLASSES = 10


def load_digits_split(split: str):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images, target = np.asarray(bunch.images), np.asarray(bunch.target)
    if images.shape != DIGITS_SHAPE or target.shape != DIGITS_SHAPE[:1] or not np.isfinite(images).all() \
            or images.min() < 0 or images.max() > 16:
        raise DataError(f"scikit-learn's digits data: expected {DIGITS_SHAPE} images in 0..16 and "
                        f"{DIGITS_SHAPE[0]} labels, got {images.shape} and {target.shape}")
    x = images.astype(np.float32) / 16.0
    y = target.astype(np.int64)
    check_split("scikit-learn's digits data", y, DIGITS_CLASSES, split="full")
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=DIGITS_SEED)
    sel = np.sort(tr if split == "train" else te)
    return torch.from_numpy(np.ascontiguousarray(x[sel, None])), torch.from_numpy(y[sel])
