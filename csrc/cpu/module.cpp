// pybind11 module bitkern._C: raw-pointer entry points; the Python side (bitkern/backends/cpp.py)
// validates dtype/shape/contiguity/device. All work runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/common/isa.h"
#include "cpu/common/buffer_pool.h"
#include "cpu/common/chain.h"
#include "cpu/common/engine.h"

namespace py = pybind11;

namespace {
template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// The DLPack ABI (dlpack.h v0.8, legacy unversioned capsule "dltensor"), just what a 1-d CPU tensor needs.
struct DLDevice { int32_t device_type; int32_t device_id; };  // device_type 1: kDLCPU
struct DLDataType { uint8_t code; uint8_t bits; uint16_t lanes; };  // code 0 int, 1 uint, 2 float
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

struct PooledTensor {
  DLManagedTensor managed;
  int64_t numel;
  size_t bytes;
};

void delete_pooled(DLManagedTensor* self) {
  auto* t = reinterpret_cast<PooledTensor*>(self->manager_ctx);
  bk::pool_release(t->managed.dl_tensor.data, t->bytes);
  delete t;
}

// A DLPack capsule over a pooled block of numel elements (code/bits: DLPack dtype). The consumer
// (torch.from_dlpack) renames it "used_dltensor" and calls the deleter when its storage dies; an
// unconsumed capsule gives the block back itself.
py::object pooled_capsule(int64_t numel, int code, int bits) {
  if (numel < 0 || code < 0 || code > 2 || (bits != 8 && bits != 16 && bits != 32 && bits != 64))
    throw std::invalid_argument("pooled_empty: expected numel >= 0, code 0/1/2 and bits 8/16/32/64, got " +
                                std::to_string(numel) + ", " + std::to_string(code) + ", " +
                                std::to_string(bits));
  auto* t = new PooledTensor();
  t->numel = numel;
  t->bytes = static_cast<size_t>(numel) * static_cast<size_t>(bits / 8);
  try {
    t->managed.dl_tensor.data = bk::pool_acquire(t->bytes);
  } catch (...) {
    delete t;
    throw;
  }
  t->managed.dl_tensor.device = {1, 0};
  t->managed.dl_tensor.ndim = 1;
  t->managed.dl_tensor.dtype = {static_cast<uint8_t>(code), static_cast<uint8_t>(bits), 1};
  t->managed.dl_tensor.shape = &t->numel;
  t->managed.dl_tensor.strides = nullptr;  // compact
  t->managed.dl_tensor.byte_offset = 0;
  t->managed.manager_ctx = t;
  t->managed.deleter = delete_pooled;
  PyObject* cap = PyCapsule_New(&t->managed, "dltensor", [](PyObject* c) {
    if (PyCapsule_IsValid(c, "dltensor")) {  // never consumed
      auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
      m->deleter(m);
    }
  });
  if (!cap) {
    delete_pooled(&t->managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(cap);
}
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
      "ste_grad_x",
      [](uintptr_t x, uintptr_t g, uintptr_t v, uintptr_t beta, int num_act, uintptr_t dst, int64_t n,
         const std::string& isa, int threads) {
        py::gil_scoped_release nogil;
        bk::SteGradArgs a{ptr<const float>(x), ptr<const float>(g), ptr<const float>(v),
                          ptr<const float>(beta), num_act, ptr<float>(dst)};
        bk::run_ste_grad_x(a, n, isa, threads);
      },
      py::arg("x_ptr"), py::arg("g_ptr"), py::arg("v_ptr"), py::arg("beta_ptr"), py::arg("num_act"),
      py::arg("dst_ptr"), py::arg("n"), py::arg("isa"), py::arg("threads"),
      "STE input gradient: dst = sum_n beta_n * window_n(x) * g (v_ptr 0: sign mode, |x| <= 1)");
  m.def(
      "clamp_grad",
      [](uintptr_t g, uintptr_t out, float lo, float hi, uintptr_t dst, int64_t n, const std::string& isa,
         int threads) {
        py::gil_scoped_release nogil;
        bk::run_clamp_grad(ptr<const float>(g), ptr<const float>(out), lo, hi, ptr<float>(dst), n, isa,
                           threads);
      },
      py::arg("g_ptr"), py::arg("out_ptr"), py::arg("lo"), py::arg("hi"), py::arg("dst_ptr"), py::arg("n"),
      py::arg("isa"), py::arg("threads"),
      "Clamp backward: dst = g where lo < out < hi, else +0");
  m.def(
      "interval_bits",
      [](uintptr_t src, uintptr_t shift, int num_masks, float lo, float hi, bool open, uintptr_t dst,
         int64_t words, int64_t n, const std::string& isa, int threads) {
        py::gil_scoped_release nogil;
        bk::IntervalBitsArgs a{ptr<const float>(src), ptr<const float>(shift), num_masks, lo, hi, open,
                               ptr<uint64_t>(dst), words};
        bk::run_interval_bits(a, n, isa, threads);
      },
      py::arg("src_ptr"), py::arg("shift_ptr"), py::arg("num_masks"), py::arg("lo"), py::arg("hi"),
      py::arg("open"), py::arg("dst_ptr"), py::arg("words"), py::arg("n"), py::arg("isa"), py::arg("threads"),
      "Window bits: mask k bit i = lo <= src[i] + shift[k] <= hi (open: strict); shift_ptr 0: src[i]");
  m.def(
      "masked_grad",
      [](uintptr_t bits, int64_t words, int num_masks, uintptr_t g, uintptr_t scale, uintptr_t dst, int64_t n,
         const std::string& isa, int threads) {
        py::gil_scoped_release nogil;
        bk::MaskedGradArgs a{ptr<const uint64_t>(bits), words, num_masks, ptr<const float>(g),
                             ptr<const float>(scale), ptr<float>(dst)};
        bk::run_masked_grad(a, n, isa, threads);
      },
      py::arg("bits_ptr"), py::arg("words"), py::arg("num_masks"), py::arg("g_ptr"), py::arg("scale_ptr"),
      py::arg("dst_ptr"), py::arg("n"), py::arg("isa"), py::arg("threads"),
      "dst = sum_k (bit_k ? g * scale[k] : +0) left to right (scale_ptr 0: g); dst may be g");
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
         uintptr_t residual, float clamp_lo, float clamp_hi, uintptr_t out, uintptr_t pairs,
         const std::string& isa, int threads) {
        py::gil_scoped_release nogil;
        return bk::run_mbn_conv2d(ptr<const float>(x), B, C, H, W, channels_last, ptr<const uint64_t>(w), M,
                           Co, KH, KW, mode, ptr<const float>(v), N, sh, sw, ph, pw,
                           ptr<const float>(alpha), ptr<const float>(beta), ptr<const float>(bias),
                           ptr<const float>(residual), clamp_lo, clamp_hi, ptr<float>(out),
                           ptr<int32_t>(pairs), isa, threads);
      },
      py::arg("x_ptr"), py::arg("B"), py::arg("C"), py::arg("H"), py::arg("W"),
      py::arg("channels_last"), py::arg("w_ptr"), py::arg("M"), py::arg("Co"), py::arg("KH"),
      py::arg("KW"), py::arg("mode"), py::arg("v_ptr"), py::arg("N"), py::arg("sh"), py::arg("sw"),
      py::arg("ph"), py::arg("pw"), py::arg("alpha_ptr"), py::arg("beta_ptr"), py::arg("bias_ptr"),
      py::arg("residual_ptr"), py::arg("clamp_lo"), py::arg("clamp_hi"), py::arg("out_ptr"),
      py::arg("pairs_ptr"), py::arg("isa"), py::arg("threads"),
      "multi-base binary conv: out float32 [B,OH,OW,Co] (may be 0) = clamp((sum + bias) + residual, "
      "lo, hi) (bias_ptr / residual_ptr [B,OH,OW,Co] may be 0, clamp bounds +-inf for none) and/or "
      "pairs int32 [M,N,B,OH,OW,Co] (may be 0); returns flags: 1 when x holds a NaN (then out / pairs "
      "hold no result), 2 when residual holds a NaN or +-inf; see docs/cpu_kernels.md");
  py::class_<bk::Chain>(m, "Chain",
                        "a chain of packed convs prepared once and run in one call, activations handed "
                        "between them as bit planes (csrc/cpu/common/chain.h)")
      .def(py::init<const std::string&, std::vector<std::vector<int64_t>>>(), py::arg("isa"),
           py::arg("buffers"), "buffers: (H, W, C) per float buffer; 0 the input, the last the output")
      .def(
          "add_conv",
          [](bk::Chain& chain, int64_t src, int64_t dst, int64_t residual, int64_t res_stride,
             int64_t res_offset, uintptr_t w, int64_t C, int64_t M, int64_t Co, int64_t KH, int64_t KW,
             int64_t sh, int64_t sw, int64_t ph, int64_t pw, int mode, std::vector<float> v,
             std::vector<float> alpha, std::vector<float> beta, std::vector<float> bias, float clamp_lo,
             float clamp_hi) {
            bk::ChainConvSpec s;
            s.src = src, s.dst = dst, s.residual = residual, s.res_stride = res_stride;
            s.res_offset = res_offset, s.w = ptr<const uint64_t>(w), s.C = C, s.M = M, s.Co = Co;
            s.KH = KH, s.KW = KW, s.sh = sh, s.sw = sw;
            s.ph = ph, s.pw = pw, s.mode = mode, s.v = std::move(v), s.alpha = std::move(alpha);
            s.beta = std::move(beta), s.bias = std::move(bias), s.clamp_lo = clamp_lo, s.clamp_hi = clamp_hi;
            chain.add_conv(s);
          },
          py::arg("src"), py::arg("dst"), py::arg("residual"), py::arg("res_stride"), py::arg("res_offset"),
          py::arg("w_ptr"), py::arg("C"), py::arg("M"), py::arg("Co"), py::arg("KH"), py::arg("KW"),
          py::arg("sh"),
          py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("mode"), py::arg("v"), py::arg("alpha"),
          py::arg("beta"), py::arg("bias"), py::arg("clamp_lo"), py::arg("clamp_hi"),
          "append a conv reading buffer src (residual: buffer id or -1, read as buf[oh*s, ow*s, co - "
          "offset]) and writing buffer dst; the weights are copied")
      .def(
          "run",
          [](bk::Chain& chain, uintptr_t x, bool x_channels_last, uintptr_t out, int64_t B, int threads) {
            py::gil_scoped_release nogil;
            return chain.run(ptr<const float>(x), x_channels_last, ptr<float>(out), B, threads);
          },
          py::arg("x_ptr"), py::arg("x_channels_last"), py::arg("out_ptr"), py::arg("B"), py::arg("threads"),
          "x float32 [B, C, H, W] (NCHW or channels_last physical) -> out [B, H, W, C] float32; returns "
          "flags as mbn_conv2d")
      .def("engines", &bk::Chain::engines);
  m.def("conv_engine", &bk::conv_engine, py::arg("isa"), py::arg("C"), py::arg("KH"), py::arg("KW"),
        py::arg("sw"), "which engine runs such a conv: 'lane16', 'lane32' or 'word'");
  m.def("pooled_empty", &pooled_capsule, py::arg("numel"), py::arg("code"), py::arg("bits"),
        "DLPack capsule over an uninitialized 1-d CPU buffer from the output pool (code: DLPack type "
        "code, 0 int / 2 float; bits: 32 or 64); torch.from_dlpack takes it");
  m.def("pool_clear", &bk::pool_clear, "free every cached output block");
  m.def("pool_set_limit", &bk::pool_set_limit, py::arg("bytes"), "cap on cached free bytes (0: none)");
  m.def("pool_limit", &bk::pool_limit);
  m.def("pool_cached_bytes", &bk::pool_cached_bytes, "bytes held in cached free blocks");
}
