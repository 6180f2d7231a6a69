// AVX2 activation packing (word layout): 8 floats per compare, movemask into the word; a scalar tail.
// While packing base 0 the row also reports whether it read a NaN.
#include "cpu/common/kernels.h"

#if BK_X86
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "cpu/scalar/pack_scalar.h"

namespace bk {
namespace {

BK_TARGET_AVX2 inline __m256 cmp8_avx2(__m256 x, int mode, __m256 v) {
  if (mode == kModeSign) return _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
  return _mm256_cmp_ps(_mm256_add_ps(x, v), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
}

template <bool kNan>
BK_TARGET_AVX2 bool pack_row_avx2_t(const PackJob& j, int64_t n, int64_t b, int64_t h,
                                  uint64_t* row) {
  const float vs = j.mode == kModeHv ? j.v[n] : 0.0f;
  const __m256 v = _mm256_set1_ps(vs);
  __m256 nan = _mm256_setzero_ps();  // all-ones lanes where a NaN was loaded
  bool nan_tail = false;             // NaN among the scalar tail values
  if (j.channels_last) {
    const float* px = j.x + (b * j.H + h) * j.W * j.C;
    for (int64_t w = 0; w < j.W; ++w, px += j.C) {
      uint64_t* out = row + (j.pw + w) * j.chan_words;
      for (int64_t g = 0; g < j.chan_words; ++g) {
        const int64_t c0 = g * 64, nc = std::min<int64_t>(64, j.C - c0);
        uint64_t word = 0;
        int64_t c = 0;
        for (; c + 8 <= nc; c += 8) {
          const __m256 x = _mm256_loadu_ps(px + c0 + c);
          if (kNan) nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
          const unsigned m = _mm256_movemask_ps(cmp8_avx2(x, j.mode, v));
          word |= static_cast<uint64_t>(m) << c;
        }
        for (; c < nc; ++c) {
          if (kNan) nan_tail |= std::isnan(px[c0 + c]);
          word |= static_cast<uint64_t>(bit_of(px[c0 + c], j.mode, vs)) << c;
        }
        out[g] = word;
      }
    }
    return nan_tail || _mm256_movemask_ps(nan) != 0;
  }
  const int64_t HW = j.H * j.W;
  const float* xb = j.x + b * j.C * HW + h * j.W;
  int64_t w0 = 0;
  for (; w0 + 8 <= j.W; w0 += 8) {
    for (int64_t g = 0; g < j.chan_words; ++g) {
      const int64_t c0 = g * 64, c1 = std::min(j.C, c0 + 64);
      __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
      const float* xc = xb + c0 * HW + w0;
      for (int64_t c = c0; c < c1; ++c, xc += HW) {
        const __m256 x = _mm256_loadu_ps(xc);
        if (kNan) nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        const __m256i k = _mm256_castps_si256(cmp8_avx2(x, j.mode, v));
        const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(1ull << (c - c0)));
        lo = _mm256_or_si256(lo, _mm256_and_si256(bit, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(k))));
        hi = _mm256_or_si256(hi, _mm256_and_si256(bit, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(k, 1))));
      }
      alignas(32) uint64_t tmp[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), lo);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 4), hi);
      for (int64_t i = 0; i < 8; ++i) row[(j.pw + w0 + i) * j.chan_words + g] = tmp[i];
    }
  }
  if (w0 < j.W) nan_tail = pack_pixels_scalar<kNan>(j, n, b, h, w0, j.W, row);
  return nan_tail || _mm256_movemask_ps(nan) != 0;
}

}  // namespace

bool pack_rows_avx2(const PackJob& j, int64_t r0, int64_t r1) {
  const auto row_fn = [&](int64_t n, int64_t b, int64_t h, uint64_t* row) {
    return n == 0 ? pack_row_avx2_t<true>(j, n, b, h, row) : pack_row_avx2_t<false>(j, n, b, h, row);
  };
  return for_each_padded_row<uint64_t>(j, r0, r1, j.chan_words, row_fn);
}

}  // namespace bk
#endif
