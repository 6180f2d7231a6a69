// AVX-512 (F/BW/DQ/VL + VPOPCNTDQ) XNOR-popcount GEMM microkernel: R pixels x NV zmm (8 columns
// each) of 64-bit popcount accumulators; one broadcast activation word per pixel and K step is used
// against all NV weight vectors. Epilogue (padding correction, alpha*beta scaling, channels_last
// accumulation, exact per-pair values) is fused in registers.
#include "bk_common.h"

#if BK_X86
#include <immintrin.h>

// GCC 12 warns spuriously inside avx512fintrin.h (_mm512_cvtepi64_epi32 undefined source operand).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cstring>
#include <vector>

namespace bk {
namespace {

template <int R, int NV>
BK_TARGET_AVX512 void tile(const ConvPlan& p, int64_t n, int64_t pix0, int64_t npix,
                           const uint64_t* panel, const int32_t* cls, int64_t col0) {
  __m512i acc[R][NV];
#pragma GCC unroll 32
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_si512();
  const uint64_t* w = p.wt + col0;
  const uint64_t* a = panel;
  const int64_t MCp = p.MCp;
  for (int64_t k = 0; k < p.K; ++k, w += MCp, a += R) {
    __m512i wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_si512(w + 8 * v);
#pragma GCC unroll 32
    for (int i = 0; i < R; ++i) {
      const __m512i av = _mm512_set1_epi64(static_cast<long long>(a[i]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        acc[i][v] = _mm512_add_epi64(acc[i][v], _mm512_popcnt_epi64(_mm512_xor_si512(av, wv[v])));
    }
  }
  // Epilogue. Columns of one zmm belong to one weight base m (Cop is a multiple of 8). The first
  // contribution to an output (n == 0, m == 0) stores, later ones accumulate: no zero-fill needed.
  // blocks() runs n ascending and column groups (m-major) ascending, so the last contribution is
  // n == N-1, m == M-1: it adds the bias, then the residual, and clamps (fused epilogue).
  const int64_t Co = p.Co;
  __mmask8 mask[NV];
  int64_t co[NV], m[NV];
  __m256 s[NV], bias[NV];
  bool first[NV], last[NV];
  const __m256 lo = _mm256_set1_ps(p.clamp_lo), hi = _mm256_set1_ps(p.clamp_hi);
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t col = col0 + 8 * v, g = col / 8;
    co[v] = p.vec_co[g];
    m[v] = p.vec_m[g];
    mask[v] = static_cast<__mmask8>((1u << std::min<int64_t>(8, Co - co[v])) - 1);
    s[v] = p.out ? _mm256_loadu_ps(p.scale + n * MCp + col) : _mm256_setzero_ps();
    first[v] = n == 0 && m[v] == 0;
    last[v] = p.epilogue && n == p.N - 1 && m[v] == p.M - 1;
    bias[v] = last[v] && p.bias ? _mm256_maskz_loadu_ps(mask[v], p.bias + co[v]) : _mm256_setzero_ps();
  }
#pragma GCC unroll 32
  for (int i = 0; i < R; ++i) {
    if (i >= npix) break;
    const int64_t pix = pix0 + i;
    const int32_t* base = p.base + cls[i] * MCp + col0;
    float* orow = p.out ? p.out + pix * Co : nullptr;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m256i pc = _mm512_cvtepi64_epi32(acc[i][v]);
      const __m256i dot = _mm256_sub_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + 8 * v)), _mm256_add_epi32(pc, pc));
      if (p.pairs)
        _mm256_mask_storeu_epi32(p.pairs + ((m[v] * p.N + n) * p.P + pix) * Co + co[v], mask[v], dot);
      if (orow) {
        float* o = orow + co[v];
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), s[v]);
        __m256 y = first[v] ? f : _mm256_add_ps(f, _mm256_maskz_loadu_ps(mask[v], o));
        if (last[v]) {
          if (p.bias) y = _mm256_add_ps(y, bias[v]);
          if (p.residual) y = _mm256_add_ps(y, _mm256_maskz_loadu_ps(mask[v], p.residual + pix * Co + co[v]));
          y = _mm256_min_ps(_mm256_max_ps(y, lo), hi);
        }
        _mm256_mask_storeu_ps(o, mask[v], y);
      }
    }
  }
}

template <int R>
BK_TARGET_AVX512 void blocks(const ConvPlan& p, int64_t blk0, int64_t blk1) {
  constexpr int NVMAX = 24 / R;  // 24 accumulators + NV weights + 1 broadcast <= 32 zmm
  thread_local std::vector<uint64_t> panel_buf;
  if (static_cast<int64_t>(panel_buf.size()) < p.K * R) panel_buf.resize(p.K * R);
  uint64_t* panel = panel_buf.data();
  int32_t cls[R];
  const int64_t nvec = p.MCp / 8;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t pix0 = blk * R, npix = std::min<int64_t>(R, p.P - pix0);
    for (int64_t n = 0; n < p.N; ++n) {
      build_panel(p, n, pix0, npix, panel, cls);
      int64_t g = 0;
      for (; g + NVMAX <= nvec; g += NVMAX) tile<R, NVMAX>(p, n, pix0, npix, panel, cls, g * 8);
      const int64_t rest = nvec - g;
      if constexpr (NVMAX >= 2) {
        if (rest == 1) tile<R, 1>(p, n, pix0, npix, panel, cls, g * 8);
      }
      if constexpr (NVMAX >= 3) {
        if (rest == 2) tile<R, 2>(p, n, pix0, npix, panel, cls, g * 8);
      }
      if constexpr (NVMAX >= 4) {
        if (rest == 3) tile<R, 3>(p, n, pix0, npix, panel, cls, g * 8);
      }
    }
  }
}

}  // namespace

void conv_blocks_avx512(const ConvPlan& p, int64_t blk0, int64_t blk1) {
  switch (p.R) {
    case 6: blocks<6>(p, blk0, blk1); break;
    case 8: blocks<8>(p, blk0, blk1); break;
    case 12: blocks<12>(p, blk0, blk1); break;
    default: blocks<24>(p, blk0, blk1); break;
  }
}

}  // namespace bk
#endif
