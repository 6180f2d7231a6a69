// Planning one conv call (in the spirit of larq compute-engine core/bconv2d/params.h): the geometry,
// the word / lane layout and the GEMM shape of the chosen kernel, the scratch layout and the GEMM row
// offsets. Pure functions of the arguments; conv.cpp fills in the operands.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cpu/common/conv_params.h"
#include "cpu/common/engine.h"
#include "cpu/common/select_kernel.h"

namespace bk {

// Sizes of a conv (N as given: run_conv sets N = 1 for mode sign before calling this).
ConvGeometry make_geometry(const ConvArgs& a);

// geo, word, lane and gemm of the plan for kernel k; operands, tables and epilogue left empty.
ConvPlan make_plan(const ConvGeometry& g, const KernelChoice& k);

// The per-thread scratch: the N activation planes (plane_bytes, with slack), one more plane_bytes per
// folded plane, then the GEMM weights (weight_bytes).
struct ScratchLayout {
  int64_t elem_bytes;  // activation element: 8 (word), 4 (lane 32), 2 (lane 16)
  size_t plane_bytes;  // 64-byte multiple
  // Folded planes: one for full groups of taps_per_word taps (full_taps), one more when the last group
  // has 2..G-1 taps (last_taps); fold_count = 0, 1 or 2.
  int fold_count;
  int64_t full_taps, last_taps;
  size_t weight_bytes;  // 64-byte multiple
  size_t total_bytes() const { return plane_bytes * (1 + fold_count) + weight_bytes; }
};
ScratchLayout make_scratch_layout(const ConvPlan& p);

// koff[k]: offset (in activation elements) of GEMM row k from a pixel's first element, the folded
// plane included (see GemmOperands::act).
std::vector<int64_t> make_row_offsets(const ConvPlan& p, const ScratchLayout& s);

}  // namespace bk
