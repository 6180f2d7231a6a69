"""BITKERN_* environment variables: bitkern.dispatch.check_environment() and the ops' own check.

A bad value gives one ValueError line naming the variable, its value and what was expected; it never
makes the cpp backend look unavailable (which would silently switch ops to the torch backend).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bitkern
from bitkern import dispatch, ops

ROOT = Path(__file__).resolve().parents[1]
KERNEL_VARS = dispatch.KERNEL_ENV_VARS + dispatch.OTHER_ENV_VARS

BAD = [
    ("BITKERN_BACKEND", "fpga"), ("BITKERN_BACKEND", "CPP"), ("BITKERN_BACKEND", " cpp"),
    ("BITKERN_ISA", "neon"), ("BITKERN_ISA", "avx-512"), ("BITKERN_ISA", "0"),
    ("BITKERN_NUM_THREADS", "0"), ("BITKERN_NUM_THREADS", "-2"), ("BITKERN_NUM_THREADS", "257"),
    ("BITKERN_NUM_THREADS", "100000000000"), ("BITKERN_NUM_THREADS", "four"),
    ("BITKERN_NUM_THREADS", "2.5"), ("BITKERN_NUM_THREADS", "4_0"), ("BITKERN_NUM_THREADS", "+4"),
    ("BITKERN_OUTPUT_POOL_MB", "abc"), ("BITKERN_OUTPUT_POOL_MB", "-1"),
    ("BITKERN_OUTPUT_POOL_MB", "1.5"), ("BITKERN_OUTPUT_POOL_MB", "nan"),
    ("BITKERN_OUTPUT_POOL_MB", "1048577"), ("BITKERN_OUTPUT_POOL_MB", "1e3"),
]
BAD_OTHER = [("BITKERN_DEBUG", "yes"), ("BITKERN_DEBUG", "true"), ("BITKERN_PROGRESS", "off"),
             ("BITKERN_KILL_AFTER_EPOCH", "0"), ("BITKERN_KILL_AFTER_EPOCH", "x")]
GOOD = [
    ("BITKERN_BACKEND", "torch"), ("BITKERN_BACKEND", "cpp"), ("BITKERN_BACKEND", ""),
    ("BITKERN_ISA", "scalar"), ("BITKERN_ISA", " Scalar "), ("BITKERN_ISA", ""),
    ("BITKERN_NUM_THREADS", "1"), ("BITKERN_NUM_THREADS", "256"), ("BITKERN_NUM_THREADS", " 2 "),
    ("BITKERN_OUTPUT_POOL_MB", "0"), ("BITKERN_OUTPUT_POOL_MB", "512"),
    ("BITKERN_OUTPUT_POOL_MB", "1048576"),
    ("BITKERN_DEBUG", "1"), ("BITKERN_PROGRESS", "0"), ("BITKERN_KILL_AFTER_EPOCH", "3"),
]


@pytest.fixture
def clean_env(monkeypatch):
    for name in KERNEL_VARS:
        monkeypatch.delenv(name, raising=False)
    dispatch.set_backend(None)
    yield monkeypatch
    monkeypatch.undo()
    dispatch._env_ok_key = None


def _assert_one_line(exc, name, value):
    text = str(exc.value)
    assert "\n" not in text
    assert text.startswith(f"{name}={value!r}: expected "), text


class TestCheckEnvironment:
    @pytest.mark.parametrize("name,value", BAD + BAD_OTHER)
    def test_bad_value_is_one_line(self, clean_env, name, value):
        clean_env.setenv(name, value)
        with pytest.raises(ValueError) as exc:
            dispatch.check_environment()
        _assert_one_line(exc, name, value)

    @pytest.mark.parametrize("name,value", GOOD)
    def test_good_value_passes(self, clean_env, name, value):
        clean_env.setenv(name, value)
        assert dispatch.check_environment() is None

    @pytest.mark.parametrize("name,value", BAD)
    def test_ops_raise_the_same_line(self, clean_env, name, value):
        clean_env.setenv(name, value)
        x = torch.randn(1, 3, 4, 4)
        with pytest.raises(ValueError) as exc:
            ops.binary_conv2d(x, torch.randn(2, 3, 3, 3))
        _assert_one_line(exc, name, value)
        status = bitkern.backends_status()
        assert all(not ok and reason.startswith(f"environment: {name}=") for ok, reason in status.values())

    @pytest.mark.parametrize("name,value", BAD_OTHER)
    def test_other_variables_do_not_stop_ops(self, clean_env, name, value):
        clean_env.setenv(name, value)
        assert ops.pack_signs(torch.randn(1, 3, 2, 2)).shape == (1, 2, 2, 1)

    def test_unsupported_isa_is_an_environment_error(self, clean_env):
        cpp = dispatch.get("cpp")
        if not cpp.available:
            pytest.skip(cpp.reason)
        missing = [isa for isa in ("avx512", "avx2") if isa not in cpp.isa_supported()]
        if not missing:
            pytest.skip("this CPU supports every ISA")
        clean_env.setenv("BITKERN_ISA", missing[0])
        with pytest.raises(ValueError) as exc:
            dispatch.check_environment()
        _assert_one_line(exc, "BITKERN_ISA", missing[0])

    def test_fixed_value_recovers(self, clean_env):
        clean_env.setenv("BITKERN_NUM_THREADS", "0")
        with pytest.raises(ValueError):
            ops.pack_signs(torch.randn(1, 3, 2, 2))
        clean_env.setenv("BITKERN_NUM_THREADS", "2")
        assert ops.pack_signs(torch.randn(1, 3, 2, 2)).shape == (1, 2, 2, 1)
        assert all(ok for name, (ok, _) in bitkern.backends_status().items() if name in ("torch", "cpp")
                   and dispatch.get(name).available)


SCRIPT = """
import torch, bitkern
print(bitkern.backend_report())
print(bitkern.ops.pack_signs(torch.randn(1, 3, 2, 2)).shape)
print(bitkern.dispatch.backend_for("cpu").name)
"""


def _run(env_updates):
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARS}
    env.update(env_updates)
    return subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("name,value", [("BITKERN_OUTPUT_POOL_MB", "abc"), ("BITKERN_NUM_THREADS", "99999"),
                                        ("BITKERN_ISA", "sse9"), ("BITKERN_BACKEND", "gpu")])
def test_bad_value_at_import_fails_the_first_op(name, value):
    proc = _run({name: value})
    assert proc.returncode != 0
    assert f"environment: {name}={value!r}" in proc.stdout  # the backend report shows it
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ValueError: {name}={value!r}: expected "), proc.stderr[-1000:]
    assert "pure-torch" not in proc.stderr  # no silent fallback warning


def test_good_values_at_import_work():
    proc = _run({"BITKERN_OUTPUT_POOL_MB": "64", "BITKERN_NUM_THREADS": "2", "BITKERN_ISA": "scalar"})
    assert proc.returncode == 0, proc.stderr[-1000:]
    expected = "cpp" if dispatch.get("cpp").available else "torch"
    assert proc.stdout.strip().splitlines()[-1] == expected


def test_check_environment_import_path_has_no_side_effects():
    """A bad variable never breaks the import (backends register themselves without raising)."""
    code = ("import os, sys; os.environ['BITKERN_NUM_THREADS'] = '0'\n"
            "from bitkern.dispatch import check_environment\n"
            "try:\n    check_environment()\nexcept ValueError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARS}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert proc.stdout.strip() == "BITKERN_NUM_THREADS='0': expected a thread count, an integer in 1..256"
