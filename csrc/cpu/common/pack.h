// Activation packing job: float [B, C, H, W] -> zero-padded NHWC bit planes, one plane per base n.
// The per-ISA row packers live in scalar/, avx2/ and avx512/; pack.cpp walks the rows and builds the
// folded planes.
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/common/isa.h"

namespace bk {

// Activation binarization mode (docs/architecture.md): sign: bit = x >= 0; hv: bit = fl32(x + v) >= 0.5.
enum PackMode { kModeSign = 0, kModeHv = 1 };

inline bool bit_of(float x, int mode, float v) {
  if (mode == kModeSign) return x >= 0.0f;
  const float s = x + v;  // the sum is rounded to float32 on purpose (bit convention)
  return s >= 0.5f;
}

// Packs float activations [B, C, H, W] (NCHW or channels_last physical layout) into
// dst [N][B][H + 2ph][W + 2pw][chan_words] uint64 words, one base per shift v[n]; padded words are zero.
struct PackJob {
  const float* x;
  int64_t B, C, H, W;
  bool channels_last;
  int mode;
  const float* v;  // [N] shifts (mode hv); ignored for mode sign
  int64_t N;
  uint64_t* dst;
  int64_t ph, pw;
  int64_t chan_words, Hp, Wp;
  // Tap folding (chan_words == 1 only): fold_dst[f][q] = OR_{u < fold_taps[f]} word[q + u] << (u * C),
  // same layout as dst. fold_count = 0, 1 or 2 folded planes.
  int fold_count;
  int64_t fold_taps[2];
  uint64_t* fold_dst[2];
  // Small-channel engine (C <= 32, AVX-512): dst holds one 2- or 4-byte element per pixel instead of
  // chan_words words (bit c = channel c), no folding. 8: the word layout above.
  int elem_bytes = 8;
};

inline float x_at(const PackJob& j, int64_t b, int64_t c, int64_t h, int64_t w) {
  return j.channels_last ? j.x[((b * j.H + h) * j.W + w) * j.C + c]
                         : j.x[((b * j.C + c) * j.H + h) * j.W + w];
}

// Walks padded rows [r0, r1) of the flattened (b, hp) row index space for every base n of job.dst
// (elements of T, per_pixel of them per pixel): padding rows and padding columns are zeroed, image row h
// is filled by pack_row(n, b, h, row) (row: the padded row's first element), which returns true when it
// read a NaN. Returns the OR of those results.
template <typename T, typename PackRow>
bool for_each_padded_row(const PackJob& j, int64_t r0, int64_t r1, int64_t per_pixel, PackRow pack_row) {
  bool nan = false;
  const int64_t pad = j.pw * per_pixel;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / j.Hp, hp = r % j.Hp, h = hp - j.ph;
    for (int64_t n = 0; n < j.N; ++n) {
      T* row = reinterpret_cast<T*>(j.dst) + ((n * j.B + b) * j.Hp + hp) * j.Wp * per_pixel;
      if (h < 0 || h >= j.H) {
        std::memset(row, 0, sizeof(T) * j.Wp * per_pixel);
        continue;
      }
      std::memset(row, 0, sizeof(T) * pad);
      std::memset(row + (j.pw + j.W) * per_pixel, 0, sizeof(T) * pad);
      nan |= pack_row(n, b, h, row);
    }
  }
  return nan;
}

// Packs padded rows [r0, r1) of the flattened (b, hp) row index space, all N bases, word layout
// (elem_bytes 8), then the folded planes. Returns true when one of the x values read (base 0) is NaN.
bool pack_rows(const PackJob& job, Isa isa, int64_t r0, int64_t r1);

}  // namespace bk
