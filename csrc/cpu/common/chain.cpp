// Chain of packed convs (chain.h): prepared once, run image by image with the bit-plane hand-off.
#include "cpu/common/chain.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>

#include "cpu/common/engine.h"
#include "cpu/common/kernels.h"
#include "cpu/common/output_transform.h"
#include "cpu/common/thread_pool.h"
#include "cpu/common/weights.h"

namespace bk {
namespace {

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
using AlignedPtr = std::unique_ptr<char, AlignedFree>;

AlignedPtr aligned_bytes(size_t bytes) {
  bytes = static_cast<size_t>(round_up(static_cast<int64_t>(std::max<size_t>(bytes, 64)), 64));
  char* p = static_cast<char*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  return AlignedPtr(p);
}

size_t slab_bytes(const std::vector<int64_t>& hwc) {
  return static_cast<size_t>(round_up(hwc[0] * hwc[1] * hwc[2] * 4, 64));
}

std::invalid_argument bad(const std::string& what) { return std::invalid_argument("chain: " + what); }

}  // namespace

struct Chain::Step {
  ChainConvSpec spec;  // w not kept
  int64_t N;
  KernelChoice kernel;
  GemmKernel gemm;
  ConvPlan plan;  // B = 1; act / out / residual are set per image
  ScratchLayout layout;
  std::vector<int64_t> koff;
  AlignedPtr wt;
  PaddingTable padding;
  std::vector<float> scale;
  std::vector<int32_t> col_m, col_co;
  bool residual_in_place = false;  // the residual buffer is read as it is (no tile)
  double work = 0;                 // word x column operations per image

  size_t planes_bytes() const { return layout.plane_bytes * (1 + layout.fold_count); }
};

struct Chain::Context {
  AlignedPtr mem;
  std::vector<float*> slab;        // per buffer
  std::vector<uint64_t*> planes;   // per step
  std::vector<float*> res_tile;    // per step (null when the residual is read in place)
  bool x_channels_last = true;     // layout of the input image (buffer 0)
  std::atomic<bool> busy{false};
};

Chain::Chain(const std::string& isa, std::vector<std::vector<int64_t>> buffers)
    : isa_(parse_isa(isa)), buffers_(std::move(buffers)), consumers_(buffers_.size()) {
  if (buffers_.size() < 2) throw bad("expected at least two buffers (input and output)");
  for (const auto& b : buffers_)
    if (b.size() != 3 || b[0] <= 0 || b[1] <= 0 || b[2] <= 0)
      throw bad("every buffer needs a positive (H, W, C)");
}

Chain::~Chain() = default;

void Chain::add_conv(const ChainConvSpec& in) {
  std::lock_guard<std::mutex> lock(run_mutex_);
  if (finalized_) throw bad("add_conv after the first run");
  const int64_t nbuf = static_cast<int64_t>(buffers_.size());
  const auto produced = [&](int64_t id) {
    if (id == 0) return true;
    for (const auto& s : steps_)
      if (s->spec.dst == id) return true;
    return false;
  };
  if (in.src < 0 || in.src >= nbuf || !produced(in.src)) throw bad("src must be the input or an earlier dst");
  if (in.dst <= 0 || in.dst >= nbuf || produced(in.dst)) throw bad("dst must be a buffer not written yet");
  if (in.residual >= nbuf || (in.residual >= 0 && !produced(in.residual)))
    throw bad("residual must be the input or an earlier dst");
  if (in.mode != kModeSign && in.mode != kModeHv) throw bad("mode: expected 0 or 1");
  if (!in.w) throw bad("w: null");
  if (in.C != buffers_[in.src][2]) throw bad("the weights' input channels differ from the src buffer's");

  auto s = std::make_unique<Step>();
  s->spec = in;
  s->spec.w = nullptr;
  s->N = in.mode == kModeSign ? 1 : static_cast<int64_t>(in.v.size());
  const auto& src = buffers_[in.src];
  const auto& dst = buffers_[in.dst];
  ConvArgs a{};
  a.B = 1, a.C = src[2], a.H = src[0], a.W = src[1], a.M = in.M, a.Co = in.Co, a.KH = in.KH, a.KW = in.KW;
  a.N = s->N, a.sh = in.sh, a.sw = in.sw, a.ph = in.ph, a.pw = in.pw;
  if (in.M < 1 || in.Co < 1 || in.KH < 1 || in.KW < 1 || in.sh < 1 || in.sw < 1 || in.ph < 0 || in.pw < 0 ||
      s->N < 1)
    throw bad("conv parameters out of range");
  const ConvGeometry g = make_geometry(a);
  if (g.OH != dst[0] || g.OW != dst[1] || in.Co != dst[2])
    throw bad("dst buffer shape does not match the conv's output");
  if (static_cast<int64_t>(in.alpha.size()) != in.M * in.Co || static_cast<int64_t>(in.beta.size()) != s->N ||
      (!in.bias.empty() && static_cast<int64_t>(in.bias.size()) != in.Co))
    throw bad("alpha / beta / bias sizes");
  if (!(in.clamp_lo <= in.clamp_hi)) throw bad("expected clamp_lo <= clamp_hi");
  if (in.residual >= 0) {
    const auto& r = buffers_[in.residual];
    const int64_t rs = in.res_stride;
    if (rs < 1 || ceil_div(r[0], rs) != g.OH || ceil_div(r[1], rs) != g.OW || in.res_offset < 0 ||
        in.res_offset + r[2] > in.Co)
      throw bad("residual buffer does not fit the output (stride / channel offset)");
    s->residual_in_place = rs == 1 && in.res_offset == 0 && r[2] == in.Co;
  }

  s->kernel = select_kernel(isa_, a.C, a.KH, a.KW, a.sw);
  s->gemm = gemm_kernel(s->kernel);
  s->plan = make_plan(g, s->kernel);
  s->layout = make_scratch_layout(s->plan);
  s->koff = make_row_offsets(s->plan, s->layout);
  s->wt = aligned_bytes(s->layout.weight_bytes);
  const std::vector<int32_t> tap_popcount =
      transpose_weights(s->plan, in.w, s->wt.get(), s->layout.weight_bytes);
  s->padding = make_padding_table(g, s->plan.gemm, tap_popcount);
  s->scale = make_scale_table(g, s->plan.gemm, s->spec.alpha.data(), s->spec.beta.data());
  make_column_groups(s->plan.gemm, s->col_m, s->col_co);
  ConvPlan& p = s->plan;
  p.ops.koff = s->koff.data(), p.ops.wt = reinterpret_cast<const uint64_t*>(s->wt.get());
  p.ops.scale = s->scale.data(), p.ops.col_m = s->col_m.data(), p.ops.col_co = s->col_co.data();
  p.pad = s->padding.view();
  p.pairs = nullptr;
  const float* bias = s->spec.bias.empty() ? nullptr : s->spec.bias.data();
  // out always exists; the residual pointer is set per band (only its presence matters here)
  const bool fused = bias || in.residual >= 0 || in.clamp_lo > -INFINITY || in.clamp_hi < INFINITY;
  p.epi = {fused, bias, nullptr, nullptr, in.clamp_lo, in.clamp_hi};
  s->work = static_cast<double>(g.OH * g.OW) * s->N * p.gemm.depth * p.gemm.cols;
  consumers_[in.src].push_back(static_cast<int64_t>(steps_.size()));
  steps_.push_back(std::move(s));
}

std::vector<std::string> Chain::engines() const {
  std::vector<std::string> names;
  for (const auto& s : steps_)
    names.push_back(std::string(engine_name(s->kernel.engine)) + (s->kernel.fold_taps ? "-folded" : ""));
  return names;
}

// Lays the per-image slabs, planes and residual tiles out in one block, reusing the space of values no
// later step reads (exact-size reuse, first fit): the working set of an image stays small and hot.
void Chain::finalize() {
  const int64_t nbuf = static_cast<int64_t>(buffers_.size()), nstep = static_cast<int64_t>(steps_.size());
  std::vector<int64_t> producer(nbuf, -2);
  producer[0] = -1;
  for (int64_t k = 0; k < nstep; ++k) producer[steps_[k]->spec.dst] = k;
  for (int64_t b = 1; b < nbuf; ++b)
    if (producer[b] == -2) throw bad("buffer " + std::to_string(b) + " is never written");
  std::vector<int64_t> last_use(nbuf);
  for (int64_t b = 0; b < nbuf; ++b) last_use[b] = producer[b];
  for (int64_t k = 0; k < nstep; ++k)
    if (const int64_t r = steps_[k]->spec.residual; r >= 0) last_use[r] = std::max(last_use[r], k);

  struct Item { int64_t start, end; size_t bytes; size_t* offset; };
  slab_off_.assign(nbuf, 0), plane_off_.assign(nstep, 0), res_off_.assign(nstep, 0);
  std::vector<Item> items;
  for (int64_t b = 1; b + 1 < nbuf; ++b)
    items.push_back({producer[b], last_use[b], slab_bytes(buffers_[b]), &slab_off_[b]});
  for (int64_t k = 0; k < nstep; ++k) {
    const Step& s = *steps_[k];
    items.push_back({producer[s.spec.src], k, s.planes_bytes(), &plane_off_[k]});
    if (s.spec.residual >= 0 && (!s.residual_in_place || s.spec.residual == 0))
      items.push_back({k, k, slab_bytes(buffers_[s.spec.dst]), &res_off_[k]});
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.start < y.start; });
  std::multimap<size_t, size_t> free_blocks;  // bytes -> offset
  std::vector<const Item*> active;
  size_t total = 0;
  for (const Item& it : items) {
    for (auto a = active.begin(); a != active.end();) {
      if ((*a)->end < it.start) {
        free_blocks.emplace((*a)->bytes, *(*a)->offset);
        a = active.erase(a);
      } else {
        ++a;
      }
    }
    const auto hit = free_blocks.find(it.bytes);
    if (hit != free_blocks.end()) {
      *it.offset = hit->second;
      free_blocks.erase(hit);
    } else {
      *it.offset = total;
      total += it.bytes;
    }
    active.push_back(&it);
  }
  context_bytes_ = total;
  finalized_ = true;
}

// Packs rows [h0, h1) of float buffer `buffer` into the planes of every step that reads it (with the
// zero padding rows above row 0 and below the last row), the way run_conv packs its input.
void Chain::pack_rows_of(int64_t buffer, Context& ctx, int64_t h0, int64_t h1,
                         std::atomic<int>& flags) const {
  for (const int64_t k : consumers_[buffer]) {
    const Step& s = *steps_[k];
    const ConvGeometry& g = s.plan.geo;
    const ScratchLayout& l = s.layout;
    uint64_t* act = ctx.planes[k];
    const int64_t fold_plane = static_cast<int64_t>(l.plane_bytes / 8);
    const bool channels_last = buffer != 0 || ctx.x_channels_last;
    const PackJob j{ctx.slab[buffer], 1, g.C, g.H, g.W, channels_last, s.spec.mode, s.spec.v.data(), s.N,
                    act, g.ph, g.pw,
                    s.plan.word.chan_words, g.Hp, g.Wp, l.fold_count, {l.full_taps, l.last_taps},
                    {act + fold_plane, act + 2 * fold_plane}, static_cast<int>(l.elem_bytes)};
    const int64_t r0 = h0 == 0 ? 0 : h0 + g.ph, r1 = h1 == g.H ? g.Hp : h1 + g.ph;
    bool nan;
#if BK_X86
    if (s.plan.lane.bits)
      nan = pack_rows_lane_avx512(j, r0, r1);
    else
#endif
      nan = pack_rows(j, s.kernel.isa, r0, r1);
    if (nan) flags.fetch_or(kXHasNan, std::memory_order_relaxed);
  }
}

// Output rows [oh0, oh1) of one step for one image: the residual rows (option A: gathered into a tile),
// the GEMM with the fused epilogue into the dst slab, then the hand-off of those rows to the consumers.
void Chain::compute_rows(size_t idx, Context& ctx, int64_t oh0, int64_t oh1, std::atomic<int>& flags) const {
  const Step& s = *steps_[idx];
  ConvPlan p = s.plan;
  const ConvGeometry& g = p.geo;
  p.ops.act = ctx.planes[idx];
  p.out = ctx.slab[s.spec.dst];
  std::atomic<bool> residual_bad{false};
  if (s.spec.residual >= 0) {
    const float* src = ctx.slab[s.spec.residual];
    const bool nchw = s.spec.residual == 0 && !ctx.x_channels_last;
    if (s.residual_in_place && !nchw) {
      p.epi.residual = src;
    } else {  // gather rows [oh0, oh1) as [OH][OW][Co]: every rs-th pixel, channels shifted by off
      const auto& r = buffers_[s.spec.residual];
      const int64_t rs = s.spec.res_stride, off = s.spec.res_offset, Hr = r[0], Wr = r[1], Cr = r[2];
      const int64_t Co = g.Co;
      float* tile = ctx.res_tile[idx];
      for (int64_t oh = oh0; oh < oh1; ++oh)
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          float* dst = tile + (oh * g.OW + ow) * Co;
          std::memset(dst, 0, sizeof(float) * off);
          if (nchw) {
            const float* px = src + (oh * rs) * Wr + ow * rs;
            for (int64_t c = 0; c < Cr; ++c) dst[off + c] = px[c * Hr * Wr];
          } else {
            std::memcpy(dst + off, src + ((oh * rs) * Wr + ow * rs) * Cr, sizeof(float) * Cr);
          }
          std::memset(dst + off + Cr, 0, sizeof(float) * (Co - off - Cr));
        }
      p.epi.residual = tile;
    }
    p.epi.residual_bad = &residual_bad;
  }
  const int64_t UW = p.lane.units_per_row;
  s.gemm(p, oh0 * UW, oh1 * UW);
  if (residual_bad.load(std::memory_order_relaxed))
    flags.fetch_or(kResidualNonFinite, std::memory_order_relaxed);
  pack_rows_of(s.spec.dst, ctx, oh0, oh1, flags);
}

void Chain::run_image(Context& ctx, const float* x, bool x_channels_last, float* out, int64_t b, int threads,
                      std::atomic<int>& flags) {
  ctx.x_channels_last = x_channels_last;
  const int64_t nbuf = static_cast<int64_t>(buffers_.size());
  const auto elems = [&](int64_t id) { return buffers_[id][0] * buffers_[id][1] * buffers_[id][2]; };
  char* base = ctx.mem.get();
  ctx.slab.resize(nbuf), ctx.planes.resize(steps_.size()), ctx.res_tile.resize(steps_.size());
  ctx.slab[0] = const_cast<float*>(x) + b * elems(0);
  ctx.slab[nbuf - 1] = out + b * elems(nbuf - 1);
  for (int64_t id = 1; id + 1 < nbuf; ++id) ctx.slab[id] = reinterpret_cast<float*>(base + slab_off_[id]);
  for (size_t k = 0; k < steps_.size(); ++k) {
    ctx.planes[k] = reinterpret_cast<uint64_t*>(base + plane_off_[k]);
    ctx.res_tile[k] = reinterpret_cast<float*>(base + res_off_[k]);
  }
  // Rows of a step split over `threads` only when the step is big enough to pay for the fork / join.
  const auto over_rows = [&](int64_t rows, double work, const std::function<void(int64_t, int64_t)>& fn) {
    const int nt = work < 2e5 ? 1 : threads;
    if (nt <= 1) return fn(0, rows);
    parallel_for(rows, nt, std::max<int64_t>(1, rows / (nt * 4)), fn);
  };
  over_rows(buffers_[0][0], static_cast<double>(elems(0)) * 8,
            [&](int64_t h0, int64_t h1) { pack_rows_of(0, ctx, h0, h1, flags); });
  for (size_t k = 0; k < steps_.size(); ++k)
    over_rows(steps_[k]->plan.geo.OH, steps_[k]->work,
              [&](int64_t oh0, int64_t oh1) { compute_rows(k, ctx, oh0, oh1, flags); });
}

int Chain::run(const float* x, bool x_channels_last, float* out, int64_t B, int threads) {
  std::lock_guard<std::mutex> lock(run_mutex_);
  if (steps_.empty()) throw bad("no convs");
  if (!finalized_) finalize();
  if (B <= 0) return 0;
  const int nt = std::max(1, std::min(threads, 256));
  // Enough images: one thread runs the whole chain on one image at a time (its working set stays in
  // its core's cache, one parallel pass for the whole network). Few images: steps split rows.
  const bool by_image = nt > 1 && B >= nt && (B % nt == 0 || B >= 4 * nt);
  const size_t need = by_image ? static_cast<size_t>(nt) : 1;
  while (contexts_.size() < need) {
    auto c = std::make_unique<Context>();
    c->mem = aligned_bytes(context_bytes_);
    contexts_.push_back(std::move(c));
  }
  std::atomic<int> flags{0};
  if (!by_image) {
    for (int64_t b = 0; b < B; ++b) run_image(*contexts_[0], x, x_channels_last, out, b, nt, flags);
    return flags.load();
  }
  parallel_for(B, nt, 1, [&](int64_t b0, int64_t b1) {
    Context* ctx = nullptr;
    for (auto& c : contexts_) {
      bool expected = false;
      if (c->busy.compare_exchange_strong(expected, true)) {
        ctx = c.get();
        break;
      }
    }
    if (!ctx) throw std::logic_error("chain: no free context");
    struct Release {
      Context* c;
      ~Release() { c->busy.store(false); }
    } release{ctx};
    for (int64_t b = b0; b < b1; ++b) run_image(*ctx, x, x_channels_last, out, b, 1, flags);
  });
  return flags.load();
}

}  // namespace bk
