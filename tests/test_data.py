"""bitkern.data: every format written as tiny files and read back; malformed and hostile files refused."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from bitkern.data import DataError, dataset_info, load_dataset, read_cifar_batch, read_idx


# ----------------------------------------------------------------------------------------- digits
def test_digits_split_is_stratified_deterministic_and_disjoint():
    xtr, ytr = load_dataset("digits")
    xte, yte = load_dataset("digits", split="test")
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert float(xtr.min()) == 0.0 and float(xtr.max()) == 1.0
    # 80/20 per class (stratified)
    counts_tr, counts_te = torch.bincount(ytr), torch.bincount(yte)
    assert (counts_te - (counts_tr + counts_te).float().mul(0.2).round().long()).abs().max() <= 1
    # same split every call, train and test disjoint (compare as bytes of the images + label)
    xtr2, ytr2 = load_dataset("digits", split="train")
    assert torch.equal(xtr, xtr2) and torch.equal(ytr, ytr2)
    from sklearn.datasets import load_digits

    assert xtr.shape[0] + xte.shape[0] == len(load_digits().target)
    assert dataset_info("digits")["num_classes"] == 10


def test_unknown_dataset_and_bad_split_and_missing_dir(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="val")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(DataError, match="needs a data directory"):
        load_dataset("cifar10")


# -------------------------------------------------------------------------------------------- IDX
def _idx_bytes(arr: np.ndarray) -> bytes:
    assert arr.dtype == np.uint8
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_idx(path, arr, gz):
    data = _idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_roundtrip(tmp_path, gz, name):
    rng = np.random.default_rng(0)
    root = tmp_path / "raw" if name == "fashion-mnist" else tmp_path  # also finds <dir>/raw/
    root.mkdir(exist_ok=True)
    imgs = {p: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for p, n in (("train", 13), ("t10k", 10))}
    # every split must hold all 10 classes (a subset of the official rows is fine)
    labels = {p: rng.permutation(np.arange(len(imgs[p])) % 10).astype(np.uint8) for p in imgs}
    for p in imgs:
        _write_idx(root / f"{p}-images-idx3-ubyte", imgs[p], gz)
        _write_idx(root / f"{p}-labels-idx1-ubyte", labels[p], gz)
    for split, p in (("train", "train"), ("test", "t10k")):
        x, y = load_dataset(name, tmp_path, split)
        assert x.shape == (len(imgs[p]), 1, 28, 28) and x.dtype == torch.float32
        np.testing.assert_allclose(x[:, 0].numpy(), imgs[p].astype(np.float32) / 255.0)
        assert y.tolist() == labels[p].tolist()


def test_idx_bad_magic_truncated_and_mismatch_name_the_file(tmp_path):
    arr = np.zeros((4, 28, 28), np.uint8)
    bad = tmp_path / "bad-magic"
    bad.write_bytes(b"\x08\x03\x00\x00" + _idx_bytes(arr)[4:])
    with pytest.raises(DataError, match="bad-magic.*magic"):
        read_idx(bad)
    trunc = tmp_path / "truncated"
    trunc.write_bytes(_idx_bytes(arr)[:-10])
    with pytest.raises(DataError, match="truncated.*truncated"):
        read_idx(trunc)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="short"):
        read_idx(short)
    badgz = tmp_path / "broken.gz"
    badgz.write_bytes(gzip.compress(_idx_bytes(arr))[:-20])
    with pytest.raises(DataError, match="broken.gz"):
        read_idx(badgz)
    # labels and images of different lengths
    _write_idx(tmp_path / "train-images-idx3-ubyte", arr, False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), False)
    with pytest.raises(DataError, match="4 images but .*3 labels"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match="missing t10k-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path, "test")


# ------------------------------------------------------------------------------------------ CIFAR
def _cifar_batch(path, n, label_key, num_classes, seed, labels=None):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n).tolist() if labels is None else list(labels)
    # protocol 4 like the files numpy users write today; keys as bytes like the official batches
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": data, label_key.encode(): labels}, f, protocol=4)
    return data, labels


def test_cifar10_and_cifar100_roundtrip(tmp_path):
    d10 = tmp_path / "cifar-10-batches-py"
    d10.mkdir()
    # each split holds all 10 classes (train across its five batches)
    parts = [_cifar_batch(d10 / f"data_batch_{i}", 2, "labels", 10, i, [2 * i - 2, 2 * i - 1]) for i in range(1, 6)]
    test = _cifar_batch(d10 / "test_batch", 11, "labels", 10, 9, [*range(10), 3])
    x, y = load_dataset("cifar10", tmp_path)
    assert x.shape == (10, 3, 32, 32)
    ref = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32).astype(np.float32) / 255
    np.testing.assert_allclose(x.numpy(), ref)
    assert y.tolist() == sum((p[1] for p in parts), [])
    xt, yt = load_dataset("cifar10", d10, "test")  # the batch directory itself works too
    assert xt.shape == (11, 3, 32, 32) and yt.tolist() == test[1]

    d100 = tmp_path / "cifar-100-python"
    d100.mkdir()
    tr = _cifar_batch(d100 / "train", 104, "fine_labels", 100, 1, [*range(100), 7, 8, 9, 99])
    _cifar_batch(d100 / "test", 100, "fine_labels", 100, 2, range(99, -1, -1))
    x, y = load_dataset("cifar100", tmp_path)
    assert x.shape == (104, 3, 32, 32) and y.tolist() == tr[1]
    assert load_dataset("cifar100", tmp_path, "test")[0].shape[0] == 100


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_malicious_pickle_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f, protocol=protocol)
    with pytest.raises(DataError, match=r"data_batch_1.*refusing to load global"):
        read_cifar_batch(path)
    assert not marker.exists()
    # other dangerous globals as well
    evil2 = tmp_path / "evil2"
    evil2.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(DataError, match="builtins.eval"):
        read_cifar_batch(evil2)


def test_cifar_truncated_and_malformed(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    _cifar_batch(d / "data_batch_1", 2, "labels", 10, 0)
    raw = (d / "data_batch_1").read_bytes()
    (d / "data_batch_1").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_1"):
        read_cifar_batch(d / "data_batch_1")
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=4)
    with pytest.raises(DataError, match=r"data_batch_1.*uint8 \[n, 3072\]"):
        load_dataset("cifar10", tmp_path)
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump([1, 2, 3], f, protocol=4)
    with pytest.raises(DataError, match="expected a dict"):
        read_cifar_batch(d / "data_batch_1")
    with pytest.raises(DataError, match="missing CIFAR batch file"):
        read_cifar_batch(d / "data_batch_2")


# ------------------------------------------------------------------------------------ image folder
def _png(path, color, size=(10, 6)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_with_split_dirs_and_resize(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", color)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    x, y = load_dataset("imagefolder", tmp_path, "train", image_size=4)
    assert x.shape == (6, 3, 4, 4) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.allclose(x[0, 0], torch.ones(4, 4)) and torch.allclose(x[0, 2], torch.zeros(4, 4))
    assert torch.allclose(x[-1, 2], torch.ones(4, 4))
    xt, yt = load_dataset("imagefolder", tmp_path, "test", image_size=4)  # falls back to val/
    assert xt.shape == (2, 3, 4, 4) and yt.tolist() == [0, 1]


def test_imagefolder_single_root_split_and_bad_image(tmp_path):
    for cls in ("a", "b"):
        for i in range(5):
            _png(tmp_path / cls / f"{i}.jpg", (i * 40, 0, 0))
    xtr, ytr = load_dataset("imagefolder", tmp_path, "train", image_size=8)
    xte, yte = load_dataset("imagefolder", tmp_path, "test", image_size=8)
    assert xtr.shape[0] == 8 and xte.shape[0] == 2 and sorted(yte.tolist()) == [0, 1]
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset("imagefolder", tmp_path, "train", image_size=8)
    with pytest.raises(DataError, match="no class sub-directories"):
        load_dataset("imagefolder", tmp_path / "a")
