// AVX-512 (F/BW/DQ/VL + VPOPCNTDQ) XNOR-popcount GEMM microkernel: R pixels x NV zmm (8 columns
// each) of 64-bit popcount accumulators; one broadcast activation word per pixel and depth step is used
// against all NV weight vectors. Epilogue (padding correction, alpha*beta scaling, channels_last
// accumulation, exact per-pair values) is fused in registers.
#include "cpu/common/kernels.h"

#if BK_X86
#include <immintrin.h>

// GCC 12 warns spuriously inside avx512fintrin.h (_mm512_cvtepi64_epi32 undefined source operand).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <algorithm>

#include "cpu/avx512/epilogue_avx512.h"
#include "cpu/common/pixel_cursor.h"

namespace bk {
namespace {

template <int R, int NV>
BK_TARGET_AVX512 void tile(const ConvPlan& p, int64_t n, int64_t pix0, int64_t npix, const int64_t* off,
                           const int32_t* cls, int64_t col0) {
  __m512i acc[R][NV];
#pragma GCC unroll 32
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_si512();
  const uint64_t* w = p.ops.wt + col0;
  const uint64_t* an = p.ops.act + n * p.ops.plane;
  const int64_t cols = p.gemm.cols;
  for (int64_t k = 0; k < p.gemm.depth; ++k, w += cols) {
    __m512i wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_si512(w + 8 * v);
    const uint64_t* ak = an + p.ops.koff[k];
#pragma GCC unroll 32
    for (int i = 0; i < R; ++i) {
      const __m512i av = _mm512_set1_epi64(static_cast<long long>(ak[off[i]]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        acc[i][v] = _mm512_add_epi64(acc[i][v], _mm512_popcnt_epi64(_mm512_xor_si512(av, wv[v])));
    }
  }
  // Epilogue in registers. Columns of one zmm belong to one weight base m (co_padded is a multiple of 8); two
  // zmm of the same m are narrowed together into one 16-lane int32 vector (one vpermt2d). The first
  // contribution to an output (n == 0, m == 0) stores, later ones accumulate: no zero-fill needed.
  // blocks() runs n ascending and column groups (m-major) ascending, so the last contribution is
  // n == N-1, m == M-1: it adds the bias, then the residual, and clamps (fused epilogue).
  constexpr int NS = (NV + 1) / 2;  // segments when the vectors pair up
  bool paired = true;
#pragma GCC unroll 4
  for (int v = 0; v + 1 < NV; v += 2) paired &= p.ops.col_m[col0 / 8 + v] == p.ops.col_m[col0 / 8 + v + 1];
  const __m512i narrow = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  if (paired) {
    Segment seg[NS];
#pragma GCC unroll 4
    for (int s = 0; s < NS; ++s) seg[s] = segment(p, n, col0 + 16 * s, 2 * s + 1 < NV ? 16 : 8);
#pragma GCC unroll 32
    for (int i = 0; i < R; ++i) {
      if (i >= npix) break;
#pragma GCC unroll 4
      for (int s = 0; s < NS; ++s) {
        const int v1 = 2 * s + 1 < NV ? 2 * s + 1 : 2 * s;
        store_segment(p, seg[s], _mm512_permutex2var_epi32(acc[i][2 * s], narrow, acc[i][v1]), pix0 + i, cls[i]);
      }
    }
    return;
  }
  Segment seg[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) seg[v] = segment(p, n, col0 + 8 * v, 8);
#pragma GCC unroll 32
  for (int i = 0; i < R; ++i) {
    if (i >= npix) break;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      store_segment(p, seg[v], _mm512_castsi256_si512(_mm512_cvtepi64_epi32(acc[i][v])), pix0 + i, cls[i]);
  }
}

template <int R>
BK_TARGET_AVX512 void blocks(const ConvPlan& p, int64_t pix_begin, int64_t pix_end) {
  constexpr int NVMAX = 24 / R;  // 24 accumulators + NV weights + 1 broadcast <= 32 zmm
  int64_t off[R];
  int32_t cls[R];
  const int64_t nvec = p.gemm.cols / 8;
  PixelCursor cursor(p, pix_begin);
  for (int64_t pix0 = pix_begin; pix0 < pix_end; pix0 += R) {
    const int64_t npix = std::min<int64_t>(R, pix_end - pix0);
    cursor.next(npix, R, off, cls);
    for (int64_t n = 0; n < p.geo.N; ++n) {
      int64_t g = 0;
      for (; g + NVMAX <= nvec; g += NVMAX) tile<R, NVMAX>(p, n, pix0, npix, off, cls, g * 8);
      const int64_t rest = nvec - g;
      if constexpr (NVMAX >= 2) {
        if (rest == 1) tile<R, 1>(p, n, pix0, npix, off, cls, g * 8);
      }
      if constexpr (NVMAX >= 3) {
        if (rest == 2) tile<R, 2>(p, n, pix0, npix, off, cls, g * 8);
      }
      if constexpr (NVMAX >= 4) {
        if (rest == 3) tile<R, 3>(p, n, pix0, npix, off, cls, g * 8);
      }
    }
  }
}

}  // namespace

void conv_blocks_avx512(const ConvPlan& p, int64_t pix_begin, int64_t pix_end) {
  switch (p.gemm.block) {
    case 6: blocks<6>(p, pix_begin, pix_end); break;
    case 8: blocks<8>(p, pix_begin, pix_end); break;
    case 12: blocks<12>(p, pix_begin, pix_end); break;
    default: blocks<24>(p, pix_begin, pix_end); break;
  }
}

}  // namespace bk
#endif
