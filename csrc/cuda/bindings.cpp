// Python binding of the CUDA launchers (module bitkern._C_cuda). Pointers arrive as integers
// (tensor.data_ptr()) and the stream as torch.cuda.current_stream().cuda_stream, so this file needs
// pybind11 and bk_cuda.h only: bitkern/backends/cuda.py validates shapes, dtypes and devices first.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bk_cuda.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check(int code, const char* what) {
  if (code != 0) throw std::runtime_error(std::string(what) + " failed: " + bk_cuda_error_string(code));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "bitkern CUDA kernels on raw device pointers (see csrc/cuda/bk_cuda.h)";
  m.attr("MODE_SIGN") = BK_MODE_SIGN;
  m.attr("MODE_HV") = BK_MODE_HV;

  m.def("device_count", []() {
    int count = 0;
    const int code = bk_cuda_device_count(&count);
    return py::make_tuple(count, code == 0 ? std::string() : std::string(bk_cuda_error_string(code)));
  }, "(number of CUDA devices, error text or '')");

  m.def("pack_signs", [](std::uintptr_t x, std::uintptr_t out, int mode, std::uintptr_t v, int n_shifts, int B, int C,
                         int H, int W, int pad_h, int pad_w, std::uintptr_t stream) {
    check(bk_cuda_pack_signs(ptr<const float>(x), ptr<int64_t>(out), mode, ptr<const float>(v), n_shifts, B, C, H, W,
                             pad_h, pad_w, ptr<void>(stream)),
          "bk_cuda_pack_signs");
  }, py::arg("x"), py::arg("out"), py::arg("mode"), py::arg("v"), py::arg("n_shifts"), py::arg("B"), py::arg("C"),
     py::arg("H"), py::arg("W"), py::arg("pad_h"), py::arg("pad_w"), py::arg("stream"));

  m.def("tap_table", [](std::uintptr_t w, std::uintptr_t table, int rows, int taps, int kw_words, int channels,
                        std::uintptr_t stream) {
    check(bk_cuda_tap_table(ptr<const int64_t>(w), ptr<int32_t>(table), rows, taps, kw_words, channels,
                            ptr<void>(stream)),
          "bk_cuda_tap_table");
  }, py::arg("w"), py::arg("table"), py::arg("rows"), py::arg("taps"), py::arg("kw_words"), py::arg("channels"),
     py::arg("stream"));

  m.def("mbn_conv", [](std::uintptr_t xpad, std::uintptr_t w, std::uintptr_t table, std::uintptr_t alpha,
                       std::uintptr_t beta, std::uintptr_t out, std::uintptr_t pairs, int M, int N, int B, int C, int H,
                       int W, int Co, int KH, int KW, int SH, int SW, int PH, int PW, std::uintptr_t stream) {
    check(bk_cuda_mbn_conv(ptr<const int64_t>(xpad), ptr<const int64_t>(w), ptr<const int32_t>(table),
                           ptr<const float>(alpha), ptr<const float>(beta), ptr<float>(out), ptr<int32_t>(pairs), M, N,
                           B, C, H, W, Co, KH, KW, SH, SW, PH, PW, ptr<void>(stream)),
          "bk_cuda_mbn_conv");
  }, py::arg("xpad"), py::arg("w"), py::arg("table"), py::arg("alpha"), py::arg("beta"), py::arg("out"),
     py::arg("pairs"), py::arg("M"), py::arg("N"), py::arg("B"), py::arg("C"), py::arg("H"), py::arg("W"),
     py::arg("Co"), py::arg("KH"), py::arg("KW"), py::arg("SH"), py::arg("SW"), py::arg("PH"), py::arg("PW"),
     py::arg("stream"));
}
