"""bitkern.data against hostile files: bombs, overflowing headers, truncation, code-running pickles.

Every case must end in one DataError (a ValueError) naming the file, fast and without allocating
what the file claims. The CIFAR reader must still read the official Python 2 cPickle format (a
file written here opcode by opcode) and Python 3 pickles of protocols 2-5.
"""
import gzip
import io
import os
import pickle
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from bitkern.data import (MAX_DATA_BYTES, DataError, load_dataset, read_cifar_batch, read_idx)
from bitkern.data.imagefolder import decode_image

try:  # numpy >= 2
    from numpy._core import multiarray as np_multiarray
    from numpy._core import numeric as np_numeric
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as np_multiarray
    from numpy.core import numeric as np_numeric


class _Bounded:
    """Asserts a block runs in < seconds and its Python/numpy allocations peak below max_mib."""

    def __init__(self, seconds=1.0, max_mib=64):
        self.seconds, self.max_mib = seconds, max_mib

    def __enter__(self):
        tracemalloc.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert dt < self.seconds, f"took {dt:.2f} s"
        assert peak < self.max_mib << 20, f"peak allocation {peak / 2**20:.1f} MiB"
        return False


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)
    assert MAX_DATA_BYTES >= 1 << 30


# ============================================================================================= IDX
def _idx(code, dims, payload=b""):
    return struct.pack(">HBB", 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload


def _write_mnist(root, split="train", n=20, labels=None, images=None, gz=False):
    prefix = "train" if split == "train" else "t10k"
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if images is None else images
    labels = (np.arange(n) % 10).astype(np.uint8) if labels is None else labels
    paths = []
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx(0x08, arr.shape, arr.tobytes())
        p = root / stem
        if gz:
            p, data = p.with_name(stem + ".gz"), gzip.compress(data)
        p.write_bytes(data)
        paths.append(p)
    return images, labels, paths


def _zero_members(total_mib, member_mib=16):
    """Concatenated gzip members of zeros: total_mib MiB inflated from ~total_mib KiB of file."""
    member = gzip.compress(b"\0" * (member_mib << 20), 9)
    return member * (total_mib // member_mib)


def test_gzip_bomb_after_a_small_header_fails_fast_without_inflating(tmp_path):
    # header says 10 rows of 28x28 (7840 bytes); the stream inflates to 4 GiB of zeros
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(_idx(0x08, (10, 28, 28))) + _zero_members(4096))
    assert bomb.stat().st_size < 8 << 20
    with _Bounded(1.0, 16), pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*more data than"):
        read_idx(bomb)


def test_gzip_bomb_single_member(tmp_path):
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)  # one gzip member, 64 MiB of zeros after the header
    chunks = [comp.compress(_idx(0x08, (3, 28, 28)))]
    zeros = b"\0" * (16 << 20)
    chunks += [comp.compress(zeros) for _ in range(4)]
    bomb = tmp_path / "bomb.gz"
    bomb.write_bytes(b"".join(chunks) + comp.flush())
    with _Bounded(1.0, 16), pytest.raises(DataError, match=r"bomb\.gz.*more data than"):
        read_idx(bomb)


def test_gzip_bomb_in_a_dataset_directory(tmp_path):
    _write_mnist(tmp_path, n=10, gz=True)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes() + _zero_members(1024))
    with _Bounded(2.0, 32), pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("dims", [
    (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),      # product overflows int64
    (0x10000, 0x10000, 0x10000),              # 2^48 bytes
    (0xFFFFFFFF,) * 40,                        # many dims
    (1 << 31, 28, 28),
])
@pytest.mark.parametrize("gz", [False, True])
def test_header_dims_overflow_or_over_the_ceiling(tmp_path, dims, gz):
    data = _idx(0x0E, dims, b"\0" * 64)
    path = tmp_path / ("huge.gz" if gz else "huge")
    path.write_bytes(gzip.compress(data) if gz else data)
    with _Bounded(1.0, 8), pytest.raises(DataError, match=r"huge.*(ceiling|rows)"):
        read_idx(path)


def test_ceiling_is_overridable_per_call_and_by_environment(tmp_path, monkeypatch):
    arr = np.zeros((100, 28, 28), np.uint8)
    path = tmp_path / "ok"
    path.write_bytes(_idx(0x08, arr.shape, arr.tobytes()))
    assert read_idx(path).shape == (100, 28, 28)
    with pytest.raises(DataError, match="ok.*78400 bytes.*ceiling"):
        read_idx(path, max_bytes=1000)
    monkeypatch.setenv("BITKERN_DATA_MAX_BYTES", "1000")
    with pytest.raises(DataError, match="ceiling"):
        read_idx(path)
    monkeypatch.setenv("BITKERN_DATA_MAX_BYTES", "lots")
    with pytest.raises(DataError, match="BITKERN_DATA_MAX_BYTES"):
        read_idx(path)


def test_mnist_header_shape_and_rows_are_checked_before_reading(tmp_path):
    # 10^6 rows > 60000: refused from the header although the ceiling would allow 784 MB
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(0x08, (10,), bytes(range(10))))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(0x08, (1_000_000, 28, 28)))
    with _Bounded(1.0, 8), pytest.raises(DataError, match=r"train-images-idx3-ubyte.*1000000 rows.*at most 60000"):
        load_dataset("mnist", tmp_path)
    # 32x32 images are not MNIST
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(0x08, (10, 32, 32), b"\0" * 10240))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*\[10, 32, 32\].*Nx28x28"):
        load_dataset("mnist", tmp_path)
    # label count differs: refused from the image header, before reading the images
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(0x08, (11, 28, 28))) +
                                                          _zero_members(256))
    (tmp_path / "train-images-idx3-ubyte").unlink()
    with _Bounded(1.0, 8), pytest.raises(DataError, match="11 images but .*10 labels"):
        load_dataset("mnist", tmp_path)
    # test split: at most 10000 rows
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(0x08, (10001,), bytes(10001)))
    _write_mnist(tmp_path, "test", n=10)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(0x08, (10001,), bytes(10001)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*10001 rows.*at most 10000"):
        load_dataset("mnist", tmp_path, "test")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("cut", [1, 3, 6, 10, 100, 7839])
def test_truncated_idx(tmp_path, gz, cut):
    data = _idx(0x08, (10, 28, 28), bytes(7840))
    data = data[:-cut] if cut < len(data) else data[:2]
    path = tmp_path / "cut-file"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=r"cut-file.*(truncated|ends after)"):
        read_idx(path)


def test_truncated_gzip_stream_and_garbage_after_it(tmp_path):
    comp = gzip.compress(_idx(0x08, (10, 28, 28), bytes(range(256)) * 30 + bytes(160)))
    for n in (5, 12, len(comp) // 2, len(comp) - 1):
        p = tmp_path / f"part{n}.gz"
        p.write_bytes(comp[:n])
        with pytest.raises(DataError, match=f"part{n}.gz"):
            read_idx(p)
    p = tmp_path / "garbage.gz"
    p.write_bytes(comp + b"this is not gzip")
    with pytest.raises(DataError, match="garbage.gz"):
        read_idx(p)
    p = tmp_path / "flipped.gz"
    bad = bytearray(comp)
    bad[len(bad) // 2] ^= 0xFF
    p.write_bytes(bytes(bad))
    with pytest.raises(DataError, match="flipped.gz"):
        read_idx(p)


@pytest.mark.parametrize("head", [b"\x08\x03\x00\x00", b"\x00\x01\x08\x03", b"\x00\x00\x08\x00", b"PK\x03\x04",
                                  b"\x89PNG"])
def test_wrong_magic(tmp_path, head):
    path = tmp_path / "wrong-magic"
    path.write_bytes(head + struct.pack(">3I", 1, 28, 28) + bytes(784))
    with pytest.raises(DataError, match="wrong-magic.*magic"):
        read_idx(path)


@pytest.mark.parametrize("code", [0x00, 0x07, 0x0A, 0x0F, 0xFF])
def test_unknown_dtype_code(tmp_path, code):
    path = tmp_path / "bad-type"
    path.write_bytes(_idx(code, (1, 28, 28), bytes(784)))
    with pytest.raises(DataError, match="bad-type.*magic.*type code"):
        read_idx(path)


@pytest.mark.parametrize("code", [0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_wrong_dtype_for_mnist(tmp_path, code):
    size = {0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}[code]
    _write_mnist(tmp_path, n=10)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(code, (10, 28, 28), bytes(7840 * size)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*type code 0x.*expected 0x08"):
        load_dataset("mnist", tmp_path)
    assert read_idx(tmp_path / "train-images-idx3-ubyte").shape == (10, 28, 28)  # fine as a plain IDX file


def test_wrong_ndim(tmp_path):
    _write_mnist(tmp_path, n=10)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(0x08, (10, 1), bytes(10)))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*2 dims, expected 1"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("extra", [1, 7, 100000])
def test_trailing_bytes(tmp_path, gz, extra):
    data = _idx(0x08, (10, 28, 28), bytes(7840)) + b"\x01" * extra
    path = tmp_path / "trailing"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match="trailing.*(trailing bytes|more data)"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_exact_roundtrip_all_dtypes(tmp_path, gz):
    rng = np.random.default_rng(1)
    for code, dt in ((0x08, np.uint8), (0x09, np.int8), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")):
        arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dt)
        data = _idx(code, arr.shape, arr.tobytes())
        p = tmp_path / f"arr{code}"
        p.write_bytes(gzip.compress(data) if gz else data)
        out = read_idx(p)
        assert out.dtype == np.dtype(dt) and np.array_equal(out, arr)
    empty = tmp_path / "empty-idx"
    empty.write_bytes(_idx(0x08, (0, 28, 28)))
    assert read_idx(empty).shape == (0, 28, 28)


def test_labels_out_of_range_missing_class_and_empty_split(tmp_path):
    labels = np.arange(20, dtype=np.uint8) % 10
    labels[3] = 10
    _write_mnist(tmp_path, n=20, labels=labels)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*label 10 out of range.*0\.\.9"):
        load_dataset("mnist", tmp_path)
    _write_mnist(tmp_path, n=20, labels=(np.arange(20) % 9).astype(np.uint8))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*no examples of class\(es\) 9"):
        load_dataset("fashion-mnist", tmp_path)
    _write_mnist(tmp_path, "test", n=0, images=np.zeros((0, 28, 28), np.uint8), labels=np.zeros(0, np.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*test split is empty"):
        load_dataset("mnist", tmp_path, "test")


def test_missing_or_unreadable_idx_files(tmp_path):
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match="nothere.*cannot open"):
        read_idx(tmp_path / "nothere")
    d = tmp_path / "adir"
    d.mkdir()
    with pytest.raises(DataError, match="adir"):
        read_idx(d)


@pytest.mark.parametrize("gz", [False, True])
def test_real_format_roundtrip_is_exact(tmp_path, gz):
    imgs, labels, _ = _write_mnist(tmp_path, n=30, gz=gz)
    x, y = load_dataset("mnist", tmp_path)
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], torch.from_numpy(imgs.astype(np.float32) / 255.0))
    assert y.tolist() == labels.tolist()


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist_still_loads():
    x, y = load_dataset("fashion-mnist", split="test")
    assert x.shape == (10000, 1, 28, 28) and torch.bincount(y).tolist() == [1000] * 10
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from bitkern.cli import main

    _write_mnist(tmp_path, n=10, gz=True)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes() + _zero_members(64))
    assert main(["sweep", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train-images-idx3-ubyte.gz" in err and "Traceback" not in err


# =========================================================================================== CIFAR
class Py2CPickle:
    """Writes what Python 2.7's ``cPickle.dump(obj, f, 2)`` writes for a CIFAR batch, opcode by opcode.

    cPickle's rules: PROTO 2; BINPUT after every object it memoizes, memo ids from 1, but only
    objects with a reference count >= 2 (so not the temporaries of __reduce__) and never strings
    shorter than 2 bytes; str as SHORT_BINSTRING (< 256 bytes) or BINSTRING; ints as BININT1 / BININT2
    / BININT; lists and dicts in batches of 1000 (MARK ... APPENDS / SETITEMS); tuples of <= 3 items
    as TUPLE1-3, longer ones as MARK ... TUPLE; bools as NEWFALSE / NEWTRUE; a numpy array as
    Python 2 numpy reduces it: _reconstruct(ndarray, (0,), 'b') then BUILD with
    (1, shape, dtype('u1', 0, 1) + BUILD (3, '|', None, None, None, -1, -1, 0), False, raw bytes).
    """

    def __init__(self):
        self.out = bytearray(b"\x80\x02")
        self.memo = 0

    def put(self):
        self.memo += 1
        self.out += b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo)

    def str(self, s: bytes, shared=False):
        self.out += (b"U" + bytes([len(s)]) if len(s) < 256 else b"T" + struct.pack("<i", len(s))) + s
        if shared and len(s) >= 2:
            self.put()

    def int(self, v: int):
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)
        else:
            self.out += b"J" + struct.pack("<i", v)

    def glob(self, module: bytes, name: bytes):
        self.out += b"c" + module + b"\n" + name + b"\n"
        self.put()

    def list(self, items, save):
        self.out += b"]"
        self.put()
        for i in range(0, len(items), 1000):
            batch = items[i:i + 1000]
            if len(batch) == 1:
                save(batch[0])
                self.out += b"a"
                continue
            self.out += b"("
            for v in batch:
                save(v)
            self.out += b"e"

    def ndarray_u8(self, arr: np.ndarray):
        assert arr.dtype == np.uint8 and arr.flags.c_contiguous and arr.ndim == 2
        self.glob(b"numpy.core.multiarray", b"_reconstruct")
        self.glob(b"numpy", b"ndarray")
        self.out += b"K\x00\x85"           # (0,)
        self.str(b"b")                       # typecode 'b' (1 char: never memoized)
        self.out += b"\x87R"                # TUPLE3, REDUCE
        self.put()                           # the array (held by the dict)
        self.out += b"(K\x01"               # state: MARK 1
        self.int(arr.shape[0])
        self.int(arr.shape[1])
        self.out += b"\x86"                 # shape TUPLE2
        self.glob(b"numpy", b"dtype")
        self.str(b"u1")
        self.out += b"K\x00K\x01\x87R"      # ('u1', 0, 1) REDUCE
        self.put()                           # the u1 descriptor singleton
        self.out += b"(K\x03"
        self.str(b"|")
        self.out += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # dtype state, BUILD
        self.out += b"\x89"                 # is_fortran False
        self.str(arr.tobytes())             # raw data as a Python 2 str (BINSTRING)
        self.out += b"tb"                   # state TUPLE, BUILD

    def batch(self, items) -> bytes:
        """items: [(key, value)] in the file's order; values bytes, list of ints/bytes, or ndarray."""
        self.out += b"}"
        self.put()
        self.out += b"("
        for k, v in items:
            self.str(k, shared=True)
            if isinstance(v, np.ndarray):
                self.ndarray_u8(v)
            elif isinstance(v, list):
                self.list(v, lambda x: self.int(x) if isinstance(x, int) else self.str(x))
            else:
                self.str(v)
        self.out += b"u."
        return bytes(self.out)


def _cifar10_content(n, seed=0, classes=10):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.permutation(np.arange(n) % classes)]
    names = [b"image_%06d.png" % i for i in range(n)]
    return data, labels, names


def test_python2_cpickle_cifar10_file_byte_for_byte_full_size(tmp_path):
    data, labels, names = _cifar10_content(10000)
    raw = Py2CPickle().batch([(b"batch_label", b"testing batch 1 of 1"), (b"labels", labels),
                              (b"data", data), (b"filenames", names)])
    # the opcodes as cPickle writes them
    assert raw.startswith(b"\x80\x02}q\x01(U\x0bbatch_labelq\x02U\x14testing batch 1 of 1U\x06labelsq\x03]q\x04(K")
    assert b"cnumpy.core.multiarray\n_reconstruct\nq\x06cnumpy\nndarray\nq\x07K\x00\x85U\x01b\x87Rq\x08(K\x01M\x10'" \
           b"M\x00\x0c\x86cnumpy\ndtype\nq\tU\x02u1K\x00K\x01\x87Rq\n(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff" \
           b"\xffK\x00tb\x89T\x00\xc0\xd4\x01" in raw
    assert raw.endswith(b"e" + b"u.")
    # the stdlib unpickler agrees on the content (the file is well-formed)
    ref = pickle.loads(raw, encoding="bytes")
    assert list(ref) == [b"batch_label", b"labels", b"data", b"filenames"] and np.array_equal(ref[b"data"], data)

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(raw)
    batch = read_cifar_batch(d / "test_batch")
    assert sorted(batch) == ["batch_label", "data", "filenames", "labels"]
    assert type(batch["data"]) is np.ndarray and batch["data"].dtype == np.uint8
    assert np.array_equal(batch["data"], data) and batch["labels"] == labels and batch["filenames"] == names
    assert batch["batch_label"] == b"testing batch 1 of 1"
    x, y = load_dataset("cifar10", tmp_path, "test")
    assert x.shape == (10000, 3, 32, 32) and y.tolist() == labels
    assert torch.equal(x, torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0))


def test_python2_cpickle_cifar100_and_cifar10_train(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for split, n, seed in (("train", 250, 1), ("test", 100, 2)):
        data, fine, names = _cifar10_content(n, seed, classes=100)
        coarse = [v // 5 for v in fine]
        (d / split).write_bytes(Py2CPickle().batch([(b"filenames", names), (b"batch_label", split.encode()),
                                                    (b"fine_labels", fine), (b"coarse_labels", coarse),
                                                    (b"data", data)]))
        x, y = load_dataset("cifar100", tmp_path, split)
        assert x.shape == (n, 3, 32, 32) and y.tolist() == fine
        assert torch.equal(x, torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0))
    d10 = tmp_path / "cifar-10-batches-py"
    d10.mkdir()
    parts = []
    for i in range(1, 6):
        data, labels, names = _cifar10_content(1001 if i == 1 else 20, seed=i)  # > 1000: several APPENDS
        parts.append((data, labels))
        (d10 / f"data_batch_{i}").write_bytes(Py2CPickle().batch([(b"batch_label", b"training batch %d of 5" % i),
                                                                  (b"labels", labels), (b"data", data),
                                                                  (b"filenames", names)]))
    x, y = load_dataset("cifar10", tmp_path)
    assert y.tolist() == sum((p[1] for p in parts), [])
    assert torch.equal(x, torch.from_numpy(np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
                                           .astype(np.float32) / 255.0))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("keys", ["bytes", "str"])
@pytest.mark.parametrize("labels_as", ["list", "array", "numpy-ints"])
def test_python3_pickles_protocols_2_to_5(tmp_path, protocol, keys, labels_as):
    data, labels, names = _cifar10_content(30, seed=protocol)
    lab = {"list": labels, "array": np.asarray(labels, np.int64), "numpy-ints": [np.int64(v) for v in labels]}
    k = (lambda s: s.encode()) if keys == "bytes" else (lambda s: s)
    obj = {k("batch_label"): b"testing batch 1 of 1", k("labels"): lab[labels_as], k("data"): data,
           k("filenames"): names}
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "test_batch", "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    batch = read_cifar_batch(d / "test_batch")
    assert type(batch["data"]) is np.ndarray and np.array_equal(batch["data"], data)
    x, y = load_dataset("cifar10", tmp_path, "test")
    assert y.tolist() == labels
    assert torch.equal(x, torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0))


def test_non_contiguous_and_fortran_arrays_pickle_too(tmp_path):
    base = np.random.default_rng(0).integers(0, 256, (20, 3072 * 2), dtype=np.uint8)
    for name, arr in (("strided", base[:, ::2]), ("fortran", np.asfortranarray(base[:, :3072]))):
        for protocol in (2, 5):
            p = tmp_path / f"{name}{protocol}"
            with open(p, "wb") as f:
                pickle.dump({"data": arr, "labels": list(range(10)) * 2}, f, protocol=protocol)
            assert np.array_equal(read_cifar_batch(p)["data"], arr)


# --- hostile pickles ----------------------------------------------------------------------------
class _Reduce:
    def __init__(self, *rv):
        self.rv = rv

    def __reduce__(self):
        return self.rv


def _dump(path, obj, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


U1 = np.dtype("u1")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("case", ["reconstruct-shape", "state-shape", "state-overflow", "frombuffer-shape",
                                  "state-shape-u8"])
def test_pickled_array_claiming_2_40_elements_is_refused_before_allocating(tmp_path, protocol, case):
    big = 1 << 40
    rv = {
        "reconstruct-shape": (np_multiarray._reconstruct, (np.ndarray, (big,), b"b")),
        "state-shape": (np_multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                        (1, (1 << 20, 1 << 20), U1, False, b"\0" * 16)),
        "state-overflow": (np_multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                           (1, (1 << 63, 1 << 63, 1 << 63), U1, False, b"")),
        "frombuffer-shape": (np_numeric._frombuffer, (b"\0" * 16, U1, (big,), "C")),
        "state-shape-u8": (np_multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                           (1, (big,), np.dtype("u8"), False, b"\0" * 8)),
    }[case]
    path = _dump(tmp_path / "data_batch_1", {b"data": _Reduce(*rv), b"labels": [0]}, protocol)
    with _Bounded(1.0, 8), pytest.raises(DataError, match=r"data_batch_1.*(ceiling|refusing to allocate|holds)"):
        read_cifar_batch(path)


@pytest.mark.parametrize("opcode", [b"\x8e", b"B", b"T", b"\x96", b"X", b"\x8d"])
def test_length_prefix_larger_than_the_file_is_refused_before_the_unpickler_allocates(tmp_path, opcode):
    size = 1 << 40
    prefix = struct.pack("<Q", size) if opcode in (b"\x8e", b"\x96", b"\x8d") else struct.pack("<I", 0x7FFFFFFF)
    path = tmp_path / "huge-len"
    path.write_bytes(b"\x80\x05" + opcode + prefix + b"tiny" + b".")
    with _Bounded(1.0, 8), pytest.raises(DataError, match="huge-len.*(truncated|malformed)"):
        read_cifar_batch(path)
    frame = tmp_path / "huge-frame"
    frame.write_bytes(b"\x80\x04\x95" + struct.pack("<Q", size) + b"}.")
    with _Bounded(1.0, 8), pytest.raises(DataError, match="huge-frame.*frame"):
        read_cifar_batch(frame)


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _evil_pickles(marker: Path):
    cmd = f"touch {marker}"
    yield "os.system", lambda p: pickle.dumps({b"data": _Evil(os.system, cmd), b"labels": [0]}, protocol=p)
    yield "builtins.eval", lambda p: pickle.dumps(
        {b"data": _Evil(eval, f"__import__('os').system({cmd!r})")}, protocol=p)
    yield "builtins.exec", lambda p: pickle.dumps({"x": _Evil(exec, f"open({str(marker)!r}, 'w')")}, protocol=p)
    yield "builtins.open", lambda p: pickle.dumps([_Evil(open, str(marker), "w")], protocol=p)
    yield "subprocess.Popen", lambda p: pickle.dumps(_Evil(__import__("subprocess").Popen, ["touch", str(marker)]),
                                                     protocol=p)
    yield "numpy.load", lambda p: pickle.dumps({"data": _Evil(np.load, str(marker))}, protocol=p)
    yield "getattr", lambda p: pickle.dumps(_Evil(getattr, "x", "__class__"), protocol=p)


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_code_running_pickles_are_refused_and_never_executed(tmp_path, protocol):
    marker = tmp_path / "pwned"
    for name, make in _evil_pickles(marker):
        path = tmp_path / f"evil-{name}"
        path.write_bytes(make(protocol))
        with pytest.raises(DataError, match=f"evil-{name}.*refusing"):
            read_cifar_batch(path)
        assert not marker.exists(), name


@pytest.mark.parametrize("raw, needle", [
    (b"cos\nsystem\n(S'touch {m}'\ntR.", "os.system"),
    (b"cposix\nsystem\n(S'touch {m}'\ntR.", "posix.system"),
    (b"cbuiltins\neval\n(S'__import__(\"os\").system(\"touch {m}\")'\ntR.", "builtins.eval"),
    (b"c__builtin__\neval\n(S'1'\ntR.", "__builtin__.eval"),
    (b"(S'touch {m}'\nios\nsystem\n.", "INST"),
    (b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c{L}touch {m}\x85R.", "os.system"),
    (b"\x80\x02cnumpy\ndtype\nX\x01\x00\x00\x00O\x89\x88\x87R.", "dtype 'O'"),
    (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.", "_codecs.encode"),
    (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85U\x01b\x87R.", "only numpy.ndarray"),
    (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01O\x87R.", "typecode 'O'"),
    (b"\x80\x02cnumpy\nndarray\nK\x01\x85\x85R.", "ndarray"),
    (b"\x80\x02(X\x01\x00\x00\x00aX\x01\x00\x00\x00b\x81.", "NEWOBJ"),
    (b"\x80\x02\x82\x01.", "EXT1"),
    (b"\x80\x02P1\n.", "PERSID"),
])
def test_crafted_opcode_streams(tmp_path, raw, needle):
    marker = tmp_path / "pwned"
    path = tmp_path / "crafted"
    cmd = b"touch " + str(marker).encode()
    path.write_bytes(raw.replace(b"{m}", str(marker).encode()).replace(b"{L}", bytes([len(cmd)])))
    with pytest.raises(DataError, match="crafted") as e:
        read_cifar_batch(path)
    assert needle in str(e.value)
    assert not marker.exists()


def test_object_arrays_and_structured_dtypes_are_refused(tmp_path):
    for name, arr in (("object", np.array([1, "x", None], dtype=object)),
                      ("structured", np.zeros(3, dtype=[("a", "u1"), ("b", "f4")])),
                      ("string", np.array(["ab", "cd"])),
                      ("datetime", np.array(["2020-01-01"], dtype="M8[D]"))):
        for protocol in (2, 5):
            path = _dump(tmp_path / f"{name}{protocol}", {b"data": arr, b"labels": [0]}, protocol)
            with pytest.raises(DataError, match=f"{name}{protocol}.*(refusing|object arrays|dtype)"):
                read_cifar_batch(path)


def test_cifar_wrong_keys_and_fields(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    data, labels, _ = _cifar10_content(10)
    cases = [
        ({b"labels": labels}, r"lacks 'data'"),
        ({b"data": data}, r"lacks 'data' or 'labels'"),
        ({b"data": data, b"fine_labels": labels}, r"lacks 'data' or 'labels'"),
        ({b"data": data.tobytes(), b"labels": labels}, r"uint8 \[n, 3072\], got bytes"),
        ({b"data": data.astype(np.float32), b"labels": labels}, r"uint8 \[n, 3072\].*float32"),
        ({b"data": data.reshape(10, 3, 1024), b"labels": labels}, r"uint8 \[n, 3072\]"),
        ({b"data": data[:, :3000], b"labels": labels}, r"uint8 \[n, 3072\]"),
        ({b"data": data, b"labels": [str(v) for v in labels]}, r"'labels' must be a list of ints, found str"),
        ({b"data": data, b"labels": [True] * 10}, r"'labels' must be a list of ints"),
        ({b"data": data, b"labels": [float(v) for v in labels]}, r"'labels' must be a list of ints"),
        ({b"data": data, b"labels": {1: 2}}, r"'labels' must be a list of ints, got dict"),
        ({b"data": data, b"labels": np.zeros((10, 1), np.int64)}, r"'labels' must be a list of ints"),
        ({b"data": data, b"labels": labels[:9]}, r"10 images but 9 labels"),
        ({b"data": data, b"labels": [*labels[:9], 10]}, r"label 10 .*out of range \(expected 0\.\.9\)"),
        ({b"data": data, b"labels": [*labels[:9], -1]}, r"label -1 .*out of range"),
        ({b"data": data, b"labels": [*labels[:9], 1 << 80]}, r"(out of range)"),
        ({b"data": data, b"labels": [0] * 10}, r"no examples of class\(es\) 1, 2"),
        ({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, r"test split is empty"),
        ({1: data, b"labels": labels}, r"keys must be strings"),
    ]
    for obj, pat in cases:
        _dump(d / "test_batch", obj)
        with pytest.raises(DataError, match=r"test_batch.*" + pat):
            load_dataset("cifar10", tmp_path, "test")


def test_cifar_too_many_rows_and_file_over_the_ceiling(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    _dump(d / "test_batch", {b"data": np.zeros((10001, 3072), np.uint8), b"labels": list(range(10)) * 1000 + [0]})
    with pytest.raises(DataError, match=r"test_batch.*10001 rows, expected at most 10000"):
        load_dataset("cifar10", tmp_path, "test")
    with pytest.raises(DataError, match=r"test_batch.*more than the .*ceiling"):
        read_cifar_batch(d / "test_batch", max_bytes=1 << 20)
    with pytest.raises(DataError, match=r"test_batch.*ceiling"):
        load_dataset("cifar10", tmp_path, "test", max_bytes=1 << 20)


def test_cifar_train_missing_a_class_across_batches(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        _dump(d / f"data_batch_{i}", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, i]})
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*train split has no examples of class\(es\) 6, 7, 8, 9"):
        load_dataset("cifar10", tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing CIFAR batch file .*data_batch_3"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_truncated_and_garbage_pickles(tmp_path, protocol):
    data, labels, names = _cifar10_content(12)
    raw = pickle.dumps({b"data": data, b"labels": labels, b"filenames": names}, protocol=protocol)
    for cut in (0, 1, 2, 10, 100, len(raw) // 2, len(raw) - 40, len(raw) - 1):
        p = tmp_path / f"cut{cut}"
        p.write_bytes(raw[:cut])
        with pytest.raises(DataError, match=f"cut{cut}"):
            read_cifar_batch(p)
    p = tmp_path / "trailing"
    p.write_bytes(raw + b"junk")
    with pytest.raises(DataError, match="trailing.*trailing bytes"):
        read_cifar_batch(p)
    p = tmp_path / "noise"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="noise"):
        read_cifar_batch(p)
    p = tmp_path / "python2-cut"
    p.write_bytes(Py2CPickle().batch([(b"labels", labels), (b"data", data)])[:-3000])
    with pytest.raises(DataError, match="python2-cut"):
        read_cifar_batch(p)


def test_deeply_nested_pickle_is_a_data_error(tmp_path):
    p = tmp_path / "nested"
    p.write_bytes(b"\x80\x02" + b"]" * 50000 + b"a" * 49999 + b".")
    try:
        obj = read_cifar_batch(p)
    except DataError as e:
        assert "nested" in str(e)
    else:  # pragma: no cover - an unpickler that builds it still yields no dict
        raise AssertionError(f"expected DataError, got {type(obj)}")


# ==================================================================================== image folders
def _png_header_only(width, height):
    """A PNG whose IHDR claims width x height RGB, followed by one tiny IDAT and IEND."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _save(path, size=(16, 12), fmt=None, seed=0, color=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        im = Image.fromarray(arr, "RGB")
    else:
        im = Image.new("RGB", size, color)
    im.save(path, format=fmt)
    return path


def _folder(root, classes=("a", "b"), n=5, suffix=".png"):
    for c in classes:
        for i in range(n):
            _save(root / c / f"{i}{suffix}", seed=i)


@pytest.mark.parametrize("w, h", [(100_000, 100_000), (20_000, 20_000), (10_000, 10_000), (9_000, 9_000),
                                  (1, 2 ** 31 - 1)])
def test_png_decompression_bombs(tmp_path, w, h):
    _folder(tmp_path)
    bomb = tmp_path / "b" / "bomb.png"
    bomb.write_bytes(_png_header_only(w, h))
    with _Bounded(1.0, 32), pytest.raises(DataError, match=r"bomb\.png.*(decompression bomb|ceiling)"):
        load_dataset("imagefolder", tmp_path, "train", image_size=8)


def test_pixel_ceiling_holds_when_pil_limit_is_disabled(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    with _Bounded(1.0, 32), pytest.raises(DataError, match=r"bomb\.png.*100000x100000.*ceiling"):
        decode_image(bomb, 8)
    small = _save(tmp_path / "small.png", size=(40, 30))
    with pytest.raises(DataError, match=r"small\.png.*40x30 = 1200 pixels.*1000-pixel ceiling"):
        decode_image(small, 8, max_pixels=1000)
    assert decode_image(small, 8).shape == (3, 8, 8)


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"), ("PPM", ".ppm")])
@pytest.mark.parametrize("keep", [0.5, 0.9, 20])
def test_truncated_images(tmp_path, fmt, suffix, keep):
    _folder(tmp_path)
    p = _save(tmp_path / "a" / f"cut{suffix}", size=(64, 64), fmt=fmt, seed=3)
    raw = p.read_bytes()
    p.write_bytes(raw[: int(len(raw) * keep)] if keep < 1 else raw[:keep])
    with pytest.raises(DataError, match=rf"cut\{suffix}.*cannot decode"):
        load_dataset("imagefolder", tmp_path, "train", image_size=8)


@pytest.mark.parametrize("content", [b"", b"not an image", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
                                     b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", b"\x00" * 1000])
def test_unreadable_or_foreign_format_images(tmp_path, content):
    _folder(tmp_path)
    (tmp_path / "a" / "weird.jpg").write_bytes(content)
    with pytest.raises(DataError, match=r"weird\.jpg.*cannot decode"):
        load_dataset("imagefolder", tmp_path, "train", image_size=8)


def test_png_content_with_jpg_suffix_still_loads_exactly(tmp_path):
    for cls, color in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        for split, n in (("train", 2), ("test", 1)):
            for i in range(n):
                _save(tmp_path / split / cls / f"{i}.jpg", fmt="PNG", color=color)
    x, y = load_dataset("imagefolder", tmp_path, "train", image_size=4)
    assert y.tolist() == [0, 0, 1, 1]  # blue, red (sorted class names)
    assert torch.equal(x[0], torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 4, 4))
    assert torch.equal(x[2], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 4, 4))


def test_empty_folders_and_missing_classes(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty.*no class sub-directories"):
        load_dataset("imagefolder", empty)
    nofiles = tmp_path / "nofiles"
    (nofiles / "cat").mkdir(parents=True)
    (nofiles / "dog").mkdir()
    _save(nofiles / "cat" / "0.png")
    (nofiles / "dog" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"nofiles/dog.*no image files"):
        load_dataset("imagefolder", nofiles)
    # split directories: test/ without class dirs, with a missing class, with an empty class
    split = tmp_path / "split"
    _folder(split / "train", n=2)
    (split / "test").mkdir()
    with pytest.raises(DataError, match=r"split/test.*no class sub-directories"):
        load_dataset("imagefolder", split, "test")
    _folder(split / "test", classes=("a",), n=1)
    with pytest.raises(DataError, match=r"split/test.*differ from .*train"):
        load_dataset("imagefolder", split, "test")
    (split / "test" / "b").mkdir()
    with pytest.raises(DataError, match=r"split/test/b.*no image files"):
        load_dataset("imagefolder", split, "test")
    _save(split / "test" / "b" / "0.png")
    x, y = load_dataset("imagefolder", split, "test", image_size=4)
    assert x.shape == (2, 3, 4, 4) and y.tolist() == [0, 1]
    # one folder for both splits: a class with too few images for an 80/20 split
    few = tmp_path / "few"
    _folder(few, classes=("a",), n=5)
    _folder(few, classes=("b",), n=2)
    assert load_dataset("imagefolder", few, "train", image_size=4)[1].tolist().count(1) == 2
    with pytest.raises(DataError, match=r"few/b.*2 image\(s\) leave none for the test split"):
        load_dataset("imagefolder", few, "test", image_size=4)


def test_imagefolder_allocation_ceiling_and_image_size(tmp_path):
    _folder(tmp_path, n=5)
    with pytest.raises(DataError, match=r"8 images at 64x64 need .*ceiling"):
        load_dataset("imagefolder", tmp_path, "train", image_size=64, max_bytes=100_000)
    with _Bounded(1.0, 16), pytest.raises(DataError, match="ceiling"):
        load_dataset("imagefolder", tmp_path, "train", image_size=1_000_000)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="image_size"):
            load_dataset("imagefolder", tmp_path, image_size=bad)


def test_imagefolder_roundtrip_exact(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(5)
    arrs = {}
    for cls in ("x", "y"):
        for i in range(5):
            a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            arrs[(cls, i)] = a
            p = tmp_path / cls / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a, "RGB").save(p)
    xtr, ytr = load_dataset("imagefolder", tmp_path, "train", image_size=8)
    xte, yte = load_dataset("imagefolder", tmp_path, "test", image_size=8)
    assert xtr.shape == (8, 3, 8, 8) and xte.shape == (2, 3, 8, 8) and sorted(yte.tolist()) == [0, 1]
    expected = {a.transpose(2, 0, 1).astype(np.float32).tobytes() for a in arrs.values()}
    got = {(xi.numpy() * 255).round().astype(np.float32).tobytes() for xi in torch.cat([xtr, xte])}
    assert got == expected


def _numpy1_names(raw: bytes) -> bytes:
    """A numpy 2 pickle (protocol 4/5, one frame) rewritten with numpy 1.x module names."""
    out = raw
    for new, old in ((b"numpy.core.multiarray", b"numpy._core.multiarray"),
                     (b"numpy.core.numeric", b"numpy._core.numeric")):
        out = out.replace(b"\x8c" + bytes([len(old)]) + old, b"\x8c" + bytes([len(new)]) + new)
    assert out[2:3] == b"\x95" and out.count(b"\x95") >= 1
    frame = struct.unpack("<Q", out[3:11])[0] - (len(raw) - len(out))
    return out[:3] + struct.pack("<Q", frame) + out[11:]


@pytest.mark.parametrize("protocol", [4, 5])
def test_numpy1_module_names_are_accepted(tmp_path, protocol):
    data, labels, _ = _cifar10_content(10)
    raw = pickle.dumps({b"data": data, b"labels": [np.int64(v) for v in labels]}, protocol=protocol)
    old = _numpy1_names(raw)
    assert b"numpy.core." in old and b"numpy._core" not in old
    p = tmp_path / "np1"
    p.write_bytes(old)
    batch = read_cifar_batch(p)
    assert np.array_equal(batch["data"], data) and [int(v) for v in batch["labels"]] == labels


def test_restricted_unpickler_used_directly_is_bounded_too(tmp_path):
    from bitkern.data import RestrictedUnpickler

    with _Bounded(1.0, 8), pytest.raises(DataError, match="<pickle>.*truncated"):
        RestrictedUnpickler(io.BytesIO(b"\x80\x05\x8e" + struct.pack("<Q", 1 << 40) + b"x.")).load()
    with pytest.raises(DataError, match="ceiling"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(b"x" * 5000)), max_bytes=1000)
    assert RestrictedUnpickler(io.BytesIO(pickle.dumps({"a": [1, b"b"]}, protocol=2))).load() == {"a": [1, b"b"]}
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global os.system"):
        RestrictedUnpickler(io.BytesIO(b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x01x\x85R.")).load()
