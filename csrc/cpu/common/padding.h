// Zero-padding correction (in the spirit of larq compute-engine core/bconv2d/zero_padding_correction.h).
// The packed planes hold zero words in the padding, i.e. -1 activations, so the GEMM counts a padded
// tap as C - 2 popcount(w_tap) instead of 0. Output coordinates fall into a few classes (which kernel
// rows / columns hit real input); per class and GEMM column the table holds
//   base = KH*KW*C - sum over padded taps of (C - 2 popcount(w_tap)),
// and the kernels compute the exact +-1 dot product as base - 2 * popcount(xor) over the GEMM depth.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/common/conv_params.h"

namespace bk {

// Padding class of an output coordinate: the range [lo, hi) of kernel taps that hit real input.
struct TapRange {
  int64_t lo, hi;
  bool operator==(const TapRange& o) const { return lo == o.lo && hi == o.hi; }
};

// The distinct tap ranges of output coordinates 0..out-1 along one axis (stride s, padding pad, kernel
// k, input extent in), in order of first appearance; cls_of[o] = the class of coordinate o.
std::vector<TapRange> tap_classes(int64_t out, int64_t s, int64_t pad, int64_t k, int64_t in,
                                  std::vector<int32_t>& cls_of);

// Owns the tables a PaddingCorrection points into.
struct PaddingTable {
  std::vector<int32_t> base, row_cls, col_cls;
  int64_t n_col_cls = 0;
  PaddingCorrection view() const { return {base.data(), row_cls.data(), col_cls.data(), n_col_cls}; }
};

// tap_popcount[col * KH * KW + kh * KW + kw] = popcount of weight column col's tap (kh, kw) (all its
// channel words); see transpose_weights.
PaddingTable make_padding_table(const ConvGeometry& g, const GemmShape& gemm,
                                const std::vector<int32_t>& tap_popcount);

}  // namespace bk
