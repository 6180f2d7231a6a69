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
}

void run_ste_grad_x(const SteGradArgs& a, int64_t n, const std::string& isa_name, int threads) {
  const Isa isa = parse_isa(isa_name);
  parallel_for((n + kChunk - 1) / kChunk, threads, 1, [&](int64_t t0, int64_t t1) {
    const int64_t begin = t0 * kChunk, end = std::min(n, t1 * kChunk);
    switch (isa) {
#if BK_X86
      case Isa::Avx512: ste_grad_x_avx512(a, begin, end); break;
      case Isa::Avx2: ste_grad_x_avx2(a, begin, end); break;
#endif
      default: ste_grad_x_scalar(a, begin, end);
    }
  });
}

void run_clamp_grad(const float* g, const float* out, float lo, float hi, float* dst, int64_t n,
                    const std::string& isa_name, int threads) {
  const Isa isa = parse_isa(isa_name);
  parallel_for((n + kChunk - 1) / kChunk, threads, 1, [&](int64_t t0, int64_t t1) {
    const int64_t begin = t0 * kChunk, end = std::min(n, t1 * kChunk);
    switch (isa) {
#if BK_X86
      case Isa::Avx512: clamp_grad_avx512(g, out, lo, hi, dst, begin, end); break;
      case Isa::Avx2: clamp_grad_avx2(g, out, lo, hi, dst, begin, end); break;
#endif
      default: clamp_grad_scalar(g, out, lo, hi, dst, begin, end);
    }
  });
}

void run_interval_bits(const IntervalBitsArgs& a, int64_t n, const std::string& isa_name, int threads) {
  const Isa isa = parse_isa(isa_name);
  parallel_for((n + kChunk - 1) / kChunk, threads, 1, [&](int64_t t0, int64_t t1) {
    const int64_t begin = t0 * kChunk, end = std::min(n, t1 * kChunk);  // chunks of whole words
    switch (isa) {
#if BK_X86
      case Isa::Avx512: interval_bits_avx512(a, begin, end); break;
      case Isa::Avx2: interval_bits_avx2(a, begin, end); break;
#endif
      default: interval_bits_scalar(a, begin, end);
    }
  });
}

void run_masked_grad(const MaskedGradArgs& a, int64_t n, const std::string& isa_name, int threads) {
  const Isa isa = parse_isa(isa_name);
  parallel_for((n + kChunk - 1) / kChunk, threads, 1, [&](int64_t t0, int64_t t1) {
    const int64_t begin = t0 * kChunk, end = std::min(n, t1 * kChunk);
    switch (isa) {
#if BK_X86
      case Isa::Avx512: masked_grad_avx512(a, begin, end); break;
      case Isa::Avx2: masked_grad_avx2(a, begin, end); break;
#endif
      default: masked_grad_scalar(a, begin, end);
    }
  });
}

}  // namespace bk
