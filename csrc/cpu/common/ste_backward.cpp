// The STE backward's elementwise passes (issue 16): the input gradient sum_n beta_n * window_n * G and
// the fused clamp's mask on the incoming gradient, multi-threaded over chunks; the per-ISA loops live in
// scalar/, avx2/, avx512/ (ste_backward_*.cpp) and compute the same float arithmetic (engine.h).
#include <algorithm>

#include "cpu/common/engine.h"
#include "cpu/common/kernels.h"
#include "cpu/common/thread_pool.h"

namespace bk {
namespace {
constexpr int64_t kChunk = 1 << 15;  // floats per task (a multiple of 64: tasks never share a mask word)

#if BK_X86
#define BK_PER_ISA(name) name##_scalar, name##_avx2, name##_avx512
#else
#define BK_PER_ISA(name) name##_scalar, name##_scalar, name##_scalar
#endif

// The kernel of the requested ISA (one of three with the same signature).
template <class Kernel>
Kernel pick(const std::string& isa_name, Kernel scalar, Kernel avx2, Kernel avx512) {
  switch (parse_isa(isa_name)) {
    case Isa::Avx512: return avx512;
    case Isa::Avx2: return avx2;
    default: return scalar;
  }
}

// run(begin, end) over [0, n) in chunks of kChunk elements, on `threads` threads.
template <class Run>
void for_each_chunk(int64_t n, int threads, const Run& run) {
  parallel_for((n + kChunk - 1) / kChunk, threads, 1, [&](int64_t t0, int64_t t1) {
    run(t0 * kChunk, std::min(n, t1 * kChunk));
  });
}
}  // namespace

void run_ste_grad_x(const SteGradArgs& a, int64_t n, const std::string& isa, int threads) {
  const auto kernel = pick(isa, BK_PER_ISA(ste_grad_x));
  for_each_chunk(n, threads, [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
}

void run_clamp_grad(const float* g, const float* out, float lo, float hi, float* dst, int64_t n,
                    const std::string& isa, int threads) {
  const auto kernel = pick(isa, BK_PER_ISA(clamp_grad));
  for_each_chunk(n, threads, [&](int64_t begin, int64_t end) { kernel(g, out, lo, hi, dst, begin, end); });
}

void run_interval_bits(const IntervalBitsArgs& a, int64_t n, const std::string& isa, int threads) {
  const auto kernel = pick(isa, BK_PER_ISA(interval_bits));
  for_each_chunk(n, threads, [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
}

void run_masked_grad(const MaskedGradArgs& a, int64_t n, const std::string& isa, int threads) {
  const auto kernel = pick(isa, BK_PER_ISA(masked_grad));
  for_each_chunk(n, threads, [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
}

#undef BK_PER_ISA

}  // namespace bk
