// Fast "does this float buffer contain a NaN?" scan, so that input validation costs one vectorized pass
// over memory instead of torch's isnan() + any() (which materialises a bool tensor).
#include <algorithm>
#include <atomic>
#include <cmath>

#include "bk_common.h"
#include "engine.h"
#include "thread_pool.h"

#if BK_X86
#include <immintrin.h>
#endif

namespace bk {
namespace {

bool has_nan_scalar(const float* x, int64_t n) {
  bool found = false;
  for (int64_t i = 0; i < n; ++i) found |= std::isnan(x[i]);
  return found;
}

#if BK_X86
BK_TARGET_AVX512 bool has_nan_avx512(const float* x, int64_t n) {
  __mmask16 found = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    found |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  return found != 0 || has_nan_scalar(x + i, n - i);
}

BK_TARGET_AVX2 bool has_nan_avx2(const float* x, int64_t n) {
  __m256 found = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    found = _mm256_or_ps(found, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  return _mm256_movemask_ps(found) != 0 || has_nan_scalar(x + i, n - i);
}
#endif

}  // namespace

bool run_has_nan(const float* x, int64_t n, const std::string& isa_name, int threads) {
  const Isa isa = parse_isa(isa_name);
  std::atomic<bool> found{false};
  constexpr int64_t kChunk = 1 << 16;  // floats per task
  parallel_for((n + kChunk - 1) / kChunk, threads, 1, [&](int64_t t0, int64_t t1) {
    const int64_t begin = t0 * kChunk, end = std::min(n, t1 * kChunk);
    bool local;
    switch (isa) {
#if BK_X86
      case Isa::Avx512: local = has_nan_avx512(x + begin, end - begin); break;
      case Isa::Avx2: local = has_nan_avx2(x + begin, end - begin); break;
#endif
      default: local = has_nan_scalar(x + begin, end - begin);
    }
    if (local) found.store(true, std::memory_order_relaxed);
  });
  return found.load();
}

}  // namespace bk
