// Portable STE backward passes (also the vector loops' tails); the arithmetic is engine.h's.
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

}  // namespace bk
