// AVX-512 NaN scan: unordered self-compares OR-ed into a mask register.
#include "cpu/common/kernels.h"

#if BK_X86
#include <immintrin.h>

namespace bk {

BK_TARGET_AVX512 bool has_nan_avx512(const float* x, int64_t n) {
  __mmask16 found = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    found |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  return found != 0 || has_nan_scalar(x + i, n - i);
}

}  // namespace bk
#endif
