// AVX-512 output transform shared by the word engine (conv_avx512.cpp) and the lane engines
// (conv_lane_avx512.h), the vector twin of common/output_transform.h: padding correction, exact
// per-pair values, alpha*beta scaling, channels_last accumulation and the fused bias / residual / clamp, for 8 or 16 columns of one pixel in registers.
// Include only from translation units compiled for x86 (the functions carry the AVX-512 target).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <atomic>

#include "cpu/common/conv_params.h"
#include "cpu/common/isa.h"

namespace bk {

// Epilogue of one segment: 8 or 16 consecutive columns of one weight base m for one pixel, as int32
// popcounts (the word engine narrows one or two zmm of 64-bit counts; the small-channel engine's counts
// are 32-bit lanes, or 16-bit lanes split per pixel). mask: the columns < Co.
struct Segment {
  int64_t col, co, m;
  __mmask16 mask;
  bool wide;         // 16 columns
  bool first, last;  // first / last contribution to out (n == 0, m == 0 / epilogue, n == N-1, m == M-1)
  int32_t* pairs;    // pairs + ((m * N + n) * P) * Co + co, or null
  __m512 scale, bias;
};

BK_TARGET_AVX512 inline Segment segment(const ConvPlan& p, int64_t n, int64_t col, int64_t width) {
  Segment s;
  const int64_t g = col / 8;
  s.col = col, s.co = p.ops.col_co[g], s.m = p.ops.col_m[g], s.wide = width == 16;
  s.mask = static_cast<__mmask16>((1u << std::min<int64_t>(width, p.geo.Co - s.co)) - 1);
  s.first = n == 0 && s.m == 0;
  s.last = p.epi.fused && n == p.geo.N - 1 && s.m == p.geo.M - 1;
  s.pairs = p.pairs ? p.pairs + (s.m * p.geo.N + n) * p.geo.P * p.geo.Co + s.co : nullptr;
  s.scale = p.out ? _mm512_maskz_loadu_ps(s.mask, p.ops.scale + n * p.gemm.cols + col) : _mm512_setzero_ps();
  s.bias = s.last && p.epi.bias ? _mm512_maskz_loadu_ps(s.mask, p.epi.bias + s.co) : _mm512_setzero_ps();
  return s;
}

BK_TARGET_AVX512 inline void store_segment(const ConvPlan& p, const Segment& s, __m512i pc,
                                           int64_t pix, int32_t cls) {
  // Unmasked (in bounds: a base row holds >= col + width entries); lanes past Co are never stored.
  const int32_t* b = p.pad.base + cls * p.gemm.cols + s.col;
  const __m512i base = s.wide ? _mm512_loadu_si512(b)
                              : _mm512_castsi256_si512(
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  const __m512i dot = _mm512_sub_epi32(base, _mm512_add_epi32(pc, pc));
  if (s.pairs) _mm512_mask_storeu_epi32(s.pairs + pix * p.geo.Co, s.mask, dot);
  if (!p.out) return;
  float* o = p.out + pix * p.geo.Co + s.co;
  const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), s.scale);
  __m512 y = s.first ? f : _mm512_add_ps(f, _mm512_maskz_loadu_ps(s.mask, o));
  if (s.last) {
    if (p.epi.bias) y = _mm512_add_ps(y, s.bias);
    if (p.epi.residual) {
      // Masked-off lanes load 0.0. fpclass 0x99: QNaN | SNaN | +inf | -inf.
      const __m512 r = _mm512_maskz_loadu_ps(s.mask, p.epi.residual + pix * p.geo.Co + s.co);
      if (_mm512_fpclass_ps_mask(r, 0x99)) p.epi.residual_bad->store(true, std::memory_order_relaxed);
      y = _mm512_add_ps(y, r);
    }
    // vmaxps / vminps return their second operand when one is NaN: put the NaN lanes back, so a NaN
    // sum stays NaN like the scalar epilogue and torch.clamp (signed zeros unchanged).
    const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    const __m512 c =
        _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(p.epi.clamp_lo)), _mm512_set1_ps(p.epi.clamp_hi));
    y = _mm512_mask_mov_ps(c, nan, y);
  }
  _mm512_mask_storeu_ps(o, s.mask, y);
}

}  // namespace bk
