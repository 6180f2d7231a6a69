// Scalar activation packing (word layout): one bit per channel, 64 channels per word.
#include "cpu/common/kernels.h"
#include "cpu/scalar/pack_scalar.h"

namespace bk {

bool pack_rows_scalar(const PackJob& j, int64_t r0, int64_t r1) {
  const auto row_fn = [&](int64_t n, int64_t b, int64_t h, uint64_t* row) {
    return n == 0 ? pack_pixels_scalar<true>(j, n, b, h, 0, j.W, row)  // NaN: base 0 only
                  : pack_pixels_scalar<false>(j, n, b, h, 0, j.W, row);
  };
  return for_each_padded_row<uint64_t>(j, r0, r1, j.chan_words, row_fn);
}

}  // namespace bk
