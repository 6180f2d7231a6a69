"""Hostile model files: every corrupt / tampered / absurd file is refused with one line naming it.

Covers frozen files (FrozenModel.save / load_frozen), trained model files (save_model / load_model + their
JSON sidecar) and training checkpoints. Tampering helpers rewrite safetensors files by hand; `_rehash`
recomputes the content hash afterwards so that the checks behind the hash (dtype, shape, names, values,
bounds) are exercised too.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from bitkern import checkpoint as ckpt
from bitkern import model_files as mf
from bitkern.checkpoint import CheckpointError, ModelFileError
from bitkern.freeze import _freeze_fused, _freeze_unfused, freeze, load_frozen
from bitkern.models import create

ROOT = Path(__file__).resolve().parent.parent
X = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ helpers
def _parse(path):
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])


def _write(path, header, data):
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    Path(path).write_bytes(len(hb).to_bytes(8, "little") + hb + bytes(data))


def _rehash(path):
    """Recompute bitkern_sha256 of a (tampered) file so that only the checks behind the hash can object."""
    header, data = _parse(path)
    header.setdefault("__metadata__", {}).pop(mf.HASH_KEY, None)
    _write(path, header, data)
    digest = mf._data_sha256(mf.read_header(path), memoryview(Path(path).read_bytes()))
    header["__metadata__"][mf.HASH_KEY] = digest
    _write(path, header, data)
    return digest


def _tamper(path, fn):
    """fn(tensors, metadata) edits in place; the file is rewritten and rehashed."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    fn(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    return _rehash(path)


def _sha(path):
    return ckpt._sha256(Path(path))


def _refused(fn, name, match, exc=ModelFileError):
    with pytest.raises(exc, match=match) as info:
        fn()
    msg = str(info.value)
    assert str(name) in msg, msg
    assert "\n" not in msg, msg
    return msg


def _set_meta(key, value):
    def fn(tensors, metadata):
        meta = json.loads(metadata["bitkern"])
        meta[key] = value
        metadata["bitkern"] = json.dumps(meta)
    return fn


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = create("resnet20", "mbn2x1", num_classes=10)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 8, 8))
    return model.eval()


@pytest.fixture(scope="module")
def frozen_file(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("frozen") / "frozen.safetensors"
    frozen = freeze(trained)
    frozen.save(path)
    with torch.no_grad():
        logits = frozen(X)
    return path, logits


@pytest.fixture
def ffile(frozen_file, tmp_path):
    path = tmp_path / "f.safetensors"
    shutil.copy(frozen_file[0], path)
    return path


@pytest.fixture(scope="module")
def model_file(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    ckpt.save_model(path, trained, {"dataset": "digits"})
    return path


@pytest.fixture
def mfile(model_file, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(model_file, path)
    shutil.copy(model_file.with_suffix(".json"), path.with_suffix(".json"))
    return path


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


@pytest.fixture
def cdir(tmp_path):
    m = _small()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.rand(2, 1, 6, 6)).sum().backward()
    opt.step()
    d = tmp_path / "ck"
    ckpt.save_checkpoint(d, model=m, optimizer=opt, state={"epoch": 1, "step": 4},
                         tensors={"P": torch.ones(2)})
    return d


def _cstate(d):
    return json.loads((d / "checkpoint.json").read_text())


def _cwrite(d, state):
    (d / "checkpoint.json").write_text(json.dumps(state))


def _cweights(d):
    return d / _cstate(d)["weights"]


def _cfix(d):
    """After tampering with the weights file: update both hashes in checkpoint.json."""
    state = _cstate(d)
    w = d / state["weights"]
    state["weights_sha256"] = _sha(w)
    with safe_open(str(w), framework="pt") as f:
        state["content_sha256"] = (f.metadata() or {}).get(mf.HASH_KEY)
    _cwrite(d, state)


def _cedit(d, edit, header=True):
    """edit(state) on checkpoint.json and (header=True) on the hashed state in the weights header, which is
    then rehashed (both hashes in checkpoint.json updated): only checks behind the hash can object."""
    state = _cstate(d)
    edit(state)
    _cwrite(d, state)
    if header:
        def fn(tensors, metadata):
            hs = json.loads(metadata[ckpt.STATE_KEY])
            edit(hs)
            metadata[ckpt.STATE_KEY] = json.dumps(hs, sort_keys=True, separators=(",", ":"))
        _tamper(_cweights(d), fn)
        _cfix(d)


def _cload(d, **kw):
    m = _small()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    return ckpt.load_checkpoint(d, model=m, optimizer=opt, **kw)


def _mfix(path):
    """After tampering with a save_model file: update the sidecar's hashes."""
    side = json.loads(path.with_suffix(".json").read_text())
    side["weights_sha256"] = _sha(path)
    with safe_open(str(path), framework="pt") as f:
        side["content_sha256"] = (f.metadata() or {}).get(mf.HASH_KEY)
    path.with_suffix(".json").write_text(json.dumps(side))


# ------------------------------------------------------------------------------------- round trips
def test_frozen_roundtrip_exact(frozen_file, trained, tmp_path):
    path, logits = frozen_file
    loaded = load_frozen(path)
    with torch.no_grad():
        assert torch.equal(loaded(X), logits)
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert mf.is_sha256(md[mf.HASH_KEY]) and json.loads(md["bitkern"])["version"] == 3
    loaded.save(tmp_path / "again.safetensors")  # saving a loaded model gives the same content
    with safe_open(str(tmp_path / "again.safetensors"), framework="pt") as f:
        assert f.metadata()[mf.HASH_KEY] == md[mf.HASH_KEY]


def test_model_roundtrip_exact_and_sidecar(model_file, trained):
    side = ckpt.read_model_meta(model_file)
    assert side["format_version"] == 2 and side["weights"] == "model.safetensors"
    assert side["weights_sha256"] == _sha(model_file)
    with safe_open(str(model_file), framework="pt") as f:
        assert f.metadata()[mf.HASH_KEY] == side["content_sha256"]
    for model in (ckpt.load_model(model_file), ckpt.load_model(model_file, create("resnet20", "mbn2x1"))):
        sd = model.state_dict()
        assert sd.keys() == trained.state_dict().keys()
        for k, v in trained.state_dict().items():
            assert torch.equal(v, sd[k]) and v.dtype == sd[k].dtype, k


def test_expected_state_on_meta_matches_real_models():
    for quant in ("xnor", "mbn3x2", "fp", "prune-weight-50", "pact-w2a2"):
        meta = {"arch": "resnet20", "quant": quant, "num_classes": 7, "in_channels": 2}
        real = create("resnet20", quant, num_classes=7, in_channels=2)
        assert mf.expected_state("x", meta) == mf.spec_of_module(real)
        for fuse, transform in ((True, _freeze_fused), (False, _freeze_unfused)):
            assert mf.expected_state("x", meta, transform=transform) == mf.spec_of_module(freeze(real, fuse))


# ------------------------------------------------------------------------------ frozen: corruption
@pytest.mark.parametrize("where", [0, 1000, -1, -4096])
def test_frozen_flipped_data_byte(ffile, where):
    header, data = _parse(ffile)
    data[where] ^= 0x10
    _write(ffile, header, data)
    _refused(lambda: load_frozen(ffile), ffile, "content sha256 mismatch")


@pytest.mark.parametrize("keep", [0, 5, 8, 20, "half", -1])
def test_frozen_truncated(ffile, keep):
    raw = ffile.read_bytes()
    n = len(raw) // 2 if keep == "half" else (len(raw) - 1 if keep == -1 else keep)
    ffile.write_bytes(raw[:n])
    _refused(lambda: load_frozen(ffile), ffile, "truncated|not a safetensors|corrupt")


def test_frozen_trailing_bytes_and_garbage(ffile, tmp_path):
    ffile.write_bytes(ffile.read_bytes() + b"\0" * 8)
    _refused(lambda: load_frozen(ffile), ffile, "trailing bytes")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    _refused(lambda: load_frozen(garbage), garbage, ".")
    bad_utf8 = tmp_path / "bad.safetensors"
    hb = b"\xff\xfe{}    "
    bad_utf8.write_bytes(len(hb).to_bytes(8, "little") + hb)
    _refused(lambda: load_frozen(bad_utf8), bad_utf8, "not valid UTF-8 JSON")
    _refused(lambda: load_frozen(tmp_path), tmp_path, "directory|not a regular file")
    _refused(lambda: load_frozen(tmp_path / "absent.safetensors"), "absent.safetensors", "cannot read")


def test_frozen_header_layout_tampering(ffile):
    header, data = _parse(ffile)
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    for edit, match in [
        (lambda h: h[name].update(dtype="F16"), "data bytes do not fit"),
        (lambda h: h[name].update(shape=h[name]["shape"] + [2]), "data bytes do not fit"),
        (lambda h: h[name].update(dtype="Q4"), "unsupported dtype"),
        (lambda h: h[name].update(shape=[True]), "invalid shape"),
        (lambda h: h[name].update(data_offsets=[0, h[name]["data_offsets"][1] - h[name]["data_offsets"][0]]),
         "overlaps|gap"),
        (lambda h: h[name].update(extra=1), "malformed"),
        (lambda h: h.update(__metadata__={"bitkern": 3}), "__metadata__"),
    ]:
        h = json.loads(json.dumps(header))
        edit(h)
        _write(ffile, h, data)
        _refused(lambda: load_frozen(ffile), ffile, match)
    # duplicate keys in the header JSON (a parser that keeps the first and one that keeps the last differ)
    hb = json.dumps(header).encode()
    hb = hb[:-1] + b', "__metadata__": {"bitkern": "{}"}}'
    hb += b" " * (-len(hb) % 8)
    ffile.write_bytes(len(hb).to_bytes(8, "little") + hb + bytes(data))
    _refused(lambda: load_frozen(ffile), ffile, "duplicate key")
    for meta in ([], None, 0, ""):
        h = json.loads(json.dumps(header))
        h["__metadata__"] = meta
        _write(ffile, h, data)
        _refused(lambda: load_frozen(ffile), ffile, "__metadata__ must map strings to strings")


@pytest.mark.parametrize("case", ["f16", "i8", "f64", "shape", "extra", "missing"])
def test_frozen_tensors_checked_behind_the_hash(ffile, case):
    fc = "net.fc.weight"
    edits = {
        "f16": (lambda t, m: t.update({fc: t[fc].half()}), "stored as F16, expected F32"),
        "i8": (lambda t, m: t.update({fc: t[fc].to(torch.int8)}), "stored as I8, expected F32"),
        "f64": (lambda t, m: t.update({fc: t[fc].double()}), "stored as F64, expected F32"),
        "shape": (lambda t, m: t.update({fc: t[fc][:5].contiguous()}), "has shape"),
        "extra": (lambda t, m: t.update({"net.evil": torch.zeros(1)}), "unexpected tensor"),
        "missing": (lambda t, m: t.pop(fc), "missing 1 tensor"),
    }
    fn, match = edits[case]
    _tamper(ffile, fn)
    _refused(lambda: load_frozen(ffile), ffile, match)


def test_frozen_hash_removed_wrong_or_malformed(ffile):
    header, data = _parse(ffile)
    good = header["__metadata__"][mf.HASH_KEY]
    for value, match in [(None, "no content hash"), ("0" * 64, "content sha256 mismatch"),
                         (good[:-1], "malformed"), (good.upper(), "malformed")]:
        h = json.loads(json.dumps(header))
        if value is None:
            del h["__metadata__"][mf.HASH_KEY]
        else:
            h["__metadata__"][mf.HASH_KEY] = value
        _write(ffile, h, data)
        _refused(lambda: load_frozen(ffile), ffile, match)


def test_frozen_metadata_tampering_breaks_the_hash(ffile):
    header, data = _parse(ffile)
    meta = json.loads(header["__metadata__"]["bitkern"])
    meta["fused"] = False  # same tensors would be read as an unfused model: the hash covers the metadata
    header["__metadata__"]["bitkern"] = json.dumps(meta)
    _write(ffile, header, data)
    _refused(lambda: load_frozen(ffile), ffile, "content sha256 mismatch|do not fit|missing")


def test_frozen_packed_high_bits(ffile):
    tensors = load_file(str(ffile))
    name = "net.layers.0.conv1.w_packed"  # 16 input channels: bits 16..63 of the word are unused
    assert tensors[name].shape[-1] == 1

    def set_bit(t, m):
        w = t[name].clone()
        w[0, 0, 0, 0, -1] |= 1 << 40
        t[name] = w
    _tamper(ffile, set_bit)
    _refused(lambda: load_frozen(ffile), ffile, "unused high bits must be zero")

    def set_sign_bit(t, m):
        w = t[name].clone()
        w[-1, -1, -1, -1, -1] |= -(1 << 63)
        t[name] = w
    _tamper(ffile, set_sign_bit)
    _refused(lambda: load_frozen(ffile), ffile, "unused high bits")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["net.fc.weight", "net.layers.0.conv1.alpha", "net.layers.0.conv1.bias"])
def test_frozen_non_finite(ffile, value, name):
    def poison(t, m):
        v = t[name].clone()
        v.view(-1)[0] = value
        t[name] = v
    _tamper(ffile, poison)
    _refused(lambda: load_frozen(ffile), ffile, "NaN or Inf")


@pytest.mark.parametrize("key, value, match", [
    ("num_classes", 10 ** 10, "out of range"), ("num_classes", 0, "out of range"),
    ("num_classes", -3, "out of range"), ("num_classes", True, "must be an int"),
    ("num_classes", 10.0, "must be an int"), ("num_classes", "10", "must be an int"),
    ("num_classes", None, "must be an int"), ("in_channels", 10 ** 9, "out of range"),
    ("in_channels", False, "must be an int"), ("arch", "resnet1000", "arch"), ("arch", 20, "arch"),
    ("quant", "mbn99x1", "quant"), ("quant", ["xnor"], "quant"), ("fused", "yes", "fused"),
    ("fused", 1, "fused"), ("version", 4, "unsupported frozen format version"),
    ("version", True, "unsupported"), ("version", "3", "unsupported"), ("format", "other", "holds format"),
])
def test_frozen_absurd_metadata_refused(ffile, key, value, match):
    _tamper(ffile, _set_meta(key, value))
    _refused(lambda: load_frozen(ffile), ffile, match)


def test_frozen_metadata_missing_or_not_json(ffile):
    def drop_arch(t, m):
        m["bitkern"] = json.dumps({k: v for k, v in json.loads(m["bitkern"]).items() if k != "arch"})
    _tamper(ffile, drop_arch)
    _refused(lambda: load_frozen(ffile), ffile, "lacks")
    _tamper(ffile, lambda t, m: m.update(bitkern="{not json"))
    _refused(lambda: load_frozen(ffile), ffile, "not valid JSON")
    _tamper(ffile, lambda t, m: m.update(bitkern="[1, 2]"))
    _refused(lambda: load_frozen(ffile), ffile, "holds format")
    _tamper(ffile, lambda t, m: m.pop("bitkern"))
    _refused(lambda: load_frozen(ffile), ffile, "no bitkern metadata")


_FAST = textwrap.dedent("""
    import resource, sys, time
    import bitkern.checkpoint, bitkern.models, safetensors.torch  # imports before the limit
    from bitkern.freeze import load_frozen
    from bitkern.model_files import ModelFileError
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (768 << 20), vm + (768 << 20)))
    kind, path = sys.argv[1:3]
    t = time.perf_counter()
    try:
        if kind == "frozen":
            load_frozen(path)
        else:
            bitkern.checkpoint.load_model(path)
    except ModelFileError as e:
        print("REFUSED", time.perf_counter() - t, e)
    else:
        print("LOADED")
""")


def _run_limited(tmp_path, kind, path):
    script = tmp_path / "fast.py"
    script.write_text(_FAST)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, str(script), kind, str(path)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("REFUSED"), out.stdout + out.stderr[-2000:]
    elapsed = float(out.stdout.split()[1])
    assert elapsed < 1.0, out.stdout
    assert "num_classes" in out.stdout and str(path.with_suffix("")) in out.stdout
    return time.perf_counter() - t


def test_frozen_huge_num_classes_refused_fast_without_allocating(ffile, tmp_path):
    _tamper(ffile, _set_meta("num_classes", 10 ** 10))
    t = time.perf_counter()
    _refused(lambda: load_frozen(ffile), ffile, "num_classes = 10000000000 is out of range")
    assert time.perf_counter() - t < 1.0
    _run_limited(tmp_path, "frozen", ffile)  # under RLIMIT_AS = current + 768 MiB


# ------------------------------------------------------------------------------ save_model files
@pytest.mark.parametrize("where", [0, 777, -1])
def test_model_flipped_data_byte(mfile, where):
    header, data = _parse(mfile)
    data[where] ^= 0x01
    _write(mfile, header, data)
    _refused(lambda: ckpt.load_model(mfile), mfile, "sha256")
    _mfix(mfile)  # even with the sidecar's whole-file hash updated, the header's content hash objects
    _refused(lambda: ckpt.load_model(mfile), mfile, "content sha256 mismatch")


def test_model_truncated(mfile):
    raw = mfile.read_bytes()
    for n in (0, 7, 100, len(raw) // 2, len(raw) - 1):
        mfile.write_bytes(raw[:n])
        _refused(lambda: ckpt.load_model(mfile), mfile, "truncated|not a safetensors|corrupt")


@pytest.mark.parametrize("weights", ["../model.safetensors", "/etc/passwd", "sub/model.safetensors", "..", "",
                                     7, None, "other.safetensors"])
def test_model_sidecar_weights_path(mfile, weights):
    side = json.loads(mfile.with_suffix(".json").read_text())
    side["weights"] = weights
    mfile.with_suffix(".json").write_text(json.dumps(side))
    _refused(lambda: ckpt.load_model(mfile), "model.json", "plain file name|not 'model.safetensors'")


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("weights_sha256"), "no valid weights_sha256"),
    (lambda s: s.update(weights_sha256="abc"), "no valid weights_sha256"),
    (lambda s: s.pop("content_sha256"), "no valid content_sha256"),
    (lambda s: s.update(content_sha256="0" * 64), "content hash in its header does not match"),
    (lambda s: s.update(weights_sha256="0" * 64), "sha256 of the file does not match"),
    (lambda s: s.update(format_version=3), "unsupported model format_version"),
    (lambda s: s.update(format_version=True), "unsupported model format_version"),
    (lambda s: s.update(format_version=2.0), "unsupported model format_version"),
    (lambda s: s.update(num_classes=True), "num_classes must be an int"),
    (lambda s: s.update(num_classes=10.0), "num_classes must be an int"),
    (lambda s: s.update(num_classes=11), "differs from its header"),
    (lambda s: s.update(quant="mbn3x1"), "differs from its header"),
    (lambda s: s.update(dataset="cifar10"), "differs from its header"),
])
def test_model_sidecar_fields(mfile, edit, match):
    side = json.loads(mfile.with_suffix(".json").read_text())
    edit(side)
    mfile.with_suffix(".json").write_text(json.dumps(side))
    _refused(lambda: ckpt.load_model(mfile), "model.", match)


@pytest.mark.parametrize("raw, match", [
    (b"\xff\xfe\x00garbage", "not UTF-8"), (b"{not json", "unreadable"), (b"[1, 2]", "not a JSON object"),
    (b'{"weights": "model.safetensors", "weights": "x"}', "duplicate key"), (b"[" * 100000, "unreadable"),
    (b"", "unreadable"),
])
def test_model_sidecar_garbage(mfile, raw, match):
    mfile.with_suffix(".json").write_bytes(raw)
    _refused(lambda: ckpt.load_model(mfile), "model.json", match)
    _refused(lambda: ckpt.read_model_meta(mfile), "model.json", match)


@pytest.mark.parametrize("case, match", [
    ("f16", "stored as F16, expected F32"), ("i8", "stored as I8"), ("shape", "has shape"),
    ("extra", "unexpected tensor"), ("missing", "missing 1 tensor"), ("nan", "NaN or Inf"),
])
def test_model_tensors_checked_behind_the_hash(mfile, case, match):
    name = "fc.weight"
    edits = {
        "f16": lambda t, m: t.update({name: t[name].half()}),
        "i8": lambda t, m: t.update({name: t[name].to(torch.int8)}),
        "shape": lambda t, m: t.update({name: t[name][:, :3].contiguous()}),
        "extra": lambda t, m: t.update({"evil": torch.zeros(3)}),
        "missing": lambda t, m: t.pop(name),
        "nan": lambda t, m: t.update({name: t[name].clone().fill_(float("nan"))}),
    }
    _tamper(mfile, edits[case])
    _mfix(mfile)
    _refused(lambda: ckpt.load_model(mfile), mfile, match)
    if case != "nan":  # with the model given, the same checks run against its state
        _refused(lambda: ckpt.load_model(mfile, create("resnet20", "mbn2x1")), mfile, match)


def test_model_huge_num_classes_refused_fast(mfile, tmp_path):
    def huge(t, m):
        meta = json.loads(m["meta"])
        meta["num_classes"] = 10 ** 10
        m["meta"] = json.dumps(meta, sort_keys=True)
    _tamper(mfile, huge)
    side = json.loads(mfile.with_suffix(".json").read_text())
    side["num_classes"] = 10 ** 10
    mfile.with_suffix(".json").write_text(json.dumps(side))
    _mfix(mfile)
    t = time.perf_counter()
    _refused(lambda: ckpt.load_model(mfile), "model.", "num_classes = 10000000000 is out of range")
    assert time.perf_counter() - t < 1.0
    _run_limited(tmp_path, "model", mfile)


def test_model_v1_files_verified_by_their_sidecar_hash(trained, tmp_path):
    """Files written before the content hash (sidecar without format_version) load when the sidecar's
    whole-file sha256 matches; a corrupt one is refused."""
    path = tmp_path / "old.safetensors"
    meta = ckpt.model_meta(trained, dataset="digits")
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path),
              metadata={"format": "pt", "bitkern": "model", "meta": json.dumps(meta)})
    path.with_suffix(".json").write_text(json.dumps({**meta, "weights": path.name,
                                                     "weights_sha256": _sha(path)}))
    loaded = ckpt.load_model(path)
    for k, v in trained.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    header, data = _parse(path)
    data[-3] ^= 0x80
    _write(path, header, data)
    _refused(lambda: ckpt.load_model(path), path, "sha256")
    side = json.loads(path.with_suffix(".json").read_text())
    del side["weights_sha256"]
    path.with_suffix(".json").write_text(json.dumps(side))
    _refused(lambda: ckpt.load_model(path), "old.json", "re-create")


def test_model_missing_sidecar_and_save_refuses_reserved_keys(mfile, trained):
    mfile.with_suffix(".json").unlink()
    _refused(lambda: ckpt.load_model(mfile), mfile, "missing model metadata", exc=CheckpointError)
    with pytest.raises(ValueError, match="reserved"):
        ckpt.save_model(mfile, trained, {"weights": "x"})


# ------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_format_and_roundtrip(cdir):
    state = _cstate(cdir)
    assert state["format_version"] == 3 and mf.is_sha256(state["content_sha256"])
    with safe_open(str(_cweights(cdir)), framework="pt") as f:
        assert f.metadata()[mf.HASH_KEY] == state["content_sha256"]
        hashed = json.loads(f.metadata()[ckpt.STATE_KEY])  # the training state lives in the hashed header
    assert hashed == {k: v for k, v in state.items() if k not in ckpt._RESERVED}
    c = _cload(cdir)
    assert c.state["epoch"] == 1 and torch.equal(c.extra()["P"], torch.ones(2))


@pytest.mark.parametrize("where", [0, 50, -1])
def test_checkpoint_flipped_data_byte(cdir, where):
    w = _cweights(cdir)
    header, data = _parse(w)
    data[where] ^= 0x04
    _write(w, header, data)
    _refused(lambda: _cload(cdir), w.name, "sha256")
    _cfix(cdir)  # JSON's whole-file hash updated: the content hash still objects
    _refused(lambda: _cload(cdir), w.name, "content")


def test_checkpoint_truncated(cdir):
    w = _cweights(cdir)
    raw = w.read_bytes()
    for n in (0, 9, len(raw) // 3, len(raw) - 2):
        w.write_bytes(raw[:n])
        _refused(lambda: _cload(cdir), w.name, "truncated|not a safetensors|corrupt")


@pytest.mark.parametrize("weights", ["../ck2/checkpoint-000001.safetensors", "/tmp/checkpoint-000001.safetensors",
                                     "sub/checkpoint-000001.safetensors", "..", ".", "", 5, None, ["a"]])
def test_checkpoint_weights_path_outside(cdir, weights):
    outside = cdir.parent / "ck2"
    shutil.copytree(cdir, outside)
    state = _cstate(cdir)
    state["weights"] = weights
    _cwrite(cdir, state)
    _refused(lambda: _cload(cdir), "checkpoint.json", "plain file name|not a bitkern checkpoint")


def test_checkpoint_symlink_escape(cdir, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    w = _cweights(cdir)
    shutil.move(str(w), outside / w.name)
    os.symlink(outside / w.name, w)
    _refused(lambda: _cload(cdir), "checkpoint.json", "outside")
    # a symlink that stays inside the directory is fine
    os.unlink(w)
    shutil.move(str(outside / w.name), cdir / "real.bin")
    os.symlink("real.bin", w)
    _cload(cdir)


@pytest.mark.parametrize("key, value, match", [
    ("epoch", True, "epoch must be a non-negative int"), ("epoch", 1.0, "epoch must be"),
    ("epoch", -1, "epoch must be"), ("epoch", "1", "epoch must be"), ("epoch", 10 ** 30, "epoch must be"),
    ("step", -3, "step must be"), ("step", 2.5, "step must be"), ("step", None, "step must be"),
    ("format_version", "2", "not a bitkern checkpoint"), ("format_version", True, "not a bitkern checkpoint"),
    ("format_version", 4, "not a bitkern checkpoint"), ("weights_sha256", None, "no valid weights_sha256"),
    ("format_version", 2, "older bitkern.*start the run again"), ("format_version", 1, "older bitkern"),
    ("weights_sha256", "x" * 64, "no valid weights_sha256"), ("content_sha256", 5, "no valid content_sha256"),
    ("content_sha256", "1" * 64, "content hash in its header does not match"),
    ("history", {"a": 1}, "history must be a list"), ("config", [], "config must be an object"),
    ("metrics", "good", "metrics must be an object"), ("recipe_state", 3, "recipe_state must be"),
    ("num_classes", True, "num_classes must be an int"), ("num_classes", 10 ** 10, "out of range"),
    ("arch", 7, "arch must be"),
])
def test_checkpoint_json_field_types(cdir, key, value, match):
    state = _cstate(cdir)
    state[key] = value
    _cwrite(cdir, state)
    _refused(lambda: _cload(cdir), "checkpoint.json", match)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["optimizer"].update(type=3), "optimizer must be an object"),
    (lambda s: s["optimizer"]["param_groups"][0].update(params=[True]), "params must be a list"),
    (lambda s: s["optimizer"]["param_groups"][0].update(params=[0, 0, 1, 2, 3, 4]), "repeats"),
    (lambda s: s["optimizer"]["param_groups"][0].update(lr=[[1]]), "lr must be"),
    (lambda s: s["optimizer"]["param_groups"][0].update(lr="0.1"), "lr must be a finite number"),
    (lambda s: s["optimizer"]["param_groups"][0].update(nesterov=1), "nesterov must be true or false"),
    (lambda s: s["optimizer"].update(scalars={"99": {}}), "scalars key"),
    (lambda s: s["optimizer"].update(type="Adam"), "optimizer is Adam"),
    (lambda s: s["optimizer"]["param_groups"].append(s["optimizer"]["param_groups"][0]), "repeats"),
    (lambda s: s["rng"]["numpy"].__setitem__(1, [0] * 10), "rng.numpy"),
    (lambda s: s["rng"]["numpy"].__setitem__(2, 9999), "rng.numpy"),
    (lambda s: s["rng"]["python"].__setitem__(1, [-1] * 625), "rng.python"),
    (lambda s: s.update(rng=[]), "rng must be"),
    (lambda s: (s.update(config={"run_epochs": 3}), s.pop("step")), "lacks"),
    (lambda s: s.update(config={"run_epochs": 0}, history=[]), "exceeds"),
    (lambda s: s.update(config={"run_epochs": 3}, history=[]), "history has 0 rows"),
    (lambda s: s.pop("optimizer"), "no optimizer entry"),
])
@pytest.mark.parametrize("both", [False, True], ids=["json_only", "json_and_hashed_header"])
def test_checkpoint_json_structure(cdir, edit, match, both):
    """Edited in checkpoint.json alone: refused (by a field check or as differing from the hashed state);
    edited in the hashed header too (rehashed): the checks behind the hash refuse it."""
    _cedit(cdir, edit, header=both)
    _refused(lambda: _cload(cdir, rng=True), "checkpoint.json", match if both else f"{match}|differs from",
             exc=CheckpointError)


@pytest.mark.parametrize("raw, match", [
    (b"\xc3\x28 {}", "not UTF-8"), (b"{oops", "unreadable"), (b"[]", "not an object"), (b"null", "not an object"),
    (b'{"epoch": 1, "epoch": 2}', "duplicate key"), (b"{" * 10 ** 5, "unreadable"), (b"", "unreadable"),
    (b'{"x": 1' + b"1" * 5000 + b"}", "unreadable"),
])
def test_checkpoint_json_garbage(cdir, raw, match):
    (cdir / "checkpoint.json").write_bytes(raw)
    _refused(lambda: _cload(cdir), "checkpoint.json", match)


@pytest.mark.parametrize("case, match", [
    ("dtype", "stored as F16, expected F32"), ("shape", "has shape"), ("extra_model", "unexpected tensor"),
    ("bad_name", "unexpected tensor name"), ("optim_shape", "its parameter is"),
    ("optim_index", "belongs to no parameter"), ("rng", "rng/torch"), ("nan", "NaN or Inf"),
    ("nan_extra", "NaN or Inf"),
])
def test_checkpoint_tensors_checked_behind_the_hash(cdir, case, match):
    w = _cweights(cdir)
    edits = {
        "dtype": lambda t, m: t.update({"model/3.weight": t["model/3.weight"].half()}),
        "shape": lambda t, m: t.update({"model/3.bias": torch.zeros(4)}),
        "extra_model": lambda t, m: t.update({"model/evil": torch.zeros(1)}),
        "bad_name": lambda t, m: t.update({"evil": torch.zeros(1)}),
        "optim_shape": lambda t, m: t.update({"optim/0/momentum_buffer": torch.zeros(1, 2, 3)}),
        "optim_index": lambda t, m: t.update({"optim/77/momentum_buffer": torch.zeros(1)}),
        "rng": lambda t, m: t.update({"rng/torch": t["rng/torch"].float()}),
        "nan": lambda t, m: t.update({"model/0.weight": t["model/0.weight"].clone().fill_(float("inf"))}),
        "nan_extra": lambda t, m: t.update({"extra/P": torch.tensor([float("nan"), 1.0])}),
    }
    _tamper(w, edits[case])
    _cfix(cdir)
    _refused(lambda: _cload(cdir), w.name, match)


def test_refused_checkpoint_leaves_model_and_rng_untouched(cdir):
    w = _cweights(cdir)
    _tamper(w, lambda t, m: t.update({"optim/0/momentum_buffer": torch.zeros(9)}))
    _cfix(cdir)
    m = _small()
    with torch.no_grad():
        m[0].weight.fill_(0.5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    with pytest.raises(ModelFileError):
        ckpt.load_checkpoint(cdir, model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                             rng=True)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("version", [1, 2])
def test_checkpoint_old_formats_refused_with_a_restart_hint(cdir, version):
    """Format 1 (no content hash) and 2 (training state in checkpoint.json only, not hashed) are refused,
    also when their weights file is intact: their state could have been edited unnoticed."""
    w = _cweights(cdir)
    header, data = _parse(w)
    for key in (ckpt.STATE_KEY, "bitkern_format_version") + ((mf.HASH_KEY,) if version == 1 else ()):
        del header["__metadata__"][key]
    _write(w, header, data)
    if version == 2:
        _rehash(w)
    state = _cstate(cdir)
    state.update(format_version=version, weights_sha256=_sha(w))
    if version == 1:
        del state["content_sha256"]
    else:
        _cwrite(cdir, state)
        _cfix(cdir)
        state = _cstate(cdir)
    _cwrite(cdir, state)
    msg = _refused(lambda: _cload(cdir), "checkpoint.json", f"format_version {version} .*older bitkern")
    assert "without --resume" in msg
    if version == 2:  # a v3 JSON pointing at a weights file without the hashed state is refused too
        state.update(format_version=3)
        _cwrite(cdir, state)
        _refused(lambda: _cload(cdir), w.name, "format 3")


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["optimizer"]["param_groups"][0].update(lr=-1.0), r"lr must be a finite number >= 0"),
    (lambda s: s["optimizer"]["param_groups"][0].update(momentum=1.5), r"momentum must be a number in \[0, 1\]"),
    (lambda s: s["optimizer"]["param_groups"][0].update(momentum=-0.1), r"momentum must be"),
    (lambda s: s["optimizer"]["param_groups"][0].update(dampening=2), r"dampening must be"),
    (lambda s: s["optimizer"]["param_groups"][0].update(weight_decay=-1), r"weight_decay must be"),
    (lambda s: s["optimizer"]["param_groups"][0].update(nesterov="yes"), r"nesterov must be true or false"),
    (lambda s: s["optimizer"]["param_groups"][0].update(foreach=3), r"foreach must be"),
    (lambda s: s["optimizer"]["param_groups"][0].update(nesterov=True, dampening=0.5), r"nesterov needs"),
    (lambda s: s["optimizer"]["param_groups"][0].update(betas=[5, 5]), r"betas must be two numbers in \[0, 1\)"),
    (lambda s: s["optimizer"]["param_groups"][0].update(eps=0), r"eps must be a finite number > 0"),
    (lambda s: s["optimizer"]["param_groups"][0].update(evil=1), r"unknown key\(s\) \['evil'\]"),
    (lambda s: s["optimizer"]["param_groups"][0].pop("momentum"), r"missing key\(s\) \['momentum'\]"),
    (lambda s: s["optimizer"]["scalars"].update({"0": {"step": -1}}), r"step must be"),
])
def test_checkpoint_optimizer_hyperparameters_range_checked(cdir, edit, match):
    """Out-of-range / unknown / missing param-group values are refused even when hashed consistently."""
    _cedit(cdir, edit)
    _refused(lambda: _cload(cdir), "checkpoint.json", match, exc=CheckpointError)


@pytest.mark.parametrize("edit", [
    lambda s: s.update(epoch=7), lambda s: s.update(step=0), lambda s: s.update(evil=1), lambda s: s.pop("step"),
    lambda s: s["optimizer"]["param_groups"][0].update(lr=0.2),
    lambda s: s["optimizer"]["param_groups"][0].update(momentum=1),  # 1 vs 0.9, also 0.9 vs 0.90000001
    lambda s: s["rng"]["numpy"][1].__setitem__(0, s["rng"]["numpy"][1][0] ^ 1),
], ids=["epoch", "step", "extra", "removed", "lr", "momentum", "rng"])
def test_checkpoint_json_edited_alone_is_refused(cdir, edit):
    _cedit(cdir, edit, header=False)
    _refused(lambda: _cload(cdir), "checkpoint.json", "differs from the hashed copy")


def test_checkpoint_hashed_state_needs_the_content_hash(cdir):
    """Editing checkpoint.json and the header state alike, without recomputing the content hash: refused."""
    w = _cweights(cdir)
    header, data = _parse(w)
    hs = json.loads(header["__metadata__"][ckpt.STATE_KEY])
    hs["epoch"] = 9
    header["__metadata__"][ckpt.STATE_KEY] = json.dumps(hs, sort_keys=True, separators=(",", ":"))
    _write(w, header, data)
    state = _cstate(cdir)
    state.update(epoch=9, weights_sha256=_sha(w))
    _cwrite(cdir, state)
    _refused(lambda: _cload(cdir), w.name, "content sha256 mismatch")


def test_checkpoint_model_identity(tmp_path):
    """arch / quant / num_classes / in_channels of the checkpoint must be those of the model given."""
    torch.manual_seed(0)
    m = create("resnet20", "mbn2x1", num_classes=4, in_channels=1)
    base = tmp_path / "base"
    ckpt.save_checkpoint(base, model=m, state={"epoch": 1})
    assert _cstate(base)["quant"] == "mbn2x1" and _cstate(base)["arch"] == "resnet20"
    ckpt.load_checkpoint(base, model=m)
    for key, value, other in [("quant", "fp", create("resnet20", "fp", num_classes=4, in_channels=1)),
                              ("arch", "resnet32", create("resnet32", "mbn2x1", num_classes=4, in_channels=1)),
                              ("num_classes", 5, create("resnet20", "mbn2x1", num_classes=5, in_channels=1))]:
        _refused(lambda: ckpt.load_checkpoint(base, model=other), "checkpoint.json", f"checkpoint {key} is",
                 exc=CheckpointError)
        d = tmp_path / key
        shutil.copytree(base, d)
        _cedit(d, lambda s: s.update({key: value}))  # consistently hashed: the model check still refuses
        _refused(lambda: ckpt.load_checkpoint(d, model=m), "checkpoint.json", f"checkpoint {key} is {value!r}",
                 exc=CheckpointError)
    with pytest.raises(CheckpointError, match="state quant is"):
        ckpt.save_checkpoint(tmp_path / "x", model=m, state={"quant": "fp"})
    with pytest.raises(ValueError, match="reserved"):
        ckpt.save_checkpoint(tmp_path / "x", model=m, state={"weights_sha256": "0" * 64})



def test_save_checkpoint_refuses_what_load_would_refuse(tmp_path):
    for state, match in [({"epoch": -1}, "epoch"), ({"step": 1.5}, "step"), ({"config": {}}, "lacks")]:
        with pytest.raises(CheckpointError, match=match):
            ckpt.save_checkpoint(tmp_path, model=_small(), state=state)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- CLI
def test_cli_corrupt_model_is_one_line_exit_2(ffile, mfile, capsys):
    from bitkern.cli import main

    header, data = _parse(ffile)
    data[10] ^= 0xFF
    _write(ffile, header, data)
    mfile.with_suffix(".json").write_bytes(b"\x80garbage")
    for path in (ffile, mfile):
        assert main(["eval", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and path.stem in err and "Traceback" not in err, err
