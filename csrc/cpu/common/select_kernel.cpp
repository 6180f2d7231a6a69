#include "cpu/common/select_kernel.h"

#include <algorithm>

namespace bk {
namespace {

bool can_fold(int64_t C, int64_t KW) { return C <= 32 && KW >= 2; }

bool can_lane32(Isa isa, int64_t C) { return isa == Isa::Avx512 && C <= 32; }

bool can_lane16(Isa isa, int64_t C, int64_t KH, int64_t KW, int64_t sw) {
  return isa == Isa::Avx512 && C <= 16 && sw == 1 && cpu_has_bitalg() && KH * KW * C < 65536;
}

}  // namespace

KernelChoice select_kernel(Isa isa, int64_t C, int64_t KH, int64_t KW, int64_t sw) {
  KernelChoice k{isa, Engine::Word, can_fold(C, KW)};
  if (!can_lane32(isa, C)) return k;
  const int64_t G = KW >= 2 ? std::min<int64_t>(64 / C, KW) : 1;
  const double word = 2.0 * KH * ceil_div(KW, G), lane32 = static_cast<double>(KH * KW);
  if (can_lane16(isa, C, KH, KW, sw) && lane32 / 2 < word) return {isa, Engine::Lane16, false};
  if (lane32 < word) return {isa, Engine::Lane32, false};
  return k;
}

bool kernel_supported(const KernelChoice& k, int64_t C, int64_t KH, int64_t KW, int64_t sw) {
  if (!cpu_supports(k.isa)) return false;
  switch (k.engine) {
    case Engine::Word: return !k.fold_taps || can_fold(C, KW);
    case Engine::Lane32: return !k.fold_taps && can_lane32(k.isa, C);
    case Engine::Lane16: return !k.fold_taps && can_lane16(k.isa, C, KH, KW, sw);
  }
  return false;
}

const char* engine_name(Engine engine) {
  switch (engine) {
    case Engine::Lane16: return "lane16";
    case Engine::Lane32: return "lane32";
    default: return "word";
  }
}

int64_t lane_block_units(int64_t units_per_row, int64_t n_vec) {
  // Blocks never cross an output row: as few blocks per row as the largest R allows, then the
  // smallest R that still covers the row with that many (least wasted compute on the last block).
  static const int64_t kR[] = {4, 8, 12, 16, 24};
  const int64_t nv = std::min<int64_t>(n_vec, 4);
  int64_t rmax = 4;
  for (int64_t r : kR)
    if (r * nv <= 24) rmax = r;
  const int64_t need = ceil_div(units_per_row, ceil_div(units_per_row, rmax));
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

GemmKernel gemm_kernel(const KernelChoice& k) {
#if BK_X86
  if (k.engine == Engine::Lane16) return conv_lane16_avx512;
  if (k.engine == Engine::Lane32) return conv_lane32_avx512;
  switch (k.isa) {
    case Isa::Avx512: return conv_blocks_avx512;
    case Isa::Avx2: return conv_blocks_avx2;
    default: break;
  }
#endif
  return conv_blocks_scalar;
}

PackRowsKernel pack_rows_kernel(Isa isa) {
  switch (isa) {
#if BK_X86
    case Isa::Avx512: return pack_rows_avx512;
    case Isa::Avx2: return pack_rows_avx2;
#endif
    default: return pack_rows_scalar;
  }
}

}  // namespace bk
