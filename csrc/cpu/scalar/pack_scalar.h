// Portable packing of a pixel range (also the AVX2 packer's tail).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/common/pack.h"

namespace bk {

// Scalar packing of pixels [w0, w1) of image row (b, h) for base n into row (interior offset applied).
// Returns true when kNan and one of the values read is NaN.
template <bool kNan>
bool pack_pixels_scalar(const PackJob& j, int64_t n, int64_t b, int64_t h, int64_t w0, int64_t w1,
                        uint64_t* row) {
  const float v = j.mode == kModeHv ? j.v[n] : 0.0f;
  bool nan = false;
  for (int64_t w = w0; w < w1; ++w) {
    uint64_t* out = row + (j.pw + w) * j.chan_words;
    for (int64_t g = 0; g < j.chan_words; ++g) {
      const int64_t c0 = g * 64, c1 = std::min(j.C, c0 + 64);
      uint64_t word = 0;
      for (int64_t c = c0; c < c1; ++c) {
        const float xv = x_at(j, b, c, h, w);
        if (kNan) nan |= std::isnan(xv);
        word |= static_cast<uint64_t>(bit_of(xv, j.mode, v)) << (c - c0);
      }
      out[g] = word;
    }
  }
  return nan;
}

}  // namespace bk
