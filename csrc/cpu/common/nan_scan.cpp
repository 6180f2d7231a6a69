// Fast "does this float buffer contain a NaN?" scan, so that input validation costs one vectorized pass
// over memory instead of torch's isnan() + any() (which materialises a bool tensor). The per-ISA scans
// live in scalar/, avx2/, avx512/.
#include <algorithm>
#include <atomic>

#include "cpu/common/engine.h"
#include "cpu/common/kernels.h"
#include "cpu/common/thread_pool.h"

namespace bk {

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
