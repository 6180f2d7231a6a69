// A chain of packed convs run in one call (whole-network inference, docs/cpu_kernels.md "Chains").
//
// Each conv is prepared once when it is added (its GEMM columns, padding correction, scale table and
// kernel choice: what run_conv redoes on every call) and every activation it produces reaches its
// consumers as the bit planes they read: the producer's GEMM writes a band of output rows through the
// fused epilogue into a one-image float slab, and the same worker packs exactly those rows into every
// consumer's planes while they are in cache (bits identical to packing the float tensor: the packer
// reads the very floats the epilogue wrote). Slabs of values no later step reads are reused, so a whole
// image's working set stays in L2; no tensor is written but the chain's output.
//
// Float buffers are numbered: 0 is the chain's input ([B, C, H, W], NCHW or channels_last), the last
// one its output ([B, H, W, C], channels_last); the others exist per image only. A conv reads one buffer
// (through its planes), may add a residual read from an earlier buffer (identity, or option-A: every
// s-th row / column and a channel offset, zeros outside) and writes one buffer.
#pragma once
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/common/conv_params.h"
#include "cpu/common/conv_plan.h"
#include "cpu/common/padding.h"
#include "cpu/common/select_kernel.h"

namespace bk {

// One conv of a chain as the caller describes it (pointers are read only while add_conv runs).
struct ChainConvSpec {
  int64_t src, dst;                          // float buffer ids
  int64_t residual = -1;                     // float buffer id, or -1 (none)
  int64_t res_stride = 1, res_offset = 0;    // residual[oh, ow, co] = buf[oh*s, ow*s, co - offset]
  const uint64_t* w = nullptr;               // [M, Co, KH, KW, ceil(C / 64)]
  int64_t C = 1;                             // input channels of w (must be the src buffer's)
  int64_t M = 1, Co = 1, KH = 1, KW = 1, sh = 1, sw = 1, ph = 0, pw = 0;
  int mode = 0;                              // kModeSign / kModeHv
  std::vector<float> v;                      // [N] (mode hv)
  std::vector<float> alpha, beta, bias;      // [M * Co], [N] (sign: [1]), [Co] or empty
  float clamp_lo = -INFINITY, clamp_hi = INFINITY;
};

class Chain {
 public:
  // buffers: (H, W, C) of every float buffer, 0 the input, the last the output.
  Chain(const std::string& isa, std::vector<std::vector<int64_t>> buffers);
  ~Chain();
  // Adds the next conv (steps run in the order they are added). Throws std::invalid_argument when the
  // spec does not fit the buffers or an earlier step.
  void add_conv(const ChainConvSpec& spec);
  // x float32 [B, C0, H0, W0] NCHW- or channels_last-contiguous (x_channels_last), out [B, ...] float32
  // channels_last. Returns a bit set of ConvFlags (as
  // run_mbn_conv2d: kXHasNan when a packed activation held a NaN, kResidualNonFinite when a residual
  // held a NaN or +-inf; the output is then not a result, the caller re-runs layer by layer to raise).
  int run(const float* x, bool x_channels_last, float* out, int64_t B, int threads);
  // Which engine each conv runs on ("lane16", "lane32", "word" / "word-folded").
  std::vector<std::string> engines() const;

  struct Step;
  struct Context;

 private:
  void finalize();
  void run_image(Context& ctx, const float* x, bool x_channels_last, float* out, int64_t b, int threads,
                 std::atomic<int>& flags);
  void compute_rows(size_t step, Context& ctx, int64_t oh0, int64_t oh1, std::atomic<int>& flags) const;
  void pack_rows_of(int64_t buffer, Context& ctx, int64_t h0, int64_t h1, std::atomic<int>& flags) const;

  Isa isa_;
  std::vector<std::vector<int64_t>> buffers_;
  std::vector<std::unique_ptr<Step>> steps_;
  std::vector<std::vector<int64_t>> consumers_;  // per buffer: the steps that read it (as planes)
  bool finalized_ = false;
  // Slab / plane offsets inside a context, by buffer and by step (the liveness-based layout).
  std::vector<size_t> slab_off_, plane_off_, res_off_;
  size_t context_bytes_ = 0;
  std::vector<std::unique_ptr<Context>> contexts_;
  std::mutex run_mutex_;  // one run at a time per chain (the contexts are reused)
};

}  // namespace bk
