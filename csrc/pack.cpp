// Activation packing: float [B, C, H, W] -> padded NHWC bit words, one plane per base n.
// While packing base 0 the row functions also report whether they read a NaN (kNan = true), so input
// validation needs no separate pass over x: NaN has no sign, and the Python side raises on the flag.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "bk_common.h"

#if BK_X86
#include <immintrin.h>
#endif

namespace bk {
namespace {

inline bool bit_of(float x, int mode, float v) {
  if (mode == kModeSign) return x >= 0.0f;
  const float s = x + v;  // the sum is rounded to float32 on purpose (bit convention)
  return s >= 0.5f;
}

inline uint64_t* dst_row(const PackJob& j, int64_t n, int64_t b, int64_t hp) {
  return j.dst + ((n * j.B + b) * j.Hp + hp) * j.Wp * j.Kw;
}

inline float x_at(const PackJob& j, int64_t b, int64_t c, int64_t h, int64_t w) {
  return j.channels_last ? j.x[((b * j.H + h) * j.W + w) * j.C + c]
                         : j.x[((b * j.C + c) * j.H + h) * j.W + w];
}

// Scalar packing of pixels [w0, w1) of image row (b, h) for base n into row (interior offset applied).
// Returns true when kNan and one of the values read is NaN.
template <bool kNan>
bool pack_pixels_scalar(const PackJob& j, int64_t n, int64_t b, int64_t h, int64_t w0, int64_t w1,
                        uint64_t* row) {
  const float v = j.mode == kModeHv ? j.v[n] : 0.0f;
  bool nan = false;
  for (int64_t w = w0; w < w1; ++w) {
    uint64_t* out = row + (j.pw + w) * j.Kw;
    for (int64_t g = 0; g < j.Kw; ++g) {
      const int64_t c0 = g * 64, c1 = std::min(j.C, c0 + 64);
      uint64_t word = 0;
      for (int64_t c = c0; c < c1; ++c) {
        const float xv = x_at(j, b, c, h, w);
        if (kNan) nan |= std::isnan(xv);
        word |= static_cast<uint64_t>(bit_of(xv, j.mode, v)) << (c - c0);
      }
      out[g] = word;
    }
  }
  return nan;
}

#if BK_X86
// ---------------------------------------------------------------- AVX-512
BK_TARGET_AVX512 inline __mmask16 cmp16_avx512(__m512 x, int mode, __m512 v) {
  if (mode == kModeSign) return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
  return _mm512_cmp_ps_mask(_mm512_add_ps(x, v), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
}

// Lanes holding NaN (unordered self-compare; masked-off lanes were loaded as 0.0, never NaN).
BK_TARGET_AVX512 inline __mmask16 nan16_avx512(__m512 x) {
  return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
}

template <bool kNan>
BK_TARGET_AVX512 bool pack_row_avx512(const PackJob& j, int64_t n, int64_t b, int64_t h,
                                      uint64_t* row) {
  const __m512 v = _mm512_set1_ps(j.mode == kModeHv ? j.v[n] : 0.0f);
  __mmask16 nan = 0;
  if (j.channels_last) {
    const float* px = j.x + (b * j.H + h) * j.W * j.C;
    for (int64_t w = 0; w < j.W; ++w, px += j.C) {
      uint64_t* out = row + (j.pw + w) * j.Kw;
      for (int64_t g = 0; g < j.Kw; ++g) {
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
    for (int64_t g = 0; g < j.Kw; ++g) {
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
      if (j.Kw == 1) {
        _mm512_mask_storeu_epi64(row + j.pw + w0, static_cast<__mmask8>(wm), lo);
        _mm512_mask_storeu_epi64(row + j.pw + w0 + 8, static_cast<__mmask8>(wm >> 8), hi);
      } else {
        _mm512_store_si512(tmp, lo);
        _mm512_store_si512(tmp + 8, hi);
        for (int64_t i = 0; i < nw; ++i) row[(j.pw + w0 + i) * j.Kw + g] = tmp[i];
      }
    }
  }
  return nan != 0;
}

// ---------------------------------------------------------------- AVX2
BK_TARGET_AVX2 inline __m256 cmp8_avx2(__m256 x, int mode, __m256 v) {
  if (mode == kModeSign) return _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
  return _mm256_cmp_ps(_mm256_add_ps(x, v), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
}

template <bool kNan>
BK_TARGET_AVX2 bool pack_row_avx2(const PackJob& j, int64_t n, int64_t b, int64_t h,
                                  uint64_t* row) {
  const float vs = j.mode == kModeHv ? j.v[n] : 0.0f;
  const __m256 v = _mm256_set1_ps(vs);
  __m256 nan = _mm256_setzero_ps();  // all-ones lanes where a NaN was loaded
  bool nan_tail = false;             // NaN among the scalar tail values
  if (j.channels_last) {
    const float* px = j.x + (b * j.H + h) * j.W * j.C;
    for (int64_t w = 0; w < j.W; ++w, px += j.C) {
      uint64_t* out = row + (j.pw + w) * j.Kw;
      for (int64_t g = 0; g < j.Kw; ++g) {
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
    for (int64_t g = 0; g < j.Kw; ++g) {
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
      for (int64_t i = 0; i < 8; ++i) row[(j.pw + w0 + i) * j.Kw + g] = tmp[i];
    }
  }
  if (w0 < j.W) nan_tail = pack_pixels_scalar<kNan>(j, n, b, h, w0, j.W, row);
  return nan_tail || _mm256_movemask_ps(nan) != 0;
}
#endif

// out[q] = OR_{u < taps, q + u < len} src[q + u] << (u * C)  (tap u of a folded word at bit u*C).
void fold_row(const uint64_t* __restrict src, uint64_t* __restrict out, const int64_t len,
              const int64_t taps, const int64_t C) {
  for (int64_t q = 0; q < len; ++q) out[q] = src[q];
  for (int64_t u = 1; u < taps; ++u) {
    const unsigned shift = static_cast<unsigned>(u * C);
    const int64_t end = len - u;
    for (int64_t q = 0; q < end; ++q) out[q] |= src[q + u] << shift;
  }
}

// One image row of base n; NaN is looked for only in base 0 (every base reads the same x).
bool pack_row(const PackJob& j, Isa isa, int64_t n, int64_t b, int64_t h, uint64_t* row) {
  const bool scan = n == 0;
  switch (isa) {
#if BK_X86
    case Isa::Avx512:
      return scan ? pack_row_avx512<true>(j, n, b, h, row) : pack_row_avx512<false>(j, n, b, h, row);
    case Isa::Avx2:
      return scan ? pack_row_avx2<true>(j, n, b, h, row) : pack_row_avx2<false>(j, n, b, h, row);
#endif
    default:
      return scan ? pack_pixels_scalar<true>(j, n, b, h, 0, j.W, row)
                  : pack_pixels_scalar<false>(j, n, b, h, 0, j.W, row);
  }
}

}  // namespace

bool pack_rows(const PackJob& j, Isa isa, int64_t r0, int64_t r1) {
  const bool nan = for_each_padded_row<uint64_t>(
      j, r0, r1, j.Kw, [&](int64_t n, int64_t b, int64_t h, uint64_t* row) {
        return pack_row(j, isa, n, b, h, row);
      });
  // Folded planes, from the rows just written (still in cache).
  for (int f = 0; f < j.fold_count; ++f)
    for (int64_t n = 0; n < j.N; ++n)
      for (int64_t r = r0; r < r1; ++r) {
        const uint64_t* row = dst_row(j, n, r / j.Hp, r % j.Hp);
        fold_row(row, j.fold_dst[f] + (row - j.dst), j.Wp, j.fold_taps[f], j.C);
      }
  return nan;
}

}  // namespace bk
