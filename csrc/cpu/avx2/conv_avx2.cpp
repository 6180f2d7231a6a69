// AVX2 XNOR-popcount GEMM: R=3 pixels x 2 ymm (8 columns). Popcount with the nibble LUT (vpshufb)
// into byte counters, folded into 64-bit counters with vpsadbw every 31 depth steps (31 * 8 < 256).
#include "cpu/common/kernels.h"

#if BK_X86
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/common/output_transform.h"
#include "cpu/common/pixel_cursor.h"

namespace bk {
namespace {

constexpr int kR = 3, kNV = 2;

BK_TARGET_AVX2 void tile(const ConvPlan& p, int64_t n, int64_t pix0, int64_t npix, const int64_t* off,
                         const int32_t* cls, int64_t col0) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1,
                                       2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  __m256i acc64[kR][kNV];
  for (int i = 0; i < kR; ++i)
    for (int v = 0; v < kNV; ++v) acc64[i][v] = zero;
  const uint64_t* w = p.ops.wt + col0;
  const uint64_t* an = p.ops.act + n * p.ops.plane;
  for (int64_t k0 = 0; k0 < p.gemm.depth; k0 += 31) {
    const int64_t k1 = std::min<int64_t>(p.gemm.depth, k0 + 31);
    __m256i acc8[kR][kNV];
    for (int i = 0; i < kR; ++i)
      for (int v = 0; v < kNV; ++v) acc8[i][v] = zero;
    for (int64_t k = k0; k < k1; ++k, w += p.gemm.cols) {
      const uint64_t* ak = an + p.ops.koff[k];
      const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w));
      const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + 4));
#pragma GCC unroll 3
      for (int i = 0; i < kR; ++i) {
        const __m256i av = _mm256_set1_epi64x(static_cast<long long>(ak[off[i]]));
        const __m256i x0 = _mm256_xor_si256(av, w0), x1 = _mm256_xor_si256(av, w1);
        const __m256i c0 = _mm256_add_epi8(
            _mm256_shuffle_epi8(lut, _mm256_and_si256(x0, low4)),
            _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x0, 4), low4)));
        const __m256i c1 = _mm256_add_epi8(
            _mm256_shuffle_epi8(lut, _mm256_and_si256(x1, low4)),
            _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x1, 4), low4)));
        acc8[i][0] = _mm256_add_epi8(acc8[i][0], c0);
        acc8[i][1] = _mm256_add_epi8(acc8[i][1], c1);
      }
    }
    for (int i = 0; i < kR; ++i)
      for (int v = 0; v < kNV; ++v)
        acc64[i][v] = _mm256_add_epi64(acc64[i][v], _mm256_sad_epu8(acc8[i][v], zero));
  }
  // Epilogue (8 columns of one weight base, since co_padded is a multiple of 8).
  const int64_t g = col0 / 8, m = p.ops.col_m[g], co0 = p.ops.col_co[g];
  const int64_t nvalid = std::min<int64_t>(8, p.geo.Co - co0);
  const float* sc = p.ops.scale + n * p.gemm.cols + col0;
  // Columns are visited n-major then m ascending, so (N-1, M-1) is each output's last contribution.
  const bool last = p.epi.fused && n == p.geo.N - 1 && m == p.geo.M - 1;
  alignas(32) uint64_t pc[8];
  for (int i = 0; i < kR && i < npix; ++i) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(pc), acc64[i][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(pc + 4), acc64[i][1]);
    const int64_t pix = pix0 + i;
    const int32_t* base = p.pad.base + cls[i] * p.gemm.cols + col0;
    int32_t* pr = p.pairs ? p.pairs + ((m * p.geo.N + n) * p.geo.P + pix) * p.geo.Co + co0 : nullptr;
    float* o = p.out ? p.out + pix * p.geo.Co + co0 : nullptr;
    for (int64_t c = 0; c < nvalid; ++c) {
      const int32_t dot = base[c] - 2 * static_cast<int32_t>(pc[c]);
      if (pr) pr[c] = dot;
      if (!o) continue;
      o[c] += sc[c] * static_cast<float>(dot);
      if (last) o[c] = epilogue_value(p.epi, p.geo.Co, o[c], pix, co0 + c);
    }
  }
}

}  // namespace

BK_TARGET_AVX2 void conv_blocks_avx2(const ConvPlan& p, int64_t pix_begin, int64_t pix_end) {
  int64_t off[kR];
  int32_t cls[kR];
  PixelCursor cursor(p, pix_begin);
  for (int64_t pix0 = pix_begin; pix0 < pix_end; pix0 += kR) {
    const int64_t npix = std::min<int64_t>(kR, pix_end - pix0);
    cursor.next(npix, kR, off, cls);
    if (p.out) std::memset(p.out + pix0 * p.geo.Co, 0, sizeof(float) * npix * p.geo.Co);
    for (int64_t n = 0; n < p.geo.N; ++n)
      for (int64_t col0 = 0; col0 < p.gemm.cols; col0 += 8) tile(p, n, pix0, npix, off, cls, col0);
  }
}

}  // namespace bk
#endif
