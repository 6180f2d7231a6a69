// Binary conv driver: validates, picks the kernel (select_kernel.h), plans (conv_plan.h), lays out the
// per-thread scratch, packs activations once, re-lays weights out as GEMM columns (weights.h), builds
// the padding correction (padding.h) and the scale table (output_transform.h), then runs the chosen
// XNOR-popcount GEMM over pixel blocks on the thread pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/common/conv_plan.h"
#include "cpu/common/engine.h"
#include "cpu/common/kernels.h"
#include "cpu/common/output_transform.h"
#include "cpu/common/padding.h"
#include "cpu/common/select_kernel.h"
#include "cpu/common/thread_pool.h"
#include "cpu/common/weights.h"

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

int resolve_threads(int threads) { return std::max(1, std::min(threads, 256)); }

}  // namespace

std::string conv_engine(const std::string& isa_name, int64_t C, int64_t KH, int64_t KW, int64_t sw) {
  return engine_name(select_kernel(parse_isa(isa_name), C, KH, KW, sw).engine);
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
  const ConvArgs args{x,    B,  C,  H,  W,  channels_last, w,     M,    Co,   KH,       KW,       mode,
                      v,    N,  sh, sw, ph, pw,            alpha, beta, bias, residual, clamp_lo, clamp_hi,
                      out,  pairs};
  return run_conv(args, select_kernel(isa, C, KH, KW, sw), threads);
}

int run_conv(const ConvArgs& a, const KernelChoice& kernel, int threads) {
  if (a.mode != kModeSign && a.mode != kModeHv) throw std::invalid_argument("mode: expected 0 or 1");
  if (a.out && (!a.alpha || !a.beta)) throw std::invalid_argument("mbn_conv2d: out needs alpha and beta");
  if (!(a.clamp_lo <= a.clamp_hi))
    throw std::invalid_argument("mbn_conv2d: expected clamp_lo <= clamp_hi (not NaN)");
  if (!kernel_supported(kernel, a.C, a.KH, a.KW, a.sw))
    throw std::invalid_argument(std::string("mbn_conv2d: kernel ") + engine_name(kernel.engine) + "/" +
                                isa_name(kernel.isa) + (kernel.fold_taps ? "/folded" : "") +
                                " cannot run this conv on this CPU");
  ConvArgs args = a;
  if (args.mode == kModeSign) args.N = 1;
  const ConvGeometry g = make_geometry(args);
  if (g.OH <= 0 || g.OW <= 0 || g.P == 0) return 0;  // x not read (callers rule this out)
  ConvPlan p = make_plan(g, kernel);
  const int nt = resolve_threads(threads);

  // Scratch: activation planes, folded planes, transposed weights (one allocation).
  const ScratchLayout layout = make_scratch_layout(p);
  thread_local Scratch scratch;
  char* buf = static_cast<char*>(scratch.get(layout.total_bytes()));
  uint64_t* act = reinterpret_cast<uint64_t*>(buf);
  void* wt = buf + layout.plane_bytes * (1 + layout.fold_count);
  const int64_t fold_plane = static_cast<int64_t>(layout.plane_bytes / 8);
  PackJob j{args.x, g.B, g.C, g.H, g.W, args.channels_last, args.mode, args.v, g.N, act, g.ph, g.pw,
            p.word.chan_words, g.Hp, g.Wp, layout.fold_count, {layout.full_taps, layout.last_taps},
            {act + fold_plane, act + 2 * fold_plane}, static_cast<int>(layout.elem_bytes)};

  // GEMM operands and tables: row offsets, weight columns, padding correction, scales, column groups.
  const std::vector<int64_t> koff = make_row_offsets(p, layout);
  const std::vector<int32_t> tap_popcount = transpose_weights(p, args.w, wt, layout.weight_bytes);
  const PaddingTable padding = make_padding_table(g, p.gemm, tap_popcount);
  const std::vector<float> scale = make_scale_table(g, p.gemm, args.out ? args.alpha : nullptr, args.beta);
  std::vector<int32_t> col_m, col_co;
  make_column_groups(p.gemm, col_m, col_co);
  p.ops.act = act, p.ops.koff = koff.data(), p.ops.wt = static_cast<const uint64_t*>(wt);
  p.ops.scale = scale.data(), p.ops.col_m = col_m.data(), p.ops.col_co = col_co.data();
  p.pad = padding.view();
  p.out = args.out, p.pairs = args.pairs;
  std::atomic<bool> residual_bad{false};
  p.epi = {epilogue_is_fused(args.out, args.bias, args.residual, args.clamp_lo, args.clamp_hi), args.bias,
           args.residual, &residual_bad, args.clamp_lo, args.clamp_hi};

  // Pack the activations (all bases) into the zero-padded NHWC planes, then run the binary GEMM over
  // pixel blocks (each block owns its output rows: no races).
  std::atomic<bool> x_has_nan{false};
  const auto flags = [&] {
    return (x_has_nan.load(std::memory_order_relaxed) ? kXHasNan : 0) |
           (residual_bad.load(std::memory_order_relaxed) ? kResidualNonFinite : 0);
  };
  const Isa isa = kernel.isa;
  const bool lanes = p.lane.bits != 0;
  const auto pack = [&](int64_t r0, int64_t r1) {
#if BK_X86
    if (lanes) {
      if (pack_rows_lane_avx512(j, r0, r1)) x_has_nan.store(true, std::memory_order_relaxed);
      return;
    }
#endif
    if (pack_rows(j, isa, r0, r1)) x_has_nan.store(true, std::memory_order_relaxed);
  };
  // GEMM over units [u0, u1): output pixels, or pixel pairs for lane 16 (LaneLayout).
  const GemmKernel gemm = gemm_kernel(kernel);
  const double work = static_cast<double>(g.P) * g.N * p.gemm.depth * p.gemm.cols;  // word x column ops
  const int64_t rows = g.B * g.Hp, row_work = std::max<int64_t>(1, g.N * g.C * g.W);
  const int64_t UW = p.lane.units_per_row;
  if (nt > 1 && g.B >= 8 * nt && work >= 2e5) {
    // Enough images to share: one thread packs and convolves whole images, so an image's bit planes
    // are still in its core's cache when the GEMM reads them, and there is one parallel pass.
    const int64_t img_units = g.OH * UW;
    parallel_for(g.B, nt, 1, [&](int64_t b0, int64_t b1) {
      pack(b0 * g.Hp, b1 * g.Hp);
      gemm(p, b0 * img_units, b1 * img_units);
    });
    return flags();
  }
  parallel_for(rows, rows * row_work < (1 << 16) ? 1 : nt, std::max<int64_t>(1, (1 << 14) / row_work),
               pack);
  // NaN has no sign: the caller raises, so the GEMM is skipped.
  if (x_has_nan.load(std::memory_order_relaxed)) return kXHasNan;
  // Blocks of R output pixels; the lane engines take whole output rows (their blocks stay in a row).
  const int64_t grain = lanes ? UW : p.gemm.block, units = g.B * g.OH * UW, nblk = ceil_div(units, grain);
  const int gemm_threads = work < 2e5 ? 1 : nt;
  parallel_for(nblk, gemm_threads, std::max<int64_t>(1, nblk / (gemm_threads * 16)),
               [&](int64_t b0, int64_t b1) { gemm(p, b0 * grain, std::min(b1 * grain, units)); });
  return flags();
}

}  // namespace bk
