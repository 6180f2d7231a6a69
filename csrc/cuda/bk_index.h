// Index math and the zero-padding correction shared by the CUDA kernels and host code.
//
// Compiles as plain C++ (g++) and as CUDA (nvcc): host tests check these helpers against brute force.
// Conventions (docs/architecture.md): channel c lives in word c / 64, bit c % 64; bit 1 means +1.
// The conv kernel reads activations from a zero-padded buffer: a zero word stands for 64 channels of
// -1, so a padded tap adds tap_value = C - 2 * popcount(w_tap) instead of 0. That sum over the padded
// taps of an output position is the correction subtracted afterwards.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BK_HD __host__ __device__ __forceinline__
#else
#define BK_HD inline
#endif

namespace bk {

// Output extent of a convolution along one axis (floor mode, like F.conv2d).
BK_HD int out_size(int in, int kernel, int stride, int pad) { return (in + 2 * pad - kernel) / stride + 1; }

// Number of 64-bit words holding `channels` bits.
BK_HD int words_for(int channels) { return (channels + 63) / 64; }

BK_HD int popcount64(uint64_t w) {
#if defined(__CUDA_ARCH__)
  return __popcll(w);
#else
  return __builtin_popcountll(w);
#endif
}

// Taps k in [lo, hi) of output index o read real input (0 <= o*stride - pad + k < in); the others
// read padding. lo <= hi always (an all-padding window gives lo == hi).
BK_HD void valid_taps(int o, int stride, int pad, int kernel, int in, int* lo, int* hi) {
  const int start = o * stride - pad;
  int l = start < 0 ? -start : 0;
  int h = in - start;
  if (h > kernel) h = kernel;
  if (l > kernel) l = kernel;
  if (h < l) h = l;
  *lo = l;
  *hi = h;
}

// +-1 dot product of one weight tap (kw_words words, `channels` valid bits) with an all -1 activation
// (zero word): C - 2 * popcount(w).
BK_HD int zero_tap_value(const uint64_t* w_tap, int kw_words, int channels) {
  int pop = 0;
  for (int k = 0; k < kw_words; ++k) pop += popcount64(w_tap[k]);
  return channels - 2 * pop;
}

// Sum of table[kh * kw_size + kw] over the taps outside the valid window [kh_lo, kh_hi) x
// [kw_lo, kw_hi): what the padded taps added when computed from zero words.
BK_HD int padded_tap_correction(const int32_t* table, int kh_size, int kw_size, int kh_lo, int kh_hi,
                                int kw_lo, int kw_hi) {
  if (kh_lo == 0 && kh_hi == kh_size && kw_lo == 0 && kw_hi == kw_size) return 0;  // interior
  int sum = 0;
  for (int kh = 0; kh < kh_size; ++kh) {
    const bool row_in = kh >= kh_lo && kh < kh_hi;
    for (int kw = 0; kw < kw_size; ++kw) {
      if (!(row_in && kw >= kw_lo && kw < kw_hi)) sum += table[kh * kw_size + kw];
    }
  }
  return sum;
}

}  // namespace bk
