// Weight packing for the GEMM: the packed weights [M, Co, KH, KW, chan_words] are re-laid out per call
// (cheap next to the conv) as GEMM columns, folded / widened like the activations of the chosen engine.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cpu/common/conv_params.h"

namespace bk {

// Writes wt (wt_bytes, zeroed first) as [depth][cols], column m * co_padded + co (padded columns zero):
//   word engine: uint64, row k = (kh, kw, word); folded (taps_per_word G): row (kh, g) holds taps
//                kw = g*G + u at bits u*C..;
//   lane 32:     uint32, row k = (kh, kw), the tap's C bits;
//   lane 16:     uint32, the tap's 16 bits twice (one copy per pixel of a unit).
// Returns the per-tap popcounts, [cols][KH * KW] (for the padding correction).
std::vector<int32_t> transpose_weights(const ConvPlan& p, const uint64_t* w, void* wt, size_t wt_bytes);

// col_m[g] / col_co[g]: weight base and first output channel of the 8-column group g.
void make_column_groups(const GemmShape& gemm, std::vector<int32_t>& col_m, std::vector<int32_t>& col_co);

}  // namespace bk
