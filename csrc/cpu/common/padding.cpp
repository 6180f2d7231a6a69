#include "cpu/common/padding.h"

#include <algorithm>

namespace bk {

std::vector<TapRange> tap_classes(int64_t out, int64_t s, int64_t pad, int64_t k, int64_t in,
                                  std::vector<int32_t>& cls_of) {
  std::vector<TapRange> classes;
  cls_of.assign(out, 0);
  for (int64_t o = 0; o < out; ++o) {
    const int64_t start = o * s - pad;
    TapRange r{std::max<int64_t>(0, -start), std::min<int64_t>(k, in - start)};
    if (r.hi < r.lo) r.hi = r.lo;
    auto it = std::find(classes.begin(), classes.end(), r);
    if (it == classes.end()) {
      classes.push_back(r);
      it = classes.end() - 1;
    }
    cls_of[o] = static_cast<int32_t>(it - classes.begin());
  }
  return classes;
}

PaddingTable make_padding_table(const ConvGeometry& g, const GemmShape& gemm,
                                const std::vector<int32_t>& tap_popcount) {
  PaddingTable t;
  const auto row_classes = tap_classes(g.OH, g.sh, g.ph, g.KH, g.H, t.row_cls);
  const auto col_classes = tap_classes(g.OW, g.sw, g.pw, g.KW, g.W, t.col_cls);
  t.n_col_cls = static_cast<int64_t>(col_classes.size());
  const int64_t taps = g.KH * g.KW;
  t.base.assign(row_classes.size() * col_classes.size() * gemm.cols, 0);
  for (size_t rc = 0; rc < row_classes.size(); ++rc)
    for (size_t cc = 0; cc < col_classes.size(); ++cc) {
      int32_t* bcls = t.base.data() + (rc * col_classes.size() + cc) * gemm.cols;
      const TapRange r = row_classes[rc], c = col_classes[cc];
      for (int64_t col = 0; col < gemm.cols; ++col) {
        int64_t corr = 0;
        for (int64_t kh = 0; kh < g.KH; ++kh)
          for (int64_t kw = 0; kw < g.KW; ++kw)
            if (kh < r.lo || kh >= r.hi || kw < c.lo || kw >= c.hi)
              corr += g.C - 2 * tap_popcount[col * taps + kh * g.KW + kw];
        bcls[col] = static_cast<int32_t>(taps * g.C - corr);
      }
    }
  return t;
}

}  // namespace bk
