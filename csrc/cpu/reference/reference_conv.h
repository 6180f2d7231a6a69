// Torch-free scalar reference of the whole multi-base binary conv, straight from the definitions (in
// the spirit of larq compute-engine core/bconv2d/reference.h). Used only by tests/engine_test.cpp:
// it shares no code with the engine except the argument struct and the bit convention of pack.h.
//
//   pairs[m][n][pix][co] = sum over in-bounds taps (kh, kw) and channels c of
//                          s(x[b, c, oh*sh - ph + kh, ow*sw - pw + kw], v[n]) * s(w[m, co, kh, kw, c])
//     (s = +1 for bit 1, -1 for bit 0; padded taps contribute 0, like F.conv2d's zero padding),
//   out[pix][co]        = sum over n (outer), m (inner) of fl32(alpha[m, co] * beta[n]) * pairs_mn,
//                         each product and sum rounded to float32, then + bias[co], then
//                         + residual[pix][co], then clamp to [clamp_lo, clamp_hi].
#pragma once
#include "cpu/common/engine.h"

namespace bk {

// Same arguments, outputs and flags as run_conv (kXHasNan: x holds a NaN, out / pairs untouched;
// kResidualNonFinite: residual holds a NaN or +-inf, out holds the IEEE result).
int reference_mbn_conv2d(const ConvArgs& args);

}  // namespace bk
