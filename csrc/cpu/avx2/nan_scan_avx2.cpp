// AVX2 NaN scan: unordered self-compares OR-ed over the buffer, one movemask at the end.
#include "cpu/common/kernels.h"

#if BK_X86
#include <immintrin.h>

namespace bk {

BK_TARGET_AVX2 bool has_nan_avx2(const float* x, int64_t n) {
  __m256 found = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    found = _mm256_or_ps(found, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  return _mm256_movemask_ps(found) != 0 || has_nan_scalar(x + i, n - i);
}

}  // namespace bk
#endif
