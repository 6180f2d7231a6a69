// Lane XNOR-popcount engines (C <= 32 input channels, AVX-512), see LaneLayout. Included by
// conv_lane16.cpp and conv_lane32.cpp, which define BK_SMALL_LANE (16 or 32) and BK_SMALL_TARGET (the
// function target: lane 16 needs AVX512_BITALG for vpopcntw, lane 32 does not), so each translation
// unit holds code for one lane width only.
//
// Microkernel: R units of one output row x NV zmm accumulators of 16 columns each; per depth step (one
// kernel tap) NV weight vectors are loaded and each unit's 32-bit activation element is broadcast
// against all of them:
// acc += popcount(bcast(a) ^ w) in lane-bit lanes. Counts stay below 2^16 (KH*KW*C < 65536), so 16-bit
// lanes cannot overflow. The epilogue (epilogue_avx512.h) runs on 16 int32 counts per pixel.
#pragma once
#include <immintrin.h>

// GCC 12 warns spuriously inside avx512fintrin.h (undefined source operands of masked intrinsics).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <algorithm>
#include <cstring>

#include "cpu/avx512/epilogue_avx512.h"
#include "cpu/common/kernels.h"

namespace bk {
namespace {

constexpr bool kPairs = BK_SMALL_LANE == 16;  // a unit is two adjacent output pixels of a row

BK_SMALL_TARGET inline __m512i lane_count(__m512i acc, __m512i a, __m512i w) {
#if BK_SMALL_LANE == 16
  return _mm512_add_epi16(acc, _mm512_popcnt_epi16(_mm512_xor_si512(a, w)));
#else
  return _mm512_add_epi32(acc, _mm512_popcnt_epi32(_mm512_xor_si512(a, w)));
#endif
}

// One register block: units [j, j + nu) of one output row (nu <= R), base n, columns [col0, col0 + 16 NV).
struct RowBlock {
  int64_t off;      // activation element offset of the block's first unit (before koff)
  int64_t ustride;  // elements between consecutive units (lane 16: 2; lane 32: sw)
  int64_t pix0;     // output pixel index of the first unit's first pixel
  int64_t ow0;      // its output column
  int32_t row_cls;  // row padding class * n_col_cls
  int64_t nu;
};

// kDense: consecutive units are 4 bytes apart (lane 16, or lane 32 with stride 1), so every unit's
// address is one base register plus a constant (a block's units past nu read up to 96 bytes past the
// row: the planes carry slack); otherwise one offset per unit.
template <int R, int NV, bool kDense>
BK_SMALL_TARGET void small_tile(const ConvPlan& p, int64_t n, const RowBlock& blk, int64_t col0) {
  constexpr int64_t kElem = BK_SMALL_LANE / 8;  // bytes per activation element
  constexpr int64_t kStep = kPairs ? 2 : 1;     // output pixels per unit
  __m512i acc[R][NV];
#pragma GCC unroll 32
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_si512();
  const char* a0 = reinterpret_cast<const char*>(p.ops.act) + (n * p.ops.plane + blk.off) * kElem;
  int64_t ua[kDense ? 1 : R];  // byte offsets of the units (past nu: unit 0 again, stays in bounds)
  if constexpr (!kDense)
    for (int i = 0; i < R; ++i) ua[i] = i < blk.nu ? i * blk.ustride * kElem : 0;
  const uint32_t* w = reinterpret_cast<const uint32_t*>(p.ops.wt) + col0;
  for (int64_t k = 0; k < p.gemm.depth; ++k, w += p.gemm.cols) {
    __m512i wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_si512(w + 16 * v);
    const char* ak = a0 + p.ops.koff[k] * kElem;
#pragma GCC unroll 32
    for (int i = 0; i < R; ++i) {
      uint32_t word;  // lane 16: this unit's two pixels' 16-bit elements
      std::memcpy(&word, ak + (kDense ? 4 * i : ua[i]), 4);
      const __m512i av = _mm512_set1_epi32(static_cast<int>(word));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = lane_count(acc[i][v], av, wv[v]);
    }
  }
  // Each zmm holds 16 columns of one weight base m (co_padded is a multiple of 16).
  Segment seg[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) seg[v] = segment(p, n, col0 + 16 * v, 16);
  const SegmentLinks<NV> links = link_segments(seg);
#pragma GCC unroll 32
  for (int i = 0; i < R; ++i) {
    if (i >= blk.nu) break;
    const int64_t ow = blk.ow0 + kStep * i, pix = blk.pix0 + kStep * i;
    const int32_t cls = blk.row_cls + p.pad.col_cls[ow];
    __m512i pc[NV];
    if constexpr (kPairs) {  // 32-bit lane c: pixel 0's count in the low half, pixel 1's in the high
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) pc[v] = _mm512_and_si512(acc[i][v], _mm512_set1_epi32(0xFFFF));
      store_segments(p, seg, links, pc, pix, cls);
      if (ow + 1 < p.geo.OW) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) pc[v] = _mm512_srli_epi32(acc[i][v], 16);
        store_segments(p, seg, links, pc, pix + 1, blk.row_cls + p.pad.col_cls[ow + 1]);
      }
    } else {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) pc[v] = acc[i][v];
      store_segments(p, seg, links, pc, pix, cls);
    }
  }
}

// All bases and column groups of one block: n ascending, column groups ascending, so the fused
// epilogue's last contribution is n = N-1, m = M-1.
template <int R, bool kDense>
BK_SMALL_TARGET void small_block(const ConvPlan& p, const RowBlock& blk) {
  constexpr int NVMAX = std::min(4, 24 / R);  // R * NV accumulators + NV weights + 1 broadcast <= 32 zmm
  const int64_t nvec = p.gemm.cols / 16;
  for (int64_t n = 0; n < p.geo.N; ++n) {
    int64_t g = 0;
    for (; g + NVMAX <= nvec; g += NVMAX) small_tile<R, NVMAX, kDense>(p, n, blk, g * 16);
    const int64_t rest = nvec - g;
    if constexpr (NVMAX >= 2) {
      if (rest == 1) small_tile<R, 1, kDense>(p, n, blk, g * 16);
    }
    if constexpr (NVMAX >= 3) {
      if (rest == 2) small_tile<R, 2, kDense>(p, n, blk, g * 16);
    }
    if constexpr (NVMAX >= 4) {
      if (rest == 3) small_tile<R, 3, kDense>(p, n, blk, g * 16);
    }
  }
}

// Units [u_begin, u_end), walked row by row in blocks of p.gemm.block units that never cross a row.
template <int R, bool kDense>
BK_SMALL_TARGET void small_rows(const ConvPlan& p, int64_t u_begin, int64_t u_end) {
  constexpr int64_t kStep = kPairs ? 2 : 1;
  for (int64_t u = u_begin; u < u_end;) {
    const int64_t UW = p.lane.units_per_row;
    const int64_t row = u / UW, j0 = u % UW, j1 = std::min(UW, j0 + (u_end - u));
    const int64_t b = row / p.geo.OH, oh = row % p.geo.OH;
    RowBlock blk;
    blk.ustride = kPairs ? 2 : p.geo.sw;
    blk.row_cls = p.pad.row_cls[oh] * static_cast<int32_t>(p.pad.n_col_cls);
    for (int64_t j = j0; j < j1; j += R) {
      blk.nu = std::min<int64_t>(R, j1 - j);
      blk.ow0 = j * kStep;
      blk.off = (b * p.geo.Hp + oh * p.geo.sh) * p.geo.Wp + blk.ow0 * p.geo.sw;
      blk.pix0 = row * p.geo.OW + blk.ow0;
      small_block<R, kDense>(p, blk);
    }
    u += j1 - j0;
  }
}

template <bool kDense>
BK_SMALL_TARGET void small_engine_t(const ConvPlan& p, int64_t u_begin, int64_t u_end) {
  switch (p.gemm.block) {
    case 4: small_rows<4, kDense>(p, u_begin, u_end); break;
    case 8: small_rows<8, kDense>(p, u_begin, u_end); break;
    case 12: small_rows<12, kDense>(p, u_begin, u_end); break;
    case 16: small_rows<16, kDense>(p, u_begin, u_end); break;
    default: small_rows<24, kDense>(p, u_begin, u_end); break;
  }
}

BK_SMALL_TARGET void small_engine(const ConvPlan& p, int64_t u_begin, int64_t u_end) {
  if (kPairs || p.geo.sw == 1)
    small_engine_t<true>(p, u_begin, u_end);
  else
    small_engine_t<false>(p, u_begin, u_end);
}

}  // namespace
}  // namespace bk
