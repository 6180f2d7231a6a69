// Portable word engine: the XNOR-popcount GEMM with __builtin_popcountll, R = 4 pixels per block. The
// same loop order as the vector engines (n ascending, then m, then co), so the float sums match them.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/common/kernels.h"
#include "cpu/common/output_transform.h"
#include "cpu/common/pixel_cursor.h"

namespace bk {

void conv_blocks_scalar(const ConvPlan& p, int64_t pix_begin, int64_t pix_end) {
  const ConvGeometry& g = p.geo;
  const int64_t R = p.gemm.block, cols = p.gemm.cols;
  std::vector<uint64_t> acc(cols);
  std::vector<int64_t> off(R);
  std::vector<int32_t> cls(R);
  PixelCursor cursor(p, pix_begin);
  for (int64_t pix0 = pix_begin; pix0 < pix_end; pix0 += R) {
    const int64_t npix = std::min(R, pix_end - pix0);
    cursor.next(npix, R, off.data(), cls.data());
    if (p.out) std::memset(p.out + pix0 * g.Co, 0, sizeof(float) * npix * g.Co);
    for (int64_t n = 0; n < g.N; ++n) {
      const uint64_t* an = p.ops.act + n * p.ops.plane;
      const float* sc = p.ops.scale + n * cols;
      for (int64_t i = 0; i < npix; ++i) {
        std::fill(acc.begin(), acc.end(), 0);
        for (int64_t k = 0; k < p.gemm.depth; ++k) {
          const uint64_t a = an[off[i] + p.ops.koff[k]];
          const uint64_t* wrow = p.ops.wt + k * cols;
          for (int64_t col = 0; col < cols; ++col) acc[col] += __builtin_popcountll(a ^ wrow[col]);
        }
        const int64_t pix = pix0 + i;
        const int32_t* base = p.pad.base + cls[i] * cols;
        for (int64_t m = 0; m < g.M; ++m) {
          const bool last = p.epi.fused && n == g.N - 1 && m == g.M - 1;
          for (int64_t co = 0; co < g.Co; ++co) {
            const int64_t col = m * p.gemm.co_padded + co;
            const int32_t dot = base[col] - 2 * static_cast<int32_t>(acc[col]);
            if (p.pairs) p.pairs[((m * g.N + n) * g.P + pix) * g.Co + co] = dot;
            if (!p.out) continue;
            float& o = p.out[pix * g.Co + co];
            o += sc[col] * static_cast<float>(dot);
            if (last) o = epilogue_value(p.epi, g.Co, o, pix, co);
          }
        }
      }
    }
  }
}

}  // namespace bk
