#include "cpu/common/conv_plan.h"

#include <algorithm>

namespace bk {

ConvGeometry make_geometry(const ConvArgs& a) {
  ConvGeometry g{};
  g.B = a.B, g.C = a.C, g.H = a.H, g.W = a.W, g.M = a.M, g.Co = a.Co, g.N = a.N;
  g.KH = a.KH, g.KW = a.KW, g.sh = a.sh, g.sw = a.sw, g.ph = a.ph, g.pw = a.pw;
  g.Hp = a.H + 2 * a.ph, g.Wp = a.W + 2 * a.pw;
  g.OH = (g.Hp - a.KH) / a.sh + 1, g.OW = (g.Wp - a.KW) / a.sw + 1, g.P = a.B * g.OH * g.OW;
  return g;
}

ConvPlan make_plan(const ConvGeometry& g, const KernelChoice& k) {
  ConvPlan p{};
  p.geo = g;
  p.word.chan_words = ceil_div(g.C, 64);
  p.word.taps_per_word = 0, p.word.folded_words_per_krow = g.KW;
  p.lane.bits = static_cast<int>(k.engine);
  if (p.lane.bits) {
    p.gemm.depth = g.KH * g.KW;
  } else if (k.fold_taps) {
    p.word.taps_per_word = std::min<int64_t>(64 / g.C, g.KW);
    p.word.folded_words_per_krow = ceil_div(g.KW, p.word.taps_per_word);
    p.gemm.depth = g.KH * p.word.folded_words_per_krow;
  } else {
    p.gemm.depth = g.KH * g.KW * p.word.chan_words;
  }
  p.ops.plane = g.B * g.Hp * g.Wp * (p.lane.bits ? 1 : p.word.chan_words);  // elements per base
  p.gemm.co_padded = round_up(g.Co, p.lane.bits ? 16 : 8);
  p.gemm.cols = g.M * p.gemm.co_padded;
  p.lane.units_per_row = p.lane.bits == 16 ? ceil_div(g.OW, 2) : g.OW;
  p.gemm.block = p.lane.bits ? lane_block_units(p.lane.units_per_row, p.gemm.cols / 16)
                             : block_rows(k.isa, p.gemm.cols / 8);
  return p;
}

ScratchLayout make_scratch_layout(const ConvPlan& p) {
  const ConvGeometry& g = p.geo;
  ScratchLayout s{};
  s.elem_bytes = p.lane.bits ? p.lane.bits / 8 : 8;
  const int64_t G = p.word.taps_per_word, NG = p.word.folded_words_per_krow;
  s.last_taps = G ? g.KW - (NG - 1) * G : 0;
  s.full_taps = NG > 1 ? G : s.last_taps;
  s.fold_count = !G ? 0 : (s.last_taps > 1 && s.last_taps != s.full_taps) ? 2 : 1;
  // + 256 bytes: the lane engines compute whole blocks of R units (R <= 24, 4 bytes each) even past the
  // last row's end, reading up to 4 bytes at each.
  s.plane_bytes = round_up(g.N * p.ops.plane * s.elem_bytes + 256, 64);
  s.weight_bytes = round_up(p.gemm.depth * p.gemm.cols * (p.lane.bits ? 4 : 8), 64);
  return s;
}

std::vector<int64_t> make_row_offsets(const ConvPlan& p, const ScratchLayout& s) {
  const ConvGeometry& g = p.geo;
  const int64_t chan_words = p.word.chan_words, G = p.word.taps_per_word;
  const int64_t NG = p.word.folded_words_per_krow;
  std::vector<int64_t> koff(p.gemm.depth);
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    if (p.lane.bits) {
      for (int64_t kw = 0; kw < g.KW; ++kw) koff[kh * g.KW + kw] = kh * g.Wp + kw;
    } else if (!G) {
      for (int64_t j = 0; j < g.KW * chan_words; ++j)
        koff[kh * g.KW * chan_words + j] = kh * g.Wp * chan_words + j;
    } else {
      const int64_t fold_plane = static_cast<int64_t>(s.plane_bytes / 8);
      const int64_t last_plane = s.last_taps == 1 ? 0 : s.fold_count == 2 ? 2 * fold_plane : fold_plane;
      for (int64_t grp = 0; grp < NG; ++grp)
        koff[kh * NG + grp] = (grp + 1 < NG ? fold_plane : last_plane) + kh * g.Wp + grp * G;
    }
  }
  return koff;
}

}  // namespace bk
