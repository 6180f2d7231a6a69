// Multi-base XNOR-popcount convolution (bk_cuda.h): one thread per output position, kCoTile output
// channels per thread; weight words of the channel tile are staged in shared memory (every thread of
// a block reads the same word: a broadcast), activation words come from the zero-padded buffer, so
// the inner loop has no bounds checks. Border positions subtract the padded-tap correction. The float
// epilogue sums the base pairs n-outer, m-inner, rounding like the CPU engine (bit-identical out).
#include <cuda_runtime.h>

#include "bk_cuda.h"
#include "bk_index.h"

namespace {

constexpr int kThreads = 128;
constexpr int kCoTile = 8;
constexpr int kStageWords = 512;  // words per channel staged at a time: 8 * 512 * 8 B = 32 KiB

__global__ void __launch_bounds__(kThreads)
mbn_conv_kernel(const uint64_t* __restrict__ xpad, const uint64_t* __restrict__ w,
                const int32_t* __restrict__ table, const float* __restrict__ alpha,
                const float* __restrict__ beta, float* __restrict__ out, int32_t* __restrict__ pairs,
                int M, int N, int B, int C, int H, int W, int Co, int KH, int KW, int SH, int SW, int PH,
                int PW, int OH, int OW, int kw_words) {
  __shared__ uint64_t w_s[kCoTile * kStageWords];
  const int64_t positions = static_cast<int64_t>(B) * OH * OW;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = p < positions;
  const int co0 = blockIdx.y * kCoTile;
  const int taps = KH * KW;
  const int hp = H + 2 * PH;
  const int wp = W + 2 * PW;
  int b = 0, oh = 0, ow = 0;
  if (active) {
    b = static_cast<int>(p / (static_cast<int64_t>(OH) * OW));
    const int rem = static_cast<int>(p % (static_cast<int64_t>(OH) * OW));
    oh = rem / OW;
    ow = rem % OW;
  }
  int kh_lo, kh_hi, kw_lo, kw_hi;
  bk::valid_taps(oh, SH, PH, KH, H, &kh_lo, &kh_hi);
  bk::valid_taps(ow, SW, PW, KW, W, &kw_lo, &kw_hi);
  // Staging: word chunks within a tap (kc words), whole taps per stage (tt taps).
  const int kc = kw_words < kStageWords ? kw_words : kStageWords;
  const int tt = kStageWords / kc;
  const int full_count = taps * C;

  float acc_out[kCoTile];
#pragma unroll
  for (int j = 0; j < kCoTile; ++j) acc_out[j] = 0.0f;

  // Base pairs n-outer, m-inner (docs/architecture.md): out = sum_n sum_m fl32(alpha[m,co] * beta[n]) *
  // count_mn, each product and sum rounded to float32 in that order, like the CPU and torch backends.
  for (int n = 0; n < N; ++n) {
    for (int m = 0; m < M; ++m) {
      int pop[kCoTile];
#pragma unroll
      for (int j = 0; j < kCoTile; ++j) pop[j] = 0;
      const uint64_t* x_img = xpad + (static_cast<int64_t>(n) * B + b) * hp * wp * kw_words;
      for (int t0 = 0; t0 < taps; t0 += tt) {
        const int t_count = min(tt, taps - t0);
        for (int k0 = 0; k0 < kw_words; k0 += kc) {
          const int k_count = min(kc, kw_words - k0);
          const int stage = t_count * k_count;
          __syncthreads();  // previous stage fully consumed
          for (int i = threadIdx.x; i < kCoTile * stage; i += blockDim.x) {
            const int j = i / stage;
            const int r = i % stage;
            const int co = co0 + j;
            const int t = t0 + r / k_count;
            const int k = k0 + r % k_count;
            w_s[j * kStageWords + r] =
                co < Co ? w[((static_cast<int64_t>(m) * Co + co) * taps + t) * kw_words + k] : 0ull;
          }
          __syncthreads();
          if (active) {
            for (int ti = 0; ti < t_count; ++ti) {
              const int t = t0 + ti;
              const int kh = t / KW;
              const int kw = t % KW;
              const uint64_t* x_tap =
                  x_img + (static_cast<int64_t>(oh * SH + kh) * wp + ow * SW + kw) * kw_words + k0;
              for (int kk = 0; kk < k_count; ++kk) {
                const uint64_t xw = __ldg(x_tap + kk);
                const int r = ti * k_count + kk;
#pragma unroll
                for (int j = 0; j < kCoTile; ++j) pop[j] += __popcll(xw ^ w_s[j * kStageWords + r]);
              }
            }
          }
        }
      }
      if (active) {
        const float beta_n = out != nullptr ? beta[n] : 0.0f;
#pragma unroll
        for (int j = 0; j < kCoTile; ++j) {
          const int co = co0 + j;
          if (co >= Co) continue;
          const int64_t row = static_cast<int64_t>(m) * Co + co;
          const int count = full_count - 2 * pop[j] -
                            bk::padded_tap_correction(table + row * taps, KH, KW, kh_lo, kh_hi, kw_lo, kw_hi);
          if (pairs != nullptr) {
            const int64_t dst = ((((static_cast<int64_t>(m) * N + n) * B + b) * Co + co) * OH + oh) * OW + ow;
            pairs[dst] = count;
          }
          if (out != nullptr) {
            // explicit rounding (no FMA contraction): the same float32 result as the CPU / Triton
            // epilogue, fast-math or not
            const float scale = __fmul_rn(alpha[row], beta_n);
            acc_out[j] = __fadd_rn(acc_out[j], __fmul_rn(scale, static_cast<float>(count)));
          }
        }
      }
    }
  }
  if (active && out != nullptr) {
#pragma unroll
    for (int j = 0; j < kCoTile; ++j) {
      const int co = co0 + j;
      if (co < Co) out[((static_cast<int64_t>(b) * Co + co) * OH + oh) * OW + ow] = acc_out[j];
    }
  }
}

}  // namespace

extern "C" int bk_cuda_mbn_conv(const int64_t* xpad, const int64_t* w, const int32_t* table, const float* alpha,
                                const float* beta, float* out, int32_t* pairs, int M, int N, int B, int C, int H,
                                int W, int Co, int KH, int KW, int SH, int SW, int PH, int PW, void* stream) {
  if (M < 1 || N < 1 || B < 0 || C < 1 || Co < 0 || KH < 1 || KW < 1 || SH < 1 || SW < 1 || PH < 0 || PW < 0)
    return cudaErrorInvalidValue;
  if (out != nullptr && (alpha == nullptr || beta == nullptr)) return cudaErrorInvalidValue;
  if (out == nullptr && pairs == nullptr) return cudaErrorInvalidValue;
  const int OH = bk::out_size(H, KH, SH, PH);
  const int OW = bk::out_size(W, KW, SW, PW);
  if (OH <= 0 || OW <= 0) return cudaErrorInvalidValue;
  const int64_t positions = static_cast<int64_t>(B) * OH * OW;
  if (positions == 0 || Co == 0) return cudaSuccess;
  const int64_t blocks_x = (positions + kThreads - 1) / kThreads;
  const int blocks_y = (Co + kCoTile - 1) / kCoTile;
  if (blocks_x > 0x7fffffff || blocks_y > 65535) return cudaErrorInvalidConfiguration;
  dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  mbn_conv_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const uint64_t*>(xpad), reinterpret_cast<const uint64_t*>(w), table, alpha, beta, out,
      pairs, M, N, B, C, H, W, Co, KH, KW, SH, SW, PH, PW, OH, OW, bk::words_for(C));
  return cudaGetLastError();
}
