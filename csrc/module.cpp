// pybind11 module bitkern._C: raw-pointer entry points; the Python side (bitkern/backends/cpp.py)
// validates dtype/shape/contiguity/device. All work runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bk_common.h"
#include "engine.h"

namespace py = pybind11;

namespace {
template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bitkern CPU engine: packed XNOR-popcount convolutions (AVX-512 / AVX2 / scalar)";
  m.def("isa_supported", &bk::isa_supported,
        "ISA paths usable on this CPU/OS, best first: subset of ['avx512', 'avx2', 'scalar']");
  m.def(
      "has_nan",
      [](uintptr_t x, int64_t n, const std::string& isa, int threads) {
        py::gil_scoped_release nogil;
        return bk::run_has_nan(ptr<const float>(x), n, isa, threads);
      },
      py::arg("x_ptr"), py::arg("n"), py::arg("isa"), py::arg("threads"),
      "True when the float32 buffer holds a NaN");
  m.def(
      "pack_signs",
      [](uintptr_t x, int64_t B, int64_t C, int64_t H, int64_t W, bool channels_last, int mode,
         float v, uintptr_t out, const std::string& isa, int threads) {
        py::gil_scoped_release nogil;
        return bk::run_pack_signs(ptr<const float>(x), B, C, H, W, channels_last, mode, v,
                           ptr<uint64_t>(out), isa, threads);
      },
      py::arg("x_ptr"), py::arg("B"), py::arg("C"), py::arg("H"), py::arg("W"),
      py::arg("channels_last"), py::arg("mode"), py::arg("v"), py::arg("out_ptr"), py::arg("isa"),
      py::arg("threads"),
      "float32 [B,C,H,W] (NCHW or channels_last physical) -> int64 [B,H,W,ceil(C/64)]; "
      "mode 0: bit = x >= 0, mode 1: bit = fl32(x + v) >= 0.5; returns True when x holds a NaN "
      "(out is still written)");
  m.def(
      "mbn_conv2d",
      [](uintptr_t x, int64_t B, int64_t C, int64_t H, int64_t W, bool channels_last, uintptr_t w,
         int64_t M, int64_t Co, int64_t KH, int64_t KW, int mode, uintptr_t v, int64_t N, int64_t sh,
         int64_t sw, int64_t ph, int64_t pw, uintptr_t alpha, uintptr_t beta, uintptr_t bias,
         uintptr_t residual,         float clamp_lo, float clamp_hi, uintptr_t out, uintptr_t pairs, const std::string& isa,
         int threads) {
        py::gil_scoped_release nogil;
        return bk::run_mbn_conv2d(ptr<const float>(x), B, C, H, W, channels_last, ptr<const uint64_t>(w), M,
                           Co, KH, KW, mode, ptr<const float>(v), N, sh, sw, ph, pw,
                           ptr<const float>(alpha), ptr<const float>(beta), ptr<const float>(bias),
                           ptr<const float>(residual),                           clamp_lo, clamp_hi, ptr<float>(out),
                           ptr<int32_t>(pairs), isa, threads);
      },
      py::arg("x_ptr"), py::arg("B"), py::arg("C"), py::arg("H"), py::arg("W"),
      py::arg("channels_last"), py::arg("w_ptr"), py::arg("M"), py::arg("Co"), py::arg("KH"),
      py::arg("KW"), py::arg("mode"), py::arg("v_ptr"), py::arg("N"), py::arg("sh"), py::arg("sw"),
      py::arg("ph"), py::arg("pw"), py::arg("alpha_ptr"), py::arg("beta_ptr"), py::arg("bias_ptr"), py::arg("residual_ptr"),
      py::arg("clamp_lo"), py::arg("clamp_hi"), py::arg("out_ptr"),
      py::arg("pairs_ptr"), py::arg("isa"), py::arg("threads"),
      "multi-base binary conv: out float32 [B,OH,OW,Co] (may be 0) = clamp((sum + bias) + residual, "
      "lo, hi) (bias_ptr / residual_ptr [B,OH,OW,Co] may be 0, clamp bounds +-inf for none) and/or pairs int32 [M,N,B,OH,OW,Co] (may "
      "be 0); returns True when x holds a NaN (then out / pairs hold no result); see "
      "docs/cpu_kernels.md");
}
