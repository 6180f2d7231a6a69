// Every ISA-specific kernel of the CPU engine, declared in one place. The definitions live in
// scalar/, avx2/ and avx512/ (one folder per instruction set); select_kernel.cpp picks among them and
// conv.cpp / pack.cpp / nan_scan.cpp call what it picked. Nothing here is called on a CPU that lacks the
// ISA (cpu_supports / cpu_has_bitalg are checked first).
#pragma once
#include <cstdint>

#include "cpu/common/conv_params.h"
#include "cpu/common/engine.h"
#include "cpu/common/isa.h"
#include "cpu/common/pack.h"

namespace bk {

// Word engines: output pixels [pix_begin, pix_end) in blocks of plan.gemm.block, all n and columns.
// Lane engines: units [u_begin, u_end) (see LaneLayout), all n and columns.
using GemmKernel = void (*)(const ConvPlan& p, int64_t begin, int64_t end);
// Padded rows [r0, r1) of the flattened (b, hp) row index space, all bases, word layout (no folded
// planes: pack.cpp adds them); NaN is looked for in base 0. Returns true when a NaN was read. The row
// walk (for_each_padded_row) is instantiated in each ISA's translation unit, so the row packer is a
// direct call the compiler can specialise.
using PackRowsKernel = bool (*)(const PackJob& j, int64_t r0, int64_t r1);

// scalar/ (portable C++, every host)
void conv_blocks_scalar(const ConvPlan& p, int64_t pix_begin, int64_t pix_end);
bool pack_rows_scalar(const PackJob& j, int64_t r0, int64_t r1);
bool has_nan_scalar(const float* x, int64_t n);
// STE backward (ste_backward.cpp): elements [0, n) of same-layout buffers; see engine.h.
void ste_grad_x_scalar(const SteGradArgs& a, int64_t begin, int64_t end);
void clamp_grad_scalar(const float* g, const float* out, float lo, float hi, float* dst, int64_t begin,
                       int64_t end);
// Window bits and their backward (engine.h); begin is a multiple of 8 (whole bytes of the masks).
void interval_bits_scalar(const IntervalBitsArgs& a, int64_t begin, int64_t end);
void masked_grad_scalar(const MaskedGradArgs& a, int64_t begin, int64_t end);

#if BK_X86
// avx2/ (AVX2 + FMA + POPCNT)
void conv_blocks_avx2(const ConvPlan& p, int64_t pix_begin, int64_t pix_end);
bool pack_rows_avx2(const PackJob& j, int64_t r0, int64_t r1);
bool has_nan_avx2(const float* x, int64_t n);
void ste_grad_x_avx2(const SteGradArgs& a, int64_t begin, int64_t end);
void clamp_grad_avx2(const float* g, const float* out, float lo, float hi, float* dst, int64_t begin,
                     int64_t end);
void interval_bits_avx2(const IntervalBitsArgs& a, int64_t begin, int64_t end);
void masked_grad_avx2(const MaskedGradArgs& a, int64_t begin, int64_t end);

// avx512/ (F + BW + DQ + VL + VPOPCNTDQ; lane 16 also BITALG)
void conv_blocks_avx512(const ConvPlan& p, int64_t pix_begin, int64_t pix_end);
void conv_lane16_avx512(const ConvPlan& p, int64_t u_begin, int64_t u_end);
void conv_lane32_avx512(const ConvPlan& p, int64_t u_begin, int64_t u_end);
bool pack_rows_avx512(const PackJob& j, int64_t r0, int64_t r1);
void ste_grad_x_avx512(const SteGradArgs& a, int64_t begin, int64_t end);
void clamp_grad_avx512(const float* g, const float* out, float lo, float hi, float* dst, int64_t begin,
                       int64_t end);
void interval_bits_avx512(const IntervalBitsArgs& a, int64_t begin, int64_t end);
void masked_grad_avx512(const MaskedGradArgs& a, int64_t begin, int64_t end);
// Rows [r0, r1) for job.elem_bytes 2 or 4 (the lane engines' one element per pixel).
bool pack_rows_lane_avx512(const PackJob& job, int64_t r0, int64_t r1);
bool has_nan_avx512(const float* x, int64_t n);
#endif

}  // namespace bk
