// Activation packing driver (word layout): packs the padded rows with the ISA's packer, then builds
// the folded planes from the rows just written (still in cache). While packing base 0 the row packers
// also report whether they read a NaN, so input validation needs no separate pass over x: NaN has no
// sign, and the Python side raises on the flag.
#include "cpu/common/pack.h"

#include "cpu/common/kernels.h"
#include "cpu/common/select_kernel.h"

namespace bk {
namespace {

// out[q] = OR_{u < taps, q + u < len} src[q + u] << (u * C)  (tap u of a folded word at bit u*C).
void fold_row(const uint64_t* __restrict src, uint64_t* __restrict out, const int64_t len,
              const int64_t taps, const int64_t C) {
  for (int64_t q = 0; q < len; ++q) out[q] = src[q];
  for (int64_t u = 1; u < taps; ++u) {
    const unsigned shift = static_cast<unsigned>(u * C);
    const int64_t end = len - u;
    for (int64_t q = 0; q < end; ++q) out[q] |= src[q + u] << shift;
  }
}

}  // namespace

bool pack_rows(const PackJob& j, Isa isa, int64_t r0, int64_t r1) {
  // NaN is looked for only in base 0 (every base reads the same x).
  const bool nan = pack_rows_kernel(isa)(j, r0, r1);
  for (int f = 0; f < j.fold_count; ++f)
    for (int64_t n = 0; n < j.N; ++n)
      for (int64_t r = r0; r < r1; ++r) {
        const uint64_t* row = j.dst + ((n * j.B + r / j.Hp) * j.Hp + r % j.Hp) * j.Wp * j.chan_words;
        fold_row(row, j.fold_dst[f] + (row - j.dst), j.Wp, j.fold_taps[f], j.C);
      }
  return nan;
}

}  // namespace bk
