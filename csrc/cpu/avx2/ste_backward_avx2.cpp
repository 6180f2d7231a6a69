// AVX2 STE backward passes: compares to lane masks, masked products AND-ed to +0 (engine.h's arithmetic).
#include "cpu/common/kernels.h"

#if BK_X86
#include <immintrin.h>

namespace bk {

BK_TARGET_AVX2 void ste_grad_x_avx2(const SteGradArgs& a, int64_t begin, int64_t end) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 x = _mm256_loadu_ps(a.x + i), g = _mm256_loadu_ps(a.g + i);
    __m256 acc;
    if (a.v == nullptr) {
      const __m256 in = _mm256_cmp_ps(_mm256_and_ps(x, abs_mask), one, _CMP_LE_OQ);
      acc = _mm256_and_ps(in, _mm256_mul_ps(g, _mm256_set1_ps(a.beta[0])));
    } else {
      acc = zero;
      for (int k = 0; k < a.num_act; ++k) {
        const __m256 s = _mm256_add_ps(x, _mm256_set1_ps(a.v[k]));
        const __m256 in = _mm256_and_ps(_mm256_cmp_ps(s, zero, _CMP_GE_OQ), _mm256_cmp_ps(s, one, _CMP_LE_OQ));
        const __m256 t = _mm256_and_ps(in, _mm256_mul_ps(g, _mm256_set1_ps(a.beta[k])));
        acc = k == 0 ? t : _mm256_add_ps(acc, t);
      }
    }
    _mm256_storeu_ps(a.dst + i, acc);
  }
  ste_grad_x_scalar(a, i, end);
}

BK_TARGET_AVX2 void clamp_grad_avx2(const float* g, const float* out, float lo, float hi, float* dst,
                                    int64_t begin, int64_t end) {
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 o = _mm256_loadu_ps(out + i);
    const __m256 in = _mm256_and_ps(_mm256_cmp_ps(o, vlo, _CMP_GT_OQ), _mm256_cmp_ps(o, vhi, _CMP_LT_OQ));
    _mm256_storeu_ps(dst + i, _mm256_and_ps(in, _mm256_loadu_ps(g + i)));
  }
  clamp_grad_scalar(g, out, lo, hi, dst, i, end);
}

BK_TARGET_AVX2 void interval_bits_avx2(const IntervalBitsArgs& a, int64_t begin, int64_t end) {
  const __m256 lo = _mm256_set1_ps(a.lo), hi = _mm256_set1_ps(a.hi);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 x = _mm256_loadu_ps(a.src + i);
    for (int k = 0; k < a.num_masks; ++k) {
      const __m256 s = a.shift == nullptr ? x : _mm256_add_ps(x, _mm256_set1_ps(a.shift[k]));
      const __m256 in = a.open
          ? _mm256_and_ps(_mm256_cmp_ps(s, lo, _CMP_GT_OQ), _mm256_cmp_ps(s, hi, _CMP_LT_OQ))
          : _mm256_and_ps(_mm256_cmp_ps(s, lo, _CMP_GE_OQ), _mm256_cmp_ps(s, hi, _CMP_LE_OQ));
      reinterpret_cast<uint8_t*>(a.dst + k * a.words)[i / 8] = static_cast<uint8_t>(_mm256_movemask_ps(in));
    }
  }
  interval_bits_scalar(a, i, end);
}

BK_TARGET_AVX2 void masked_grad_avx2(const MaskedGradArgs& a, int64_t begin, int64_t end) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 g = _mm256_loadu_ps(a.g + i);
    __m256 acc = _mm256_setzero_ps();
    for (int k = 0; k < a.num_masks; ++k) {
      const int byte = reinterpret_cast<const uint8_t*>(a.bits + k * a.words)[i / 8];
      const __m256i sel = _mm256_and_si256(_mm256_set1_epi32(byte), lane_bit);
      const __m256 in = _mm256_castsi256_ps(_mm256_cmpeq_epi32(sel, lane_bit));
      const __m256 t = _mm256_and_ps(in, a.scale == nullptr ? g : _mm256_mul_ps(g, _mm256_set1_ps(a.scale[k])));
      acc = k == 0 ? t : _mm256_add_ps(acc, t);
    }
    _mm256_storeu_ps(a.dst + i, acc);
  }
  masked_grad_scalar(a, i, end);
}

}  // namespace bk
#endif
