// AVX-512 STE backward passes: compares into mask registers, zero-masked products (engine.h's arithmetic).
#include "cpu/common/kernels.h"

#if BK_X86
#include <immintrin.h>

#include <cstring>

namespace bk {

BK_TARGET_AVX512 void ste_grad_x_avx512(const SteGradArgs& a, int64_t begin, int64_t end) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512 x = _mm512_loadu_ps(a.x + i), g = _mm512_loadu_ps(a.g + i);
    __m512 acc;
    if (a.v == nullptr) {
      const __mmask16 in = _mm512_cmp_ps_mask(_mm512_abs_ps(x), one, _CMP_LE_OQ);
      acc = _mm512_maskz_mul_ps(in, g, _mm512_set1_ps(a.beta[0]));
    } else {
      acc = zero;
      for (int k = 0; k < a.num_act; ++k) {
        const __m512 s = _mm512_add_ps(x, _mm512_set1_ps(a.v[k]));
        const __mmask16 in = _mm512_cmp_ps_mask(s, zero, _CMP_GE_OQ) & _mm512_cmp_ps_mask(s, one, _CMP_LE_OQ);
        const __m512 t = _mm512_maskz_mul_ps(in, g, _mm512_set1_ps(a.beta[k]));
        acc = k == 0 ? t : _mm512_add_ps(acc, t);
      }
    }
    _mm512_storeu_ps(a.dst + i, acc);
  }
  ste_grad_x_scalar(a, i, end);
}

BK_TARGET_AVX512 void clamp_grad_avx512(const float* g, const float* out, float lo, float hi, float* dst,
                                        int64_t begin, int64_t end) {
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512 o = _mm512_loadu_ps(out + i);
    const __mmask16 in = _mm512_cmp_ps_mask(o, vlo, _CMP_GT_OQ) & _mm512_cmp_ps_mask(o, vhi, _CMP_LT_OQ);
    _mm512_storeu_ps(dst + i, _mm512_maskz_mov_ps(in, _mm512_loadu_ps(g + i)));
  }
  clamp_grad_scalar(g, out, lo, hi, dst, i, end);
}

// Mask k's 16 bits of elements [i, i + 16) (i a multiple of 16), as written by interval_bits.
static inline uint16_t mask16(const uint64_t* bits, int64_t i) {
  uint16_t m;
  std::memcpy(&m, reinterpret_cast<const uint8_t*>(bits) + i / 8, sizeof m);
  return m;
}

BK_TARGET_AVX512 void interval_bits_avx512(const IntervalBitsArgs& a, int64_t begin, int64_t end) {
  const __m512 lo = _mm512_set1_ps(a.lo), hi = _mm512_set1_ps(a.hi);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512 x = _mm512_loadu_ps(a.src + i);
    for (int k = 0; k < a.num_masks; ++k) {
      const __m512 s = a.shift == nullptr ? x : _mm512_add_ps(x, _mm512_set1_ps(a.shift[k]));
      const __mmask16 in = a.open
          ? _mm512_cmp_ps_mask(s, lo, _CMP_GT_OQ) & _mm512_cmp_ps_mask(s, hi, _CMP_LT_OQ)
          : _mm512_cmp_ps_mask(s, lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(s, hi, _CMP_LE_OQ);
      const uint16_t m = in;
      std::memcpy(reinterpret_cast<uint8_t*>(a.dst + k * a.words) + i / 8, &m, sizeof m);
    }
  }
  interval_bits_scalar(a, i, end);
}

BK_TARGET_AVX512 void masked_grad_avx512(const MaskedGradArgs& a, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512 g = _mm512_loadu_ps(a.g + i);
    __m512 acc = _mm512_setzero_ps();
    for (int k = 0; k < a.num_masks; ++k) {
      const __mmask16 in = mask16(a.bits + k * a.words, i);
      const __m512 t = a.scale == nullptr ? _mm512_maskz_mov_ps(in, g)
                                          : _mm512_maskz_mul_ps(in, g, _mm512_set1_ps(a.scale[k]));
      acc = k == 0 ? t : _mm512_add_ps(acc, t);
    }
    _mm512_storeu_ps(a.dst + i, acc);
  }
  masked_grad_scalar(a, i, end);
}

}  // namespace bk
#endif
