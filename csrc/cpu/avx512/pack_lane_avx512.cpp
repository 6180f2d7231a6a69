// Packing for the lane engines (C <= 32, AVX-512): one 16- or 32-bit element per pixel, bit c = channel
// c, in zero-padded NHWC planes [N][B][Hp][Wp]. Same bit convention and NaN report as the word packers
// (NaN is looked for while packing base 0).
#include <algorithm>

#include "cpu/common/kernels.h"

#if BK_X86
#include <immintrin.h>

namespace bk {
namespace {

template <int kMode>
BK_TARGET_AVX512 inline __mmask16 bits16(__m512 x, __m512 v) {
  if (kMode == kModeSign) return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
  return _mm512_cmp_ps_mask(_mm512_add_ps(x, v), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
}

// One image row (b, h) of base n into row (the padded row's first element).
template <bool kNan, int kMode, typename T>
BK_TARGET_AVX512 bool pack_row(const PackJob& j, int64_t n, int64_t b, int64_t h, T* row) {
  const __m512 v = _mm512_set1_ps(kMode == kModeHv ? j.v[n] : 0.0f);
  const int64_t C = j.C, W = j.W;  // locals: the stores below may alias j (-fno-strict-aliasing)
  T* out = row + j.pw;
  __mmask16 nan = 0;
  if (j.channels_last) {  // a pixel's C <= 32 floats are contiguous: one or two compares
    const __mmask16 m0 = C >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << C) - 1);
    const __mmask16 m1 = C <= 16 ? 0 : static_cast<__mmask16>((1ull << (C - 16)) - 1);
    const float* px = j.x + (b * j.H + h) * W * C;
    for (int64_t w = 0; w < W; ++w, px += C) {
      const __m512 x0 = _mm512_maskz_loadu_ps(m0, px);
      uint32_t word = bits16<kMode>(x0, v) & m0;
      if (kNan) nan |= _mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q);
      if (m1) {
        const __m512 x1 = _mm512_maskz_loadu_ps(m1, px + 16);
        word |= static_cast<uint32_t>(bits16<kMode>(x1, v) & m1) << 16;
        if (kNan) nan |= _mm512_cmp_ps_mask(x1, x1, _CMP_UNORD_Q);
      }
      out[w] = static_cast<T>(word);
    }
    return nan != 0;
  }
  // NCHW: 16 pixels at a time; channel c's compare mask sets bit c of the 16 pixel lanes.
  const int64_t HW = j.H * W;
  const float* xb = j.x + b * C * HW + h * W;
  for (int64_t w0 = 0; w0 < W; w0 += 16) {
    const int64_t nw = std::min<int64_t>(16, W - w0);
    const __mmask16 wm = nw == 16 ? 0xFFFF : static_cast<__mmask16>((1u << nw) - 1);
    __m512i acc = _mm512_setzero_si512(), bit = _mm512_set1_epi32(1);
    const float* xc = xb + w0;
    for (int64_t c = 0; c < C; ++c, xc += HW) {
      const __m512 x = _mm512_maskz_loadu_ps(wm, xc);
      if (kNan) nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      acc = _mm512_mask_or_epi32(acc, bits16<kMode>(x, v), acc, bit);
      bit = _mm512_add_epi32(bit, bit);
    }
    if constexpr (sizeof(T) == 2)
      _mm512_mask_cvtepi32_storeu_epi16(out + w0, wm, acc);
    else
      _mm512_mask_storeu_epi32(out + w0, wm, acc);
  }
  return nan != 0;
}

template <typename T>
BK_TARGET_AVX512 bool pack_rows_t(const PackJob& j, int64_t r0, int64_t r1) {
  return for_each_padded_row<T>(j, r0, r1, 1, [&](int64_t n, int64_t b, int64_t h, T* row) {
    if (j.mode == kModeSign) return pack_row<true, kModeSign>(j, n, b, h, row);  // one base
    return n == 0 ? pack_row<true, kModeHv>(j, n, b, h, row) : pack_row<false, kModeHv>(j, n, b, h, row);
  });
}

}  // namespace

bool pack_rows_lane_avx512(const PackJob& j, int64_t r0, int64_t r1) {
  return j.elem_bytes == 2 ? pack_rows_t<uint16_t>(j, r0, r1) : pack_rows_t<uint32_t>(j, r0, r1);
}

}  // namespace bk
#endif
