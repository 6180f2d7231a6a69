// Portable STE backward passes (also the vector loops' tails); the arithmetic is engine.h's.
#include <algorithm>
#include <cmath>

#include "cpu/common/kernels.h"

namespace bk {

void ste_grad_x_scalar(const SteGradArgs& a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float x = a.x[i], g = a.g[i];
    float acc;
    if (a.v == nullptr) {
      acc = std::fabs(x) <= 1.0f ? g * a.beta[0] : 0.0f;
    } else {
      acc = 0.0f;
      for (int k = 0; k < a.num_act; ++k) {
        const float s = x + a.v[k];
        const float t = (s >= 0.0f && s <= 1.0f) ? g * a.beta[k] : 0.0f;
        acc = k == 0 ? t : acc + t;
      }
    }
    a.dst[i] = acc;
  }
}

void clamp_grad_scalar(const float* g, const float* out, float lo, float hi, float* dst, int64_t begin,
                       int64_t end) {
  for (int64_t i = begin; i < end; ++i) dst[i] = (out[i] > lo && out[i] < hi) ? g[i] : 0.0f;
}

void interval_bits_scalar(const IntervalBitsArgs& a, int64_t begin, int64_t end) {
  for (int k = 0; k < a.num_masks; ++k) {
    uint8_t* bytes = reinterpret_cast<uint8_t*>(a.dst + k * a.words);
    for (int64_t i = begin; i < end; i += 8) {
      uint8_t byte = 0;
      for (int64_t j = i; j < std::min(end, i + 8); ++j) {
        const float s = a.shift == nullptr ? a.src[j] : a.src[j] + a.shift[k];
        const bool in = a.open ? (s > a.lo && s < a.hi) : (s >= a.lo && s <= a.hi);
        byte = static_cast<uint8_t>(byte | (uint8_t(in) << (j - i)));
      }
      bytes[i / 8] = byte;
    }
  }
}

void masked_grad_scalar(const MaskedGradArgs& a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float g = a.g[i];
    float acc = 0.0f;
    for (int k = 0; k < a.num_masks; ++k) {
      const bool in = (a.bits[k * a.words + i / 64] >> (i % 64)) & 1u;
      const float t = in ? (a.scale == nullptr ? g : g * a.scale[k]) : 0.0f;
      acc = k == 0 ? t : acc + t;
    }
    a.dst[i] = acc;
  }
}

}  // namespace bk
