// Entry points of the CPU engine (called by the pybind11 module; raw pointers, GIL released).
#pragma once
#include <cstdint>
#include <string>

namespace bk {

// x float32 [B, C, H, W] (NCHW-contiguous or channels_last-contiguous) -> out int64 [B, H, W, Kw].
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

}  // namespace bk
