// AVX-512 activation packing (word layout): 16 floats per compare into mask registers; NCHW input is
// read channel by channel and the mask bits are OR-ed into 16 pixel words at once, channels_last input is
// 4 compares per 64-channel word. While packing base 0 the row also reports whether it read a NaN.
#include "cpu/common/kernels.h"

#if BK_X86
#include <immintrin.h>

#include <algorithm>

namespace bk {
namespace {

BK_TARGET_AVX512 inline __mmask16 cmp16_avx512(__m512 x, int mode, __m512 v) {
  if (mode == kModeSign) return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
  return _mm512_cmp_ps_mask(_mm512_add_ps(x, v), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
}

// Lanes holding NaN (unordered self-compare; masked-off lanes were loaded as 0.0, never NaN).
BK_TARGET_AVX512 inline __mmask16 nan16_avx512(__m512 x) {
  return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
}

template <bool kNan>
BK_TARGET_AVX512 bool pack_row_avx512_t(const PackJob& j, int64_t n, int64_t b, int64_t h,
                                      uint64_t* row) {
  const __m512 v = _mm512_set1_ps(j.mode == kModeHv ? j.v[n] : 0.0f);
  __mmask16 nan = 0;
  if (j.channels_last) {
    const float* px = j.x + (b * j.H + h) * j.W * j.C;
    for (int64_t w = 0; w < j.W; ++w, px += j.C) {
      uint64_t* out = row + (j.pw + w) * j.chan_words;
      for (int64_t g = 0; g < j.chan_words; ++g) {
        const int64_t c0 = g * 64, nc = std::min<int64_t>(64, j.C - c0);
        uint64_t word = 0;
        for (int64_t q = 0; q < 4 && q * 16 < nc; ++q) {
          const int64_t left = nc - q * 16;
          const __mmask16 lm = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
          const __m512 x = _mm512_maskz_loadu_ps(lm, px + c0 + q * 16);
          if (kNan) nan |= nan16_avx512(x);
          word |= static_cast<uint64_t>(cmp16_avx512(x, j.mode, v) & lm) << (16 * q);
        }
        out[g] = word;
      }
    }
    return nan != 0;
  }
  // NCHW: 16 pixels at a time, one float16-vector per channel, bits OR-ed into 2x8 word lanes.
  const int64_t HW = j.H * j.W;
  const float* xb = j.x + b * j.C * HW + h * j.W;
  alignas(64) uint64_t tmp[16];
  for (int64_t w0 = 0; w0 < j.W; w0 += 16) {
    const int64_t nw = std::min<int64_t>(16, j.W - w0);
    const __mmask16 wm = nw == 16 ? 0xFFFF : static_cast<__mmask16>((1u << nw) - 1);
    for (int64_t g = 0; g < j.chan_words; ++g) {
      const int64_t c0 = g * 64, c1 = std::min(j.C, c0 + 64);
      __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
      const float* xc = xb + c0 * HW + w0;
      for (int64_t c = c0; c < c1; ++c, xc += HW) {
        const __m512 x = _mm512_maskz_loadu_ps(wm, xc);
        if (kNan) nan |= nan16_avx512(x);
        const __mmask16 k = cmp16_avx512(x, j.mode, v);
        const __m512i bit = _mm512_set1_epi64(static_cast<long long>(1ull << (c - c0)));
        lo = _mm512_mask_or_epi64(lo, static_cast<__mmask8>(k), lo, bit);
        hi = _mm512_mask_or_epi64(hi, static_cast<__mmask8>(k >> 8), hi, bit);
      }
      if (j.chan_words == 1) {
        _mm512_mask_storeu_epi64(row + j.pw + w0, static_cast<__mmask8>(wm), lo);
        _mm512_mask_storeu_epi64(row + j.pw + w0 + 8, static_cast<__mmask8>(wm >> 8), hi);
      } else {
        _mm512_store_si512(tmp, lo);
        _mm512_store_si512(tmp + 8, hi);
        for (int64_t i = 0; i < nw; ++i) row[(j.pw + w0 + i) * j.chan_words + g] = tmp[i];
      }
    }
  }
  return nan != 0;
}

}  // namespace

bool pack_rows_avx512(const PackJob& j, int64_t r0, int64_t r1) {
  const auto row_fn = [&](int64_t n, int64_t b, int64_t h, uint64_t* row) {
    return n == 0 ? pack_row_avx512_t<true>(j, n, b, h, row) : pack_row_avx512_t<false>(j, n, b, h, row);
  };
  return for_each_padded_row<uint64_t>(j, r0, r1, j.chan_words, row_fn);
}

}  // namespace bk
#endif
