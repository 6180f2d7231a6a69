"""C++-level tests of the CPU engine (csrc/cpu/tests/engine_test.cpp), torch-free.

The test program is compiled with g++ and the flags of setup.py (-O3 -ffp-contract=off ...) from the
engine's sources (csrc/cpu/{common,scalar,avx2,avx512}) plus the scalar reference
(csrc/cpu/reference). It runs every kernel this CPU supports, forced (each ISA path x word engine
folded / unfolded x lane 32 x lane 16; 1 and 2 threads), on random shapes against the reference: pair
counts equal, float outputs bit-equal (up to the sign of a zero); plus unit checks of select_kernel,
the plan, the scratch layout, the padding correction and the NaN / residual flags.
"""
import concurrent.futures
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CPU_DIRS = ("common", "scalar", "avx2", "avx512", "reference")
# The compile flags of setup.py's bitkern._C extension (checked against setup.py below).
SETUP_FLAGS = ["-O3", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas"]


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++")


def test_flags_match_setup_py():
    text = (ROOT / "setup.py").read_text()
    match = re.search(r"extra_compile_args=\[(.*?)\]", text, re.S)
    assert match, "setup.py: extra_compile_args not found"
    assert re.findall(r'"([^"]+)"', match.group(1)) == SETUP_FLAGS


@pytest.fixture(scope="module")
def engine_test(tmp_path_factory):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("g++ is not installed (needed to build csrc/cpu/tests/engine_test.cpp)")
    out = tmp_path_factory.mktemp("engine_test")
    sources = [p for d in CPU_DIRS for p in sorted((CSRC / "cpu" / d).glob("*.cpp"))]
    sources.append(CSRC / "cpu" / "tests" / "engine_test.cpp")
    base = [cxx, "-std=c++17", *SETUP_FLAGS, f"-I{CSRC}"]

    def compile_one(src):
        obj = out / (src.parent.name + "_" + src.stem + ".o")
        proc = subprocess.run(base + ["-c", str(src), "-o", str(obj)], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{src}:\n{proc.stderr[-4000:]}"
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(compile_one, sources))
    exe = out / "engine_test"
    link = subprocess.run([cxx, *map(str, objects), "-pthread", "-o", str(exe)], capture_output=True,
                          text=True, timeout=300)
    assert link.returncode == 0, link.stderr[-4000:]
    return exe


@pytest.mark.parametrize("seed", [12345, 2024])
def test_every_kernel_matches_the_scalar_reference(engine_test, seed):
    run = subprocess.run([str(engine_test), "1500", str(seed)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " 0 failures" in run.stdout, run.stdout[-6000:]
    runs = re.search(r"word (\d+), lane32 (\d+), lane16 (\d+)", run.stdout)
    assert runs and int(runs.group(1)) > 0, run.stdout
    if "avx512" in run.stdout.splitlines()[0]:  # the lane engines ran too
        assert int(runs.group(2)) > 0, run.stdout
        if "bitalg 1" in run.stdout.splitlines()[0]:
            assert int(runs.group(3)) > 0, run.stdout
