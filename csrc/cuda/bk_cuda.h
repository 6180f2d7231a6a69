// extern "C" launchers of the bitkern CUDA kernels, on raw device pointers (no torch).
//
// Every launcher enqueues on `stream` (a cudaStream_t passed as void*, nullptr = legacy default
// stream) and returns a cudaError_t as int (0 = success); bk_cuda_error_string turns it into text.
// Layouts: docs/architecture.md (int64 words, channel c in word c / 64, bit c % 64, bit 1 = +1).
#pragma once

#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

#define BK_MODE_SIGN 0
#define BK_MODE_HV 1

// x float [B, C, H, W] -> out int64 [n_shifts, B, H + 2 pad_h, W + 2 pad_w, ceil(C / 64)].
// mode BK_MODE_SIGN: bit = x >= 0 (n_shifts must be 1, v unused); BK_MODE_HV: bit = fl32(x + v[n]) >= 0.5
// with v a device array of n_shifts floats. The padding border is written as zero words.
int bk_cuda_pack_signs(const float* x, int64_t* out, int mode, const float* v, int n_shifts, int B, int C,
                       int H, int W, int pad_h, int pad_w, void* stream);

// w int64 [rows, taps, kw_words] -> table int32 [rows, taps]: C - 2 * popcount(w[row, tap, :]), the value
// a padded (zero-word) tap adds; the conv subtracts it back at border positions.
int bk_cuda_tap_table(const int64_t* w, int32_t* table, int rows, int taps, int kw_words, int channels,
                      void* stream);

// Multi-base XNOR-popcount convolution.
//   xpad  int64 [N, B, H + 2 PH, W + 2 PW, Kw] from bk_cuda_pack_signs with pad (PH, PW)
//   w     int64 [M, Co, KH, KW, Kw], table int32 [M, Co, KH, KW] from bk_cuda_tap_table
//   alpha float [M, Co], beta float [N]: used only when out != nullptr
//   out   float [B, Co, OH, OW] = sum_m sum_n (alpha[m, co] * beta[n]) * count (m-major, n-minor, fp32,
//         each product and sum rounded to nearest) or nullptr
//   pairs int32 [M, N, B, Co, OH, OW]: exact +-1 conv counts, or nullptr
int bk_cuda_mbn_conv(const int64_t* xpad, const int64_t* w, const int32_t* table, const float* alpha,
                     const float* beta, float* out, int32_t* pairs, int M, int N, int B, int C, int H, int W,
                     int Co, int KH, int KW, int SH, int SW, int PH, int PW, void* stream);

// Number of visible CUDA devices in *count; returns the cudaError_t of cudaGetDeviceCount.
int bk_cuda_device_count(int* count);

const char* bk_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
