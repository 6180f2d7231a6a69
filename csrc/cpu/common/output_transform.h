// The output transform (epilogue) of the binary conv, in the spirit of larq compute-engine
// core/bconv2d/output_transform.h. The float order is a contract (docs/architecture.md):
//
//   out[pix, co] = sum over n (outer) of sum over m (inner) of fl32(alpha[m, co] * beta[n]) * dot_mn
//                  (each product and each sum rounded to float32; the first term is stored or added to
//                   0.0), then + bias[co], then + residual[pix, co], then clamp to [clamp_lo, clamp_hi].
//
// The scale table (fl32(alpha * beta) per base n and GEMM column) is built once per call
// (make_scale_table); the kernels add scale * dot as they finish each (n, m) pair and apply
// epilogue_value (scalar) or its AVX-512 twin (avx512/epilogue_avx512.h) on the last one.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/common/conv_params.h"

namespace bk {

// scale[n * cols + m * co_padded + co] = fl32(alpha[m * Co + co] * beta[n]); padded columns 0.
inline std::vector<float> make_scale_table(const ConvGeometry& g, const GemmShape& gemm, const float* alpha,
                                           const float* beta) {
  std::vector<float> scale(g.N * gemm.cols, 0.0f);
  if (alpha && beta)
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t m = 0; m < g.M; ++m)
        for (int64_t co = 0; co < g.Co; ++co)
          scale[n * gemm.cols + m * gemm.co_padded + co] = alpha[m * g.Co + co] * beta[n];
  return scale;
}

// True when the call needs the fused bias / residual / clamp step.
inline bool epilogue_is_fused(const float* out, const float* bias, const float* residual, float clamp_lo,
                              float clamp_hi) {
  return out && (bias || residual || clamp_lo > -INFINITY || clamp_hi < INFINITY);
}

// The fused epilogue for one finished output element y of pixel pix, channel co (epi.fused is true).
inline float epilogue_value(const EpilogueParams& e, int64_t Co, float y, int64_t pix, int64_t co) {
  if (e.bias) y += e.bias[co];
  if (e.residual) {
    const float r = e.residual[pix * Co + co];
    if (!std::isfinite(r)) e.residual_bad->store(true, std::memory_order_relaxed);
    y += r;
  }
  return std::min(std::max(y, e.clamp_lo), e.clamp_hi);  // keeps a NaN y (std::max / min return arg 1)
}

}  // namespace bk
