// Sign packing and the padded-tap table (bk_cuda.h).
#include <cuda_runtime.h>

#include "bk_cuda.h"
#include "bk_index.h"

namespace {

constexpr int kThreads = 256;

// One thread per output word; w is the fastest index so that neighbouring threads read neighbouring
// floats of one channel plane (coalesced), which matters more than the 64x fewer word writes.
__global__ void pack_signs_kernel(const float* __restrict__ x, int64_t* __restrict__ out, int mode,
                                  const float* __restrict__ v, int B, int C, int H, int W, int pad_h,
                                  int pad_w, int kw_words, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int w = static_cast<int>(idx % W);
  int64_t rest = idx / W;
  const int h = static_cast<int>(rest % H);
  rest /= H;
  const int k = static_cast<int>(rest % kw_words);
  rest /= kw_words;
  const int b = static_cast<int>(rest % B);
  const int n = static_cast<int>(rest / B);
  const float shift = mode == BK_MODE_HV ? v[n] : 0.0f;
  const int64_t plane = static_cast<int64_t>(H) * W;
  const float* src = x + (static_cast<int64_t>(b) * C) * plane + static_cast<int64_t>(h) * W + w;
  const int c0 = k * 64;
  const int c_end = min(C, c0 + 64);
  uint64_t word = 0;
  for (int c = c0; c < c_end; ++c) {
    const float value = src[c * plane];
    // __fadd_rn: never contracted or flushed by --use_fast_math, so fl32(x + v) as in the reference.
    const bool plus = mode == BK_MODE_HV ? __fadd_rn(value, shift) >= 0.5f : value >= 0.0f;
    word |= static_cast<uint64_t>(plus) << (c - c0);
  }
  const int hp = H + 2 * pad_h;
  const int wp = W + 2 * pad_w;
  const int64_t dst = (((static_cast<int64_t>(n) * B + b) * hp + h + pad_h) * wp + w + pad_w) * kw_words + k;
  out[dst] = static_cast<int64_t>(word);
}

__global__ void tap_table_kernel(const int64_t* __restrict__ w, int32_t* __restrict__ table, int64_t total,
                                 int kw_words, int channels) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  table[idx] = bk::zero_tap_value(reinterpret_cast<const uint64_t*>(w) + idx * kw_words, kw_words, channels);
}

}  // namespace

extern "C" int bk_cuda_pack_signs(const float* x, int64_t* out, int mode, const float* v, int n_shifts, int B,
                                  int C, int H, int W, int pad_h, int pad_w, void* stream) {
  if (B < 0 || C < 1 || H < 0 || W < 0 || pad_h < 0 || pad_w < 0 || n_shifts < 1) return cudaErrorInvalidValue;
  if (mode != BK_MODE_SIGN && mode != BK_MODE_HV) return cudaErrorInvalidValue;
  if (mode == BK_MODE_SIGN && n_shifts != 1) return cudaErrorInvalidValue;
  if (mode == BK_MODE_HV && v == nullptr) return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int kw_words = bk::words_for(C);
  const int64_t padded = static_cast<int64_t>(n_shifts) * B * (H + 2 * pad_h) * (W + 2 * pad_w) * kw_words;
  if (padded == 0) return cudaSuccess;
  if (pad_h > 0 || pad_w > 0) {
    cudaError_t err = cudaMemsetAsync(out, 0, padded * sizeof(int64_t), s);
    if (err != cudaSuccess) return err;
  }
  const int64_t total = static_cast<int64_t>(n_shifts) * B * kw_words * H * W;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  pack_signs_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(x, out, mode, v, B, C, H, W, pad_h,
                                                                       pad_w, kw_words, total);
  return cudaGetLastError();
}

extern "C" int bk_cuda_tap_table(const int64_t* w, int32_t* table, int rows, int taps, int kw_words, int channels,
                                 void* stream) {
  if (rows < 0 || taps < 1 || kw_words != bk::words_for(channels)) return cudaErrorInvalidValue;
  const int64_t total = static_cast<int64_t>(rows) * taps;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  tap_table_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      w, table, total, kw_words, channels);
  return cudaGetLastError();
}

extern "C" int bk_cuda_device_count(int* count) {
  *count = 0;
  cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) *count = 0;
  return err;
}

extern "C" const char* bk_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
