"""Build the CPU extension bitkern._C (pybind11, no torch headers).

The CUDA extension is opt-in: BITKERN_BUILD_CUDA=1 pip install -e . --no-build-isolation
(it needs a CUDA build of torch in the build environment, hence no isolation).
"""
import glob
import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# csrc/cpu: the pybind11 module, then one folder per layer (common: plan, selection, driver; scalar /
# avx2 / avx512: the ISA kernels). csrc/cpu/reference and csrc/cpu/tests are test-only (not built here).
CPU_DIRS = ("common", "scalar", "avx2", "avx512")
cpu_sources = ["csrc/cpu/module.cpp"] + [src for d in CPU_DIRS for src in sorted(glob.glob(f"csrc/cpu/{d}/*.cpp"))]
ext_modules = [
    Pybind11Extension(
        "bitkern._C",
        cpu_sources,
        include_dirs=["csrc"],
        cxx_std=17,
        # ISA-specific kernels use function-level target attributes, so the baseline stays x86-64
        # and runtime dispatch picks AVX-512 / AVX2 / scalar.
        # -ffp-contract=off: no fused multiply-adds, so the float epilogue rounds exactly like the
        # pure-torch backend (bit-identical outputs across backends).
        extra_compile_args=["-O3", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall",
                            "-Wno-unknown-pragmas"],
        extra_link_args=["-pthread"],
    )
]

if os.environ.get("BITKERN_BUILD_CUDA") == "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:  # pragma: no cover - only with BITKERN_BUILD_CUDA=1
        sys.exit(f"BITKERN_BUILD_CUDA=1 needs torch with CUDA in the build env ({exc}); "
                 "use pip install -e . --no-build-isolation")
    ext_modules.append(
        CUDAExtension(
            "bitkern._C_cuda",
            sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp")),
            include_dirs=[os.path.abspath("csrc/cuda")],
            # Kernels round the epilogue explicitly (__fmul_rn / __fadd_rn), so fast math cannot change
            # results; set TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") to pick the architectures.
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
        )
    )
    build_ext = BuildExtension  # noqa: F811

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
