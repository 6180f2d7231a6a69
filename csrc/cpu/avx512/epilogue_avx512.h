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

// Exact +-1 dot products of a segment from its popcounts (padding-corrected); also stores them to pairs.
BK_TARGET_AVX512 inline __m512i segment_dot(const ConvPlan& p, const Segment& s, __m512i pc, int64_t pix,
                                            int32_t cls) {
  // Unmasked (in bounds: a base row holds >= col + width entries); lanes past Co are never stored.
  const int32_t* b = p.pad.base + cls * p.gemm.cols + s.col;
  const __m512i base = s.wide ? _mm512_loadu_si512(b)
                              : _mm512_castsi256_si512(
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  const __m512i dot = _mm512_sub_epi32(base, _mm512_add_epi32(pc, pc));
  if (s.pairs) _mm512_mask_storeu_epi32(s.pairs + pix * p.geo.Co, s.mask, dot);
  return dot;
}

// The fused bias / residual / clamp of the last contribution (s.last), in registers.
BK_TARGET_AVX512 inline __m512 segment_finish(const ConvPlan& p, const Segment& s, __m512 y, int64_t pix) {
  if (!s.last) return y;
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
  return _mm512_mask_mov_ps(c, nan, y);
}

BK_TARGET_AVX512 inline void store_segment(const ConvPlan& p, const Segment& s, __m512i pc,
                                           int64_t pix, int32_t cls) {
  const __m512i dot = segment_dot(p, s, pc, pix, cls);
  if (!p.out) return;
  float* o = p.out + pix * p.geo.Co + s.co;
  const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), s.scale);
  const __m512 y = s.first ? f : _mm512_add_ps(f, _mm512_maskz_loadu_ps(s.mask, o));
  _mm512_mask_storeu_ps(o, s.mask, segment_finish(p, s, y, pix));
}

// Which of NV segments (columns m-major, so a later segment with the same output channels is a later
// weight base) continue an earlier one's sum: prev[v] = that earlier segment, or -1; kept[v]: no later
// segment continues v (v is stored).
template <int NV>
struct SegmentLinks {
  int prev[NV];
  bool kept[NV];
};

template <int NV>
BK_TARGET_AVX512 inline SegmentLinks<NV> link_segments(const Segment (&seg)[NV]) {
  SegmentLinks<NV> l;
  for (int v = 0; v < NV; ++v) {
    l.prev[v] = -1, l.kept[v] = true;
    for (int u = 0; u < v; ++u)
      if (seg[u].co == seg[v].co && seg[u].wide == seg[v].wide) l.prev[v] = u;
    if (l.prev[v] >= 0) l.kept[l.prev[v]] = false;
  }
  return l;
}

// store_segment for segments 0..NV-1 of one pixel, each output location written once: a segment that
// continues an earlier one adds to its sum in registers instead of reloading it from out (the same
// float steps in the same order; no store-to-load round trip between weight bases).
template <int NV>
BK_TARGET_AVX512 inline void store_segments(const ConvPlan& p, const Segment (&seg)[NV],
                                            const SegmentLinks<NV>& l, const __m512i (&pc)[NV], int64_t pix,
                                            int32_t cls) {
  __m512 y[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __m512i dot = segment_dot(p, seg[v], pc[v], pix, cls);
    if (!p.out) continue;
    const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), seg[v].scale);
    if (seg[v].first)
      y[v] = f;
    else if (l.prev[v] >= 0)
      y[v] = _mm512_add_ps(f, y[l.prev[v]]);
    else
      y[v] = _mm512_add_ps(f, _mm512_maskz_loadu_ps(seg[v].mask, p.out + pix * p.geo.Co + seg[v].co));
  }
  if (!p.out) return;
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v)
    if (l.kept[v])
      _mm512_mask_storeu_ps(p.out + pix * p.geo.Co + seg[v].co, seg[v].mask,
                            segment_finish(p, seg[v], y[v], pix));
}

}  // namespace bk
