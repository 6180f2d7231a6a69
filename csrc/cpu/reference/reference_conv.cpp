#include "cpu/reference/reference_conv.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/common/pack.h"

namespace bk {

int reference_mbn_conv2d(const ConvArgs& a) {
  const int64_t N = a.mode == kModeSign ? 1 : a.N;
  const int64_t OH = (a.H + 2 * a.ph - a.KH) / a.sh + 1, OW = (a.W + 2 * a.pw - a.KW) / a.sw + 1;
  if (OH <= 0 || OW <= 0 || a.B * OH * OW == 0) return 0;
  const int64_t P = a.B * OH * OW, words = (a.C + 63) / 64;
  const auto x_at = [&](int64_t b, int64_t c, int64_t h, int64_t w) {
    return a.channels_last ? a.x[((b * a.H + h) * a.W + w) * a.C + c] : a.x[((b * a.C + c) * a.H + h) * a.W + w];
  };
  for (int64_t i = 0; i < a.B * a.C * a.H * a.W; ++i)
    if (std::isnan(a.x[i])) return kXHasNan;
  // +-1 activations per base and +-1 weights.
  std::vector<int8_t> act(N * a.B * a.C * a.H * a.W);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t c = 0; c < a.C; ++c)
        for (int64_t h = 0; h < a.H; ++h)
          for (int64_t w = 0; w < a.W; ++w)
            act[(((n * a.B + b) * a.C + c) * a.H + h) * a.W + w] =
                bit_of(x_at(b, c, h, w), a.mode, a.mode == kModeHv ? a.v[n] : 0.0f) ? 1 : -1;
  const auto wsign = [&](int64_t m, int64_t co, int64_t c, int64_t kh, int64_t kw) {
    const uint64_t word = a.w[(((m * a.Co + co) * a.KH + kh) * a.KW + kw) * words + c / 64];
    return (word >> (c % 64)) & 1 ? 1 : -1;
  };
  int flags = 0;
  std::vector<int32_t> dot(a.M * N);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow)
        for (int64_t co = 0; co < a.Co; ++co) {
          const int64_t pix = (b * OH + oh) * OW + ow;
          for (int64_t m = 0; m < a.M; ++m)
            for (int64_t n = 0; n < N; ++n) {
              int32_t s = 0;
              for (int64_t kh = 0; kh < a.KH; ++kh)
                for (int64_t kw = 0; kw < a.KW; ++kw) {
                  const int64_t h = oh * a.sh - a.ph + kh, w = ow * a.sw - a.pw + kw;
                  if (h < 0 || h >= a.H || w < 0 || w >= a.W) continue;
                  for (int64_t c = 0; c < a.C; ++c)
                    s += act[(((n * a.B + b) * a.C + c) * a.H + h) * a.W + w] * wsign(m, co, c, kh, kw);
                }
              dot[m * N + n] = s;
              if (a.pairs) a.pairs[((m * N + n) * P + pix) * a.Co + co] = s;
            }
          if (!a.out) continue;
          float y = 0.0f;
          for (int64_t n = 0; n < N; ++n)
            for (int64_t m = 0; m < a.M; ++m) {
              const float scale = a.alpha[m * a.Co + co] * a.beta[n];
              const float term = scale * static_cast<float>(dot[m * N + n]);
              y = (n == 0 && m == 0) ? term : y + term;
            }
          if (a.bias) y = y + a.bias[co];
          if (a.residual) {
            const float r = a.residual[pix * a.Co + co];
            if (!std::isfinite(r)) flags |= kResidualNonFinite;
            y = y + r;
          }
          y = std::min(std::max(y, a.clamp_lo), a.clamp_hi);
          a.out[pix * a.Co + co] = y;
        }
  return flags;
}

}  // namespace bk
