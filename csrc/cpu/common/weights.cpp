#include "cpu/common/weights.h"

#include <cstring>

namespace bk {

std::vector<int32_t> transpose_weights(const ConvPlan& p, const uint64_t* w, void* wt, size_t wt_bytes) {
  const ConvGeometry& g = p.geo;
  const int64_t cols = p.gemm.cols, chan_words = p.word.chan_words, taps = g.KH * g.KW;
  const int64_t G = p.word.taps_per_word, NG = p.word.folded_words_per_krow;
  std::memset(wt, 0, wt_bytes);
  uint64_t* wt64 = static_cast<uint64_t*>(wt);
  uint32_t* wt32 = static_cast<uint32_t*>(wt);
  std::vector<int32_t> tap_popcount(g.M * p.gemm.co_padded * taps, 0);
  for (int64_t m = 0; m < g.M; ++m)
    for (int64_t co = 0; co < g.Co; ++co) {
      const int64_t col = m * p.gemm.co_padded + co;
      const uint64_t* src = w + (m * g.Co + co) * taps * chan_words;
      for (int64_t k = 0; k < taps * chan_words; ++k) {
        tap_popcount[col * taps + k / chan_words] += __builtin_popcountll(src[k]);
        if (p.lane.bits) {  // chan_words == 1: k = kh * KW + kw
          const uint32_t bits = static_cast<uint32_t>(src[k]);
          wt32[k * cols + col] = p.lane.bits == 16 ? bits | bits << 16 : bits;
        } else if (!G) {
          wt64[k * cols + col] = src[k];
        } else {  // chan_words == 1: k = kh * KW + kw
          const int64_t kh = k / g.KW, kw = k % g.KW, grp = kw / G, u = kw % G;
          wt64[(kh * NG + grp) * cols + col] |= src[k] << (u * g.C);
        }
      }
    }
  return tap_popcount;
}

void make_column_groups(const GemmShape& gemm, std::vector<int32_t>& col_m, std::vector<int32_t>& col_co) {
  col_m.resize(gemm.cols / 8), col_co.resize(gemm.cols / 8);
  for (int64_t grp = 0; grp < gemm.cols / 8; ++grp)
    col_m[grp] = static_cast<int32_t>(grp * 8 / gemm.co_padded),
    col_co[grp] = static_cast<int32_t>(grp * 8 % gemm.co_padded);
}

}  // namespace bk
