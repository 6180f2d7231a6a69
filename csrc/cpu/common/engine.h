// Entry points of the CPU engine (called by the pybind11 module ../module.cpp; raw pointers, GIL
// released), plus the internal conv entry the C++ tests use to force a kernel.
#pragma once
#include <cstdint>
#include <string>

namespace bk {

struct KernelChoice;

// x float32 [B, C, H, W] (NCHW-contiguous or channels_last-contiguous) -> out int64 [B, H, W, ceil(C / 64)].
// Returns true when x holds a NaN (found while packing; out is still fully written).
bool run_pack_signs(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, bool channels_last,
                    int mode, float v, uint64_t* out, const std::string& isa, int threads);

// Multi-base binary conv; see docs/cpu_kernels.md for the layouts. out / pairs may be null.
// bias ([Co] or null), residual ([B, OH, OW, Co] channels_last or null) and [clamp_lo, clamp_hi]
// (+-inf: none) are fused into out's epilogue: clamp((sum + bias) + residual).
// Returns a bit set of ConvFlags: kXHasNan when x holds a NaN (found while packing activation base 0;
// then out / pairs hold no result), kResidualNonFinite when residual holds a NaN or +-inf (found by the
// epilogue as it reads it; out holds the IEEE result). Returns 0 without reading x when the output is
// empty.
enum ConvFlags { kXHasNan = 1, kResidualNonFinite = 2 };
int run_mbn_conv2d(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, bool channels_last,
                    const uint64_t* w, int64_t M, int64_t Co, int64_t KH, int64_t KW, int mode,
                    const float* v, int64_t N, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                    const float* alpha, const float* beta, const float* bias, const float* residual,
                    float clamp_lo, float clamp_hi, float* out, int32_t* pairs, const std::string& isa,
                    int threads);

// The engine a conv with these parameters runs on: "lane16", "lane32" (small-channel engines, AVX-512)
// or "word" (see docs/cpu_kernels.md).
std::string conv_engine(const std::string& isa, int64_t C, int64_t KH, int64_t KW, int64_t sw);

// True when the float32 buffer x[0..n) holds a NaN (one vectorized, multi-threaded pass).
bool run_has_nan(const float* x, int64_t n, const std::string& isa, int threads);

// The STE input gradient (issue 16; bitkern/ops/autograd.py documents the float arithmetic):
//   dst[i] = t_0 + t_1 + ... + t_{N-1} (left to right), t_k = fl32(g[i] * beta[k]) where the window of
//   base k holds for x[i], else +0; window: 0 <= fl32(x[i] + v[k]) <= 1 (v given), |x[i]| <= 1 (v null,
//   N = 1). x, g, dst: n floats in one layout (any: the pass is elementwise).
struct SteGradArgs {
  const float* x;
  const float* g;
  const float* v;     // [N] or nullptr (sign mode)
  const float* beta;  // [N]
  int num_act;        // N
  float* dst;
};
void run_ste_grad_x(const SteGradArgs& a, int64_t n, const std::string& isa, int threads);
// dst[i] = g[i] where lo < out[i] < hi (strict), else +0 (the fused clamp's backward).
void run_clamp_grad(const float* g, const float* out, float lo, float hi, float* dst, int64_t n,
                    const std::string& isa, int threads);

// Window bits saved by the forward when only the input gradient will be needed (issue 16): bit i of mask
// k (uint64 words: mask k at dst + k * words, words = ceil(n / 64), bit i % 64 of word i / 64) is
//   lo <= s <= hi (closed) or lo < s < hi (open), s = fl32(src[i] + shift[k]) (shift null: src[i], K = 1).
// The STE windows: [-1, 1] closed on x (sign mode), [0, 1] closed on x + v_k (H_v mode); the fused
// clamp's mask: (lo, hi) open on out. Every byte up to ceil(n / 8) is written.
struct IntervalBitsArgs {
  const float* src;
  const float* shift;  // [K] or nullptr
  int num_masks;       // K
  float lo, hi;
  bool open;
  uint64_t* dst;
  int64_t words;       // per mask
};
void run_interval_bits(const IntervalBitsArgs& a, int64_t n, const std::string& isa, int threads);
// The backward side: dst[i] = t_0 + ... + t_{K-1} (left to right), t_k = fl32(g[i] * scale[k]) (scale
// null: g[i]) where bit i of mask k is set, else +0 -- run_ste_grad_x's and run_clamp_grad's arithmetic
// with the windows read from bits. dst may be g.
struct MaskedGradArgs {
  const uint64_t* bits;
  int64_t words;       // per mask
  int num_masks;       // K
  const float* g;
  const float* scale;  // [K] or nullptr
  float* dst;
};
void run_masked_grad(const MaskedGradArgs& a, int64_t n, const std::string& isa, int threads);

// The arguments of run_mbn_conv2d as one struct (same meaning; mode 0 forces N = 1).
struct ConvArgs {
  const float* x;
  int64_t B, C, H, W;
  bool channels_last;
  const uint64_t* w;  // [M, Co, KH, KW, ceil(C / 64)]
  int64_t M, Co, KH, KW;
  int mode;
  const float* v;  // [N]
  int64_t N, sh, sw, ph, pw;
  const float *alpha, *beta, *bias, *residual;
  float clamp_lo, clamp_hi;
  float* out;
  int32_t* pairs;
};

// run_mbn_conv2d on a given kernel (select_kernel's choice, or any choice kernel_supported accepts:
// the tests force each one). Throws std::invalid_argument for bad arguments or an unsupported choice.
int run_conv(const ConvArgs& args, const KernelChoice& kernel, int threads);

}  // namespace bk
