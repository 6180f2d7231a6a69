// Walks output pixels in order from a start pixel, yielding each one's activation offset pix_off (see
// GemmOperands::act) and padding class; the divisions happen once, at construction. Used by the word
// engines (scalar, AVX2, AVX-512).
#pragma once
#include <cstdint>

#include "cpu/common/conv_params.h"

namespace bk {

class PixelCursor {
 public:
  PixelCursor(const ConvPlan& p, int64_t pix) : p_(p), ow_(pix % p.geo.OW) {
    const int64_t t = pix / p.geo.OW;
    oh_ = t % p.geo.OH, b_ = t / p.geo.OH;
    start_row();
  }
  // The next npix pixels into off[0..npix) / cls[0..npix); entries npix..R-1 repeat the first one
  // (computed, never stored).
  void next(int64_t npix, int64_t R, int64_t* off, int32_t* cls) {
    for (int64_t i = 0; i < npix; ++i) {
      off[i] = row_ + ow_ * p_.geo.sw * p_.word.chan_words;
      cls[i] = row_cls_ + p_.pad.col_cls[ow_];
      if (++ow_ == p_.geo.OW) {
        ow_ = 0;
        if (++oh_ == p_.geo.OH) oh_ = 0, ++b_;
        start_row();
      }
    }
    for (int64_t i = npix; i < R; ++i) off[i] = off[0], cls[i] = cls[0];
  }

 private:
  void start_row() {
    row_ = (b_ * p_.geo.Hp + oh_ * p_.geo.sh) * p_.geo.Wp * p_.word.chan_words;
    row_cls_ = p_.pad.row_cls[oh_] * static_cast<int32_t>(p_.pad.n_col_cls);
  }
  const ConvPlan& p_;
  int64_t ow_, oh_, b_, row_;
  int32_t row_cls_;
};

}  // namespace bk
