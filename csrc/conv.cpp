// Binary conv driver: packs activations once, re-lays weights out as GEMM columns, builds the padding
// correction table, then runs the ISA-specific XNOR-popcount GEMM over pixel blocks on the pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bk_common.h"
#include "engine.h"
#include "thread_pool.h"

namespace bk {
namespace {

// Grow-only 64-byte aligned scratch, one per calling thread (repeated calls reuse the pages).
struct Scratch {
  void* ptr = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(ptr); }
  void* get(size_t bytes) {
    bytes = static_cast<size_t>(round_up(static_cast<int64_t>(std::max<size_t>(bytes, 64)), 64));
    if (bytes > cap) {
      std::free(ptr);
      ptr = std::aligned_alloc(64, bytes);
      if (!ptr) throw std::bad_alloc();
      cap = bytes;
    }
    return ptr;
  }
};

inline int popcount64(uint64_t x) { return __builtin_popcountll(x); }

// Padding class of an output coordinate: the range [lo, hi) of kernel taps that hit real input.
struct TapRange {
  int64_t lo, hi;
  bool operator==(const TapRange& o) const { return lo == o.lo && hi == o.hi; }
};

std::vector<TapRange> tap_classes(int64_t O, int64_t s, int64_t pad, int64_t k, int64_t in,
                                  std::vector<int32_t>& cls_of) {
  std::vector<TapRange> classes;
  cls_of.assign(O, 0);
  for (int64_t o = 0; o < O; ++o) {
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

int resolve_threads(int threads) { return std::max(1, std::min(threads, 256)); }

// Which engine runs a conv (ConvPlan::lane: 16, 32, or 0 for the word engine): the one with the fewest
// XNOR-popcount steps per output pixel and 16 columns. Word engine: 2 zmm of 8 columns per word, KH *
// ceil(KW / G) words with G taps folded per word (C <= 32) or KH * KW * Kw. Lane 32: KH * KW (C <= 32).
// Lane 16: KH * KW / 2 (C <= 16, stride 1 along W, AVX512_BITALG, 16-bit counts cannot overflow).
int conv_lane(Isa isa, int64_t C, int64_t KH, int64_t KW, int64_t sw) {
  if (isa != Isa::Avx512 || C > 32) return 0;
  const int64_t G = KW >= 2 ? std::min<int64_t>(64 / C, KW) : 1;
  const double word = 2.0 * KH * ceil_div(KW, G), lane32 = static_cast<double>(KH * KW);
  const bool can16 = C <= 16 && sw == 1 && cpu_has_bitalg() && KH * KW * C < 65536;
  if (can16 && lane32 / 2 < word) return 16;
  return lane32 < word ? 32 : 0;
}

}  // namespace

int64_t small_block_units(int64_t UW, int64_t n_vec) {
  // Blocks never cross an output row: as few blocks per row as the largest R allows, then the
  // smallest R that still covers the row with that many (least wasted compute on the last block).
  static const int64_t kR[] = {4, 8, 12, 16, 24};
  const int64_t nv = std::min<int64_t>(n_vec, 4);
  int64_t rmax = 4;
  for (int64_t r : kR)
    if (r * nv <= 24) rmax = r;
  const int64_t need = ceil_div(UW, ceil_div(UW, rmax));
  for (int64_t r : kR)
    if (r >= need) return r;
  return rmax;
}

int64_t block_rows(Isa isa, int64_t n_vec) {
  switch (isa) {
    case Isa::Avx512: return n_vec >= 4 ? 6 : n_vec == 3 ? 8 : n_vec == 2 ? 12 : 24;
    case Isa::Avx2: return 3;
    default: return 4;
  }
}

void conv_blocks_scalar(const ConvPlan& p, int64_t pix_begin, int64_t pix_end) {
  const int64_t R = p.R;
  std::vector<uint64_t> acc(p.MCp);
  std::vector<int64_t> off(R);
  std::vector<int32_t> cls(R);
  PixelCursor cursor(p, pix_begin);
  for (int64_t pix0 = pix_begin; pix0 < pix_end; pix0 += R) {
    const int64_t npix = std::min(R, pix_end - pix0);
    cursor.next(npix, R, off.data(), cls.data());
    if (p.out) std::memset(p.out + pix0 * p.Co, 0, sizeof(float) * npix * p.Co);
    for (int64_t n = 0; n < p.N; ++n) {
      const uint64_t* an = p.act + n * p.plane;
      const float* sc = p.scale + n * p.MCp;
      for (int64_t i = 0; i < npix; ++i) {
        std::fill(acc.begin(), acc.end(), 0);
        for (int64_t k = 0; k < p.K; ++k) {
          const uint64_t a = an[off[i] + p.koff[k]];
          const uint64_t* wrow = p.wt + k * p.MCp;
          for (int64_t col = 0; col < p.MCp; ++col) acc[col] += popcount64(a ^ wrow[col]);
        }
        const int64_t pix = pix0 + i;
        const int32_t* base = p.base + cls[i] * p.MCp;
        for (int64_t m = 0; m < p.M; ++m) {
          const bool last = p.epilogue && n == p.N - 1 && m == p.M - 1;
          for (int64_t co = 0; co < p.Co; ++co) {
            const int64_t col = m * p.Cop + co;
            const int32_t dot = base[col] - 2 * static_cast<int32_t>(acc[col]);
            if (p.pairs) p.pairs[((m * p.N + n) * p.P + pix) * p.Co + co] = dot;
            if (!p.out) continue;
            float& o = p.out[pix * p.Co + co];
            o += sc[col] * static_cast<float>(dot);
            if (last) o = epilogue_value(p, o, pix, co);
          }
        }
      }
    }
  }
}

std::string conv_engine(const std::string& isa_name, int64_t C, int64_t KH, int64_t KW, int64_t sw) {
  const int lane = conv_lane(parse_isa(isa_name), C, KH, KW, sw);
  return lane == 16 ? "lane16" : lane == 32 ? "lane32" : "word";
}

bool run_pack_signs(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, bool channels_last,
                    int mode, float v, uint64_t* out, const std::string& isa_name, int threads) {
  const Isa isa = parse_isa(isa_name);
  if (mode != kModeSign && mode != kModeHv) throw std::invalid_argument("mode: expected 0 or 1");
  PackJob j{x, B, C, H, W, channels_last, mode, &v, 1, out, 0, 0, ceil_div(C, 64), H, W, 0, {0, 0},
            {nullptr, nullptr}};
  const int64_t rows = B * H;
  const int64_t row_work = std::max<int64_t>(1, C * W);
  const int nt = rows * row_work < (1 << 16) ? 1 : resolve_threads(threads);
  std::atomic<bool> nan{false};
  parallel_for(rows, nt, std::max<int64_t>(1, (1 << 14) / row_work), [&](int64_t r0, int64_t r1) {
    if (pack_rows(j, isa, r0, r1)) nan.store(true, std::memory_order_relaxed);
  });
  return nan.load(std::memory_order_relaxed);
}

int run_mbn_conv2d(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, bool channels_last,
                    const uint64_t* w, int64_t M, int64_t Co, int64_t KH, int64_t KW, int mode,
                    const float* v, int64_t N, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                    const float* alpha, const float* beta, const float* bias, const float* residual,
                    float clamp_lo, float clamp_hi, float* out, int32_t* pairs,
                    const std::string& isa_name, int threads) {
  const Isa isa = parse_isa(isa_name);
  if (mode != kModeSign && mode != kModeHv) throw std::invalid_argument("mode: expected 0 or 1");
  if (mode == kModeSign) N = 1;
  if (out && (!alpha || !beta)) throw std::invalid_argument("mbn_conv2d: out needs alpha and beta");
  if (!(clamp_lo <= clamp_hi))
    throw std::invalid_argument("mbn_conv2d: expected clamp_lo <= clamp_hi (not NaN)");
  ConvPlan p{};
  p.B = B, p.C = C, p.H = H, p.W = W, p.Kw = ceil_div(C, 64), p.Hp = H + 2 * ph, p.Wp = W + 2 * pw;
  p.M = M, p.Co = Co;
  p.KH = KH, p.KW = KW, p.sh = sh, p.sw = sw, p.ph = ph, p.pw = pw;
  p.OH = (p.Hp - KH) / sh + 1, p.OW = (p.Wp - KW) / sw + 1, p.P = B * p.OH * p.OW;
  p.N = N;
  p.lane = conv_lane(isa, C, KH, KW, sw);
  p.fold_G = 0, p.NG = KW;
  if (p.lane) {
    p.K = KH * KW;
  } else if (p.Kw == 1 && C <= 32 && KW >= 2) {
    p.fold_G = std::min<int64_t>(64 / C, KW);
    p.NG = ceil_div(KW, p.fold_G);
    p.K = KH * p.NG;
  } else {
    p.K = KH * KW * p.Kw;
  }
  p.Cop = round_up(Co, p.lane ? 16 : 8), p.MCp = M * p.Cop;
  p.UW = p.lane == 16 ? ceil_div(p.OW, 2) : p.OW;
  p.R = p.lane ? small_block_units(p.UW, p.MCp / 16) : block_rows(isa, p.MCp / 8);
  if (p.OH <= 0 || p.OW <= 0 || p.P == 0) return 0;  // x not read (callers rule this out)
  const int nt = resolve_threads(threads);

  // Scratch: activation planes, transposed weights, tables (one allocation).
  const int64_t elem_bytes = p.lane ? p.lane / 8 : 8;
  p.plane = B * p.Hp * p.Wp * (p.lane ? 1 : p.Kw);  // elements (words) per base
  const int64_t act_words = N * p.plane;
  std::vector<int32_t> row_cls, col_cls;
  const auto row_classes = tap_classes(p.OH, sh, ph, KH, H, row_cls);
  const auto col_classes = tap_classes(p.OW, sw, pw, KW, W, col_cls);
  const int64_t n_cls = static_cast<int64_t>(row_classes.size() * col_classes.size());
  thread_local Scratch scratch;
  // Folded planes: one for full groups of fold_G taps, one more when the last group has 2..G-1 taps.
  const int64_t last_taps = p.fold_G ? KW - (p.NG - 1) * p.fold_G : 0;
  const int64_t full_taps = p.NG > 1 ? p.fold_G : last_taps;
  const int n_fold = !p.fold_G ? 0 : (last_taps > 1 && last_taps != full_taps) ? 2 : 1;
  // + 256 bytes: the lane engines compute whole blocks of R units (R <= 24, 4 bytes each) even past the
  // last row's end, reading up to 4 bytes at each.
  const size_t act_bytes = round_up(act_words * elem_bytes + 256, 64);
  const size_t wt_bytes = round_up(p.K * p.MCp * (p.lane ? 4 : 8), 64);
  char* buf = static_cast<char*>(scratch.get(act_bytes * (1 + n_fold) + wt_bytes));
  uint64_t* act = reinterpret_cast<uint64_t*>(buf);
  void* wt = buf + act_bytes * (1 + n_fold);

  PackJob j{x, B, C, H, W, channels_last, mode, v, N, act, ph, pw, p.Kw, p.Hp, p.Wp,
            n_fold, {full_taps, last_taps}, {act + act_bytes / 8, act + 2 * (act_bytes / 8)},
            static_cast<int>(elem_bytes)};
  // koff[k]: offset of GEMM row k from a pixel's first element, the folded plane included.
  std::vector<int64_t> koff(p.K);
  for (int64_t kh = 0; kh < KH; ++kh) {
    if (p.lane) {
      for (int64_t kw = 0; kw < KW; ++kw) koff[kh * KW + kw] = kh * p.Wp + kw;
    } else if (!p.fold_G) {
      for (int64_t j = 0; j < KW * p.Kw; ++j) koff[kh * KW * p.Kw + j] = kh * p.Wp * p.Kw + j;
    } else {
      const int64_t fold_plane = act_bytes / 8;
      const int64_t last_plane = last_taps == 1 ? 0 : n_fold == 2 ? 2 * fold_plane : fold_plane;
      for (int64_t g = 0; g < p.NG; ++g)
        koff[kh * p.NG + g] = (g + 1 < p.NG ? fold_plane : last_plane) + kh * p.Wp + g * p.fold_G;
    }
  }
  // 1. Weights [M, Co, KH, KW, Kw] -> wt[k][m * Cop + co] (padded columns are zero; folded taps
  //    concatenated like the activations; lane 16: the 16 bits twice), and the per-tap popcounts for the
  //    padding correction.
  std::memset(wt, 0, wt_bytes);
  uint64_t* wt64 = static_cast<uint64_t*>(wt);
  uint32_t* wt32 = static_cast<uint32_t*>(wt);
  std::vector<int32_t> tap_pc(M * p.Cop * KH * KW, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t co = 0; co < Co; ++co) {
      const int64_t col = m * p.Cop + co;
      const uint64_t* src = w + (m * Co + co) * KH * KW * p.Kw;
      for (int64_t k = 0; k < KH * KW * p.Kw; ++k) {
        tap_pc[col * KH * KW + k / p.Kw] += popcount64(src[k]);
        if (p.lane) {  // Kw == 1: k = kh * KW + kw
          const uint32_t bits = static_cast<uint32_t>(src[k]);
          wt32[k * p.MCp + col] = p.lane == 16 ? bits | bits << 16 : bits;
        } else if (!p.fold_G) {
          wt64[k * p.MCp + col] = src[k];
        } else {  // Kw == 1: k = kh * KW + kw
          const int64_t kh = k / KW, kw = k % KW, g = kw / p.fold_G, u = kw % p.fold_G;
          wt64[(kh * p.NG + g) * p.MCp + col] |= src[k] << (u * C);
        }
      }
    }
  // base[cls][col] = KH*KW*C - sum over padded taps of (C - 2 popcount(w_tap)): padded taps hold
  // zero activation words, so the GEMM counted them as C - 2 popcount(w_tap) instead of 0.
  std::vector<int32_t> base(n_cls * p.MCp, 0);
  for (size_t rc = 0; rc < row_classes.size(); ++rc)
    for (size_t cc = 0; cc < col_classes.size(); ++cc) {
      int32_t* bcls = base.data() + (rc * col_classes.size() + cc) * p.MCp;
      const TapRange r = row_classes[rc], c = col_classes[cc];
      for (int64_t col = 0; col < p.MCp; ++col) {
        int64_t corr = 0;
        for (int64_t kh = 0; kh < KH; ++kh)
          for (int64_t kw = 0; kw < KW; ++kw)
            if (kh < r.lo || kh >= r.hi || kw < c.lo || kw >= c.hi)
              corr += C - 2 * tap_pc[col * KH * KW + kh * KW + kw];
        bcls[col] = static_cast<int32_t>(KH * KW * C - corr);
      }
    }
  std::vector<float> scale(N * p.MCp, 0.0f);
  if (out)
    for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t co = 0; co < Co; ++co)
        scale[n * p.MCp + m * p.Cop + co] = alpha[m * Co + co] * beta[n];
  std::vector<int32_t> vec_m(p.MCp / 8), vec_co(p.MCp / 8);
  for (int64_t g = 0; g < p.MCp / 8; ++g) vec_m[g] = g * 8 / p.Cop, vec_co[g] = g * 8 % p.Cop;

  p.act = act, p.koff = koff.data(), p.wt = wt64, p.base = base.data(), p.row_cls = row_cls.data();
  p.col_cls = col_cls.data(), p.n_col_cls = static_cast<int64_t>(col_classes.size());
  p.scale = scale.data(), p.vec_m = vec_m.data(), p.vec_co = vec_co.data();
  p.out = out, p.pairs = pairs;
  p.bias = bias, p.residual = residual, p.clamp_lo = clamp_lo, p.clamp_hi = clamp_hi;
  p.epilogue = out && (bias || residual || clamp_lo > -INFINITY || clamp_hi < INFINITY);
  std::atomic<bool> residual_bad{false};
  p.residual_bad = &residual_bad;

  // 2. Pack the activations (all bases) into the zero-padded NHWC bit planes, then 3. the binary GEMM
  //    over pixel blocks (each block owns its output rows: no races).
  std::atomic<bool> x_has_nan{false};
  const auto flags = [&] {
    return (x_has_nan.load(std::memory_order_relaxed) ? kXHasNan : 0) |
           (residual_bad.load(std::memory_order_relaxed) ? kResidualNonFinite : 0);
  };
  const auto pack = [&](int64_t r0, int64_t r1) {
#if BK_X86
    if (p.lane) {
      if (pack_rows_small_avx512(j, r0, r1)) x_has_nan.store(true, std::memory_order_relaxed);
      return;
    }
#endif
    if (pack_rows(j, isa, r0, r1)) x_has_nan.store(true, std::memory_order_relaxed);
  };
  // GEMM over units [u0, u1): output pixels, or pixel pairs for lane 16 (ConvPlan::lane).
  const auto gemm = [&](int64_t u0, int64_t u1) {
#if BK_X86
    if (p.lane == 16) return conv_small16_avx512(p, u0, u1);
    if (p.lane == 32) return conv_small32_avx512(p, u0, u1);
#endif
    switch (isa) {
#if BK_X86
      case Isa::Avx512: conv_blocks_avx512(p, u0, u1); break;
      case Isa::Avx2: conv_blocks_avx2(p, u0, u1); break;
#endif
      default: conv_blocks_scalar(p, u0, u1); break;
    }
  };
  const double work = static_cast<double>(p.P) * N * p.K * p.MCp;  // word x column ops
  const int64_t rows = B * p.Hp, row_work = std::max<int64_t>(1, N * C * W);
  if (nt > 1 && B >= 8 * nt && work >= 2e5) {
    // Enough images to share: one thread packs and convolves whole images, so an image's bit planes
    // are still in its core's cache when the GEMM reads them, and there is one parallel pass.
    const int64_t img_units = p.OH * p.UW;
    parallel_for(B, nt, 1, [&](int64_t b0, int64_t b1) {
      pack(b0 * p.Hp, b1 * p.Hp);
      gemm(b0 * img_units, b1 * img_units);
    });
    return flags();
  }
  parallel_for(rows, rows * row_work < (1 << 16) ? 1 : nt, std::max<int64_t>(1, (1 << 14) / row_work),
               pack);
  // NaN has no sign: the caller raises, so the GEMM is skipped.
  if (x_has_nan.load(std::memory_order_relaxed)) return kXHasNan;
  // Blocks of R output pixels; the lane engines take whole output rows (their blocks stay in a row).
  const int64_t grain = p.lane ? p.UW : p.R, units = B * p.OH * p.UW, nblk = ceil_div(units, grain);
  const int gemm_threads = work < 2e5 ? 1 : nt;
  parallel_for(nblk, gemm_threads, std::max<int64_t>(1, nblk / (gemm_threads * 16)),
               [&](int64_t b0, int64_t b1) { gemm(b0 * grain, std::min(b1 * grain, units)); });
  return flags();
}

}  // namespace bk
