// Shared declarations of the bitkern CPU engine (no torch headers: raw buffers only).
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define BK_X86 1
// Function-level ISA targets: the translation units stay baseline x86-64; runtime CPUID picks a path.
#define BK_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,popcnt,fma")))
#define BK_TARGET_AVX2 __attribute__((target("avx2,fma,popcnt")))
#else
#define BK_X86 0
#endif

namespace bk {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// CPU + OS support (CPUID feature bits and XSAVE-enabled register state).
bool cpu_supports(Isa isa);
std::vector<std::string> isa_supported();  // best first, "scalar" always last
// Parses "avx512" / "avx2" / "scalar"; throws std::invalid_argument for unknown or unsupported names.
Isa parse_isa(const std::string& name);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Activation binarization mode (docs/architecture.md): sign: bit = x >= 0; hv: bit = fl32(x + v) >= 0.5.
enum PackMode { kModeSign = 0, kModeHv = 1 };

// Packs float activations [B, C, H, W] (NCHW or channels_last physical layout) into
// dst [N][B][H + 2ph][W + 2pw][Kw] uint64 words, one base per shift v[n]; padded words are zero.
struct PackJob {
  const float* x;
  int64_t B, C, H, W;
  bool channels_last;
  int mode;
  const float* v;  // [N] shifts (mode hv); ignored for mode sign
  int64_t N;
  uint64_t* dst;
  int64_t ph, pw;
  int64_t Kw, Hp, Wp;
  // Tap folding (Kw == 1 only): fold_dst[f][q] = OR_{u < fold_taps[f]} word[q + u] << (u * C), same
  // layout as dst. fold_count = 0, 1 or 2 folded planes.
  int fold_count;
  int64_t fold_taps[2];
  uint64_t* fold_dst[2];
  // Small-channel engine (C <= 32, AVX-512): dst holds one 2- or 4-byte element per pixel instead of Kw
  // words (bit c = channel c), no folding. 8: the word layout above.
  int elem_bytes = 8;
};

// Walks padded rows [r0, r1) of the flattened (b, hp) row index space for every base n of job.dst
// (elements of T, per_pixel of them per pixel): padding rows and padding columns are zeroed, image row h
// is filled by pack_row(n, b, h, row) (row: the padded row's first element), which returns true when it
// read a NaN. Returns the OR of those results.
template <typename T, typename PackRow>
bool for_each_padded_row(const PackJob& j, int64_t r0, int64_t r1, int64_t per_pixel, PackRow pack_row) {
  bool nan = false;
  const int64_t pad = j.pw * per_pixel;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / j.Hp, hp = r % j.Hp, h = hp - j.ph;
    for (int64_t n = 0; n < j.N; ++n) {
      T* row = reinterpret_cast<T*>(j.dst) + ((n * j.B + b) * j.Hp + hp) * j.Wp * per_pixel;
      if (h < 0 || h >= j.H) {
        std::memset(row, 0, sizeof(T) * j.Wp * per_pixel);
        continue;
      }
      std::memset(row, 0, sizeof(T) * pad);
      std::memset(row + (j.pw + j.W) * per_pixel, 0, sizeof(T) * pad);
      nan |= pack_row(n, b, h, row);
    }
  }
  return nan;
}

// Packs padded rows [r0, r1) of the flattened (b, hp) row index space, all N bases. Returns true when
// one of the x values read (base 0) is NaN.
bool pack_rows(const PackJob& job, Isa isa, int64_t r0, int64_t r1);
#if BK_X86
// The same for job.elem_bytes 2 or 4 (small-channel engine; AVX-512 only).
bool pack_rows_small_avx512(const PackJob& job, int64_t r0, int64_t r1);
#endif

// Everything the binary GEMM needs; built once per call by conv.cpp.
struct ConvPlan {
  int64_t B, C, H, W, Kw, Hp, Wp;
  int64_t M, Co, Cop, MCp;  // Cop = Co rounded up to 8; MCp = M * Cop GEMM columns
  int64_t KH, KW, sh, sw, ph, pw, OH, OW, P;  // P = B * OH * OW output pixels
  int64_t N, K;  // K = KH * KW * Kw words per output pixel
  int64_t R;  // pixels (small-channel engine: units) per register block
  // Tap folding for C <= 32 (Kw == 1): G kernel columns share one word (tap u at bits u*C..), so a
  // kernel row takes NG = ceil(KW / G) words instead of KW (folded planes and weights built that way).
  // fold_G == 0: no folding (NG == KW).
  int64_t fold_G, NG;
  // GEMM operand A is read in place (no gather): word k of output pixel q for base n is
  // act[n * plane + pix_off(q) + koff[k]], pix_off(q) = ((b * Hp + oh * sh) * Wp + ow * sw) * Kw.
  // Folded planes follow the packed planes in act, so koff also selects the plane.
  const uint64_t* act;    // [N][B][Hp][Wp][Kw], then the folded planes [N][B][Hp][Wp] (Kw == 1)
  int64_t plane;          // words per base: B * Hp * Wp * Kw
  const int64_t* koff;    // [K]
  const uint64_t* wt;     // [K][MCp], 64-byte aligned
  const int32_t* base;    // [n_row_cls * n_col_cls][MCp]: KH*KW*C - padding correction
  const int32_t* row_cls; // [OH]
  const int32_t* col_cls; // [OW]
  int64_t n_col_cls;
  const float* scale;     // [N][MCp] alpha[m, co] * beta[n], 0 on padded columns
  const int32_t* vec_m;   // [MCp / 8] weight base of each 8-column group
  const int32_t* vec_co;  // [MCp / 8] first output channel of each 8-column group
  // Small-channel engine (lane 16 or 32; 0: the word engine). Activations are elements of lane bits per
  // pixel (act as bytes, plane and koff in elements); wt is uint32 [K][MCp] (lane 16: the tap's 16 bits
  // twice), Cop is a multiple of 16. Lane 32: a unit is one output pixel and each K step broadcasts its
  // 32-bit element against 16 columns (vpopcntd). Lane 16 (stride 1 along W): a unit is two adjacent
  // output pixels of a row, whose taps are adjacent 16-bit elements, so one 32-bit broadcast serves both
  // (vpopcntw: low half pixel 0, high half pixel 1). UW units per output row.
  int lane;
  int64_t UW;
  // Fused epilogue, applied once per output element on its last contribution (n == N-1, m == M-1):
  // out = min(max((out + bias[co]) + residual[pix, co], clamp_lo), clamp_hi) (that rounding order).
  // Skipped entirely when epilogue is false.
  // A NaN sum propagates through the clamp (as torch.clamp); a non-finite residual value (NaN or +-inf)
  // sets *residual_bad (the caller raises: residuals must be finite), detected as it is read.
  bool epilogue;
  const float* bias;      // [Co] or null (no bias)
  const float* residual;  // [P][Co] (channels_last, like out) or null (no residual)
  std::atomic<bool>* residual_bad;  // non-null when residual is
  float clamp_lo, clamp_hi;  // -inf / +inf: no clamp on that side
  float* out;             // [P][Co] or null
  int32_t* pairs;         // [M][N][P][Co] or null
};

// The fused epilogue for one finished output element of channel co (plan.epilogue must be true).
inline float epilogue_value(const ConvPlan& p, float y, int64_t pix, int64_t co) {
  if (p.bias) y += p.bias[co];
  if (p.residual) {
    const float r = p.residual[pix * p.Co + co];
    if (!std::isfinite(r)) p.residual_bad->store(true, std::memory_order_relaxed);
    y += r;
  }
  return std::min(std::max(y, p.clamp_lo), p.clamp_hi);  // keeps a NaN y (std::max / min return arg 1)
}

// Walks output pixels in order from a start pixel, yielding each one's word offset pix_off (see
// ConvPlan::act) and padding class; the divisions happen once, at construction.
class PixelCursor {
 public:
  PixelCursor(const ConvPlan& p, int64_t pix) : p_(p), ow_(pix % p.OW) {
    const int64_t t = pix / p.OW;
    oh_ = t % p.OH, b_ = t / p.OH;
    start_row();
  }
  // The next npix pixels into off[0..npix) / cls[0..npix); entries npix..R-1 repeat the first one
  // (computed, never stored).
  void next(int64_t npix, int64_t R, int64_t* off, int32_t* cls) {
    for (int64_t i = 0; i < npix; ++i) {
      off[i] = row_ + ow_ * p_.sw * p_.Kw;
      cls[i] = row_cls_ + p_.col_cls[ow_];
      if (++ow_ == p_.OW) {
        ow_ = 0;
        if (++oh_ == p_.OH) oh_ = 0, ++b_;
        start_row();
      }
    }
    for (int64_t i = npix; i < R; ++i) off[i] = off[0], cls[i] = cls[0];
  }

 private:
  void start_row() {
    row_ = (b_ * p_.Hp + oh_ * p_.sh) * p_.Wp * p_.Kw;
    row_cls_ = p_.row_cls[oh_] * static_cast<int32_t>(p_.n_col_cls);
  }
  const ConvPlan& p_;
  int64_t ow_, oh_, b_, row_;
  int32_t row_cls_;
};

// Processes output pixels [pix_begin, pix_end) in blocks of R, all n and columns.
void conv_blocks_scalar(const ConvPlan& p, int64_t pix_begin, int64_t pix_end);
#if BK_X86
void conv_blocks_avx2(const ConvPlan& p, int64_t pix_begin, int64_t pix_end);
void conv_blocks_avx512(const ConvPlan& p, int64_t pix_begin, int64_t pix_end);
#endif

// Register block height (pixels) of the word engines per ISA for a given number of column vectors.
int64_t block_rows(Isa isa, int64_t n_vec);
// Units per register block of the lane engines (4, 8, 12, 16 or 24) for UW units per output row and
// n_vec 16-column vectors.
int64_t small_block_units(int64_t UW, int64_t n_vec);

#if BK_X86
// Small-channel engine: units [u_begin, u_end) (see ConvPlan::lane), all n and columns.
void conv_small16_avx512(const ConvPlan& p, int64_t u_begin, int64_t u_end);
void conv_small32_avx512(const ConvPlan& p, int64_t u_begin, int64_t u_end);
#endif
// AVX512_BITALG (vpopcntw), needed by the lane-16 engine.
bool cpu_has_bitalg();

}  // namespace bk
