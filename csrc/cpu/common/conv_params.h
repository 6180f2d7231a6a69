// The parameters of one binary conv call, as small structs with one job each (in the spirit of larq
// compute-engine core/bconv2d/params.h). conv_plan.cpp fills them; the kernels only read them.
//
// Names (one per concept):
//   geometry  B, C, H, W (input), M (weight bases), Co (output channels), N (activation bases),
//             KH, KW (kernel taps), sh, sw (stride), ph, pw (zero padding), Hp, Wp (padded input),
//             OH, OW (output), P = B * OH * OW output pixels.
//   words     chan_words = ceil(C / 64) 64-bit words per pixel (the word engine's activation element).
//   fold      taps_per_word: tap folding for C <= 32, G kernel columns share one word.
//   lane      bits 16 / 32: the small-channel engines' activation element.
//   gemm      depth (GEMM rows per output pixel), co_padded, cols (GEMM columns), block (register
//             block height).
#pragma once
#include <atomic>
#include <cstdint>

namespace bk {

// What the caller asked for, plus the derived sizes.
struct ConvGeometry {
  int64_t B, C, H, W;      // input batch, channels, height, width
  int64_t M, Co, N;        // weight bases, output channels, activation bases
  int64_t KH, KW;          // kernel height / width in taps
  int64_t sh, sw, ph, pw;  // stride, zero padding
  int64_t Hp, Wp;          // padded input: H + 2 ph, W + 2 pw
  int64_t OH, OW, P;       // output height / width; P = B * OH * OW output pixels
};

// The word engine's activation element: chan_words 64-bit words per pixel (channel c in word c / 64,
// bit c % 64). Tap folding (chan_words == 1, C <= 32, KW >= 2): taps_per_word kernel columns share one
// word (tap u at bits u*C..), so a kernel row takes folded_words_per_krow = ceil(KW / taps_per_word)
// words instead of KW (folded planes and weights built that way). taps_per_word == 0: no folding, and
// folded_words_per_krow == KW.
struct WordLayout {
  int64_t chan_words;
  int64_t taps_per_word;
  int64_t folded_words_per_krow;
};

// The small-channel engines' activation element (AVX-512, C <= 32): one `bits`-bit element per pixel,
// bit c = channel c (bits 0: the word engine). Weights are uint32 [depth][cols] (lane 16:
// the tap's 16 bits twice), co_padded is a multiple of 16. Lane 32: a unit is one output pixel and each
// depth step broadcasts its 32-bit element against 16 columns (vpopcntd). Lane 16 (stride 1 along W): a
// unit is two adjacent output pixels of a row, whose taps are adjacent 16-bit elements, so one 32-bit
// broadcast serves both (vpopcntw: low half pixel 0, high half pixel 1). units_per_row units per output
// row (OW, or ceil(OW / 2) for lane 16).
struct LaneLayout {
  int bits;
  int64_t units_per_row;
};

// Shape of the binary GEMM: rows = output pixels (units), columns = (m, co) pairs.
struct GemmShape {
  int64_t depth;      // GEMM rows per output pixel: words (or lane elements) read per pixel and base
  int64_t co_padded;  // Co rounded up to 8 (word engine) or 16 (lane engines)
  int64_t cols;       // M * co_padded GEMM columns, column m * co_padded + co
  int64_t block;      // pixels (lane engines: units) per register block
};

// The GEMM operands, laid out by conv.cpp in the per-thread scratch. Operand A is read in place (no
// gather): element k of output pixel q for base n is act[n * plane + pix_off(q) + koff[k]],
// pix_off(q) = ((b * Hp + oh * sh) * Wp + ow * sw) * chan_words (see PixelCursor). Folded planes follow
// the packed planes in act, so koff also selects the plane.
struct GemmOperands {
  const uint64_t* act;   // [N][B][Hp][Wp][chan_words], then the folded planes (lane engines: elements)
  int64_t plane;         // elements per base: B * Hp * Wp * chan_words (lane engines: B * Hp * Wp)
  const int64_t* koff;   // [depth]
  const uint64_t* wt;    // [depth][cols], 64-byte aligned (lane engines: uint32)
  const float* scale;    // [N][cols] fl32(alpha[m, co] * beta[n]), 0 on padded columns
  const int32_t* col_m;  // [cols / 8] weight base of each 8-column group
  const int32_t* col_co; // [cols / 8] first output channel of each 8-column group
};

// Zero-padding correction (padding.h): output pixels fall into classes by which kernel rows / columns
// hit padding; base[cls][col] = KH*KW*C - sum over padded taps of (C - 2 popcount(w_tap)), and the
// exact +-1 dot product is base - 2 * popcount(xor) summed over the depth.
struct PaddingCorrection {
  const int32_t* base;     // [n_row_cls * n_col_cls][cols]
  const int32_t* row_cls;  // [OH]
  const int32_t* col_cls;  // [OW]
  int64_t n_col_cls;
};

// Fused output transform (output_transform.h), applied once per output element on its last
// contribution (n == N-1, m == M-1): out = min(max((out + bias[co]) + residual[pix, co], clamp_lo),
// clamp_hi), rounded in that order. Skipped entirely when fused is false. A NaN sum propagates through
// the clamp (as torch.clamp); a non-finite residual value (NaN or +-inf) sets *residual_bad (the caller
// raises: residuals must be finite), detected as it is read.
struct EpilogueParams {
  bool fused;
  const float* bias;                // [Co] or null (no bias)
  const float* residual;            // [P][Co] (channels_last, like out) or null (no residual)
  std::atomic<bool>* residual_bad;  // non-null when residual is
  float clamp_lo, clamp_hi;         // -inf / +inf: no clamp on that side
};

// Everything a GEMM kernel needs; built once per call by conv.cpp.
struct ConvPlan {
  ConvGeometry geo;
  WordLayout word;
  LaneLayout lane;
  GemmShape gemm;
  GemmOperands ops;
  PaddingCorrection pad;
  EpilogueParams epi;
  float* out;      // [P][Co] or null
  int32_t* pairs;  // [M][N][P][Co] or null
};

}  // namespace bk
