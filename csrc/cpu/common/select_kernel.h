// Which kernel runs a conv (in the spirit of larq compute-engine indirect_bgemm/select_kernel.h): one
// function, select_kernel, picks the engine from the ISA and the layer shape; gemm_kernel and
// pack_rows_kernel map the choice to the function that runs it. Tests force every supported choice.
#pragma once
#include <cstdint>

#include "cpu/common/isa.h"
#include "cpu/common/kernels.h"

namespace bk {

// Kernel families (docs/cpu_kernels.md): the word engine (64-bit words, every ISA) and the AVX-512
// small-channel engines with one 32- or 16-bit lane element per pixel (C <= 32 / C <= 16).
enum class Engine { Word = 0, Lane16 = 16, Lane32 = 32 };

struct KernelChoice {
  Isa isa;
  Engine engine;
  bool fold_taps;  // word engine, C <= 32, KW >= 2: fold taps_per_word kernel columns into one word
};

// The kernel with the fewest XNOR-popcount steps per output pixel and 16 columns. Word engine: 2 zmm of
// 8 columns per word, KH * ceil(KW / G) words with G = min(64 / C, KW) taps folded per word (C <= 32)
// or KH * KW * chan_words. Lane 32: KH * KW (C <= 32). Lane 16: KH * KW / 2 (C <= 16, stride 1 along
// W, AVX512_BITALG, 16-bit counts cannot overflow). AVX2 / scalar: always the word engine. The word
// engine folds taps whenever it can.
KernelChoice select_kernel(Isa isa, int64_t C, int64_t KH, int64_t KW, int64_t sw);

// Whether choice can run this conv on this CPU (isa supported, engine and folding preconditions).
bool kernel_supported(const KernelChoice& choice, int64_t C, int64_t KH, int64_t KW, int64_t sw);

const char* engine_name(Engine engine);  // "word", "lane16", "lane32"

// Register block height (pixels) of the word engines per ISA for n_vec 8-column vectors.
int64_t block_rows(Isa isa, int64_t n_vec);
// Units per register block of the lane engines (4, 8, 12, 16 or 24) for units_per_row units per output
// row and n_vec 16-column vectors: blocks never cross an output row.
int64_t lane_block_units(int64_t units_per_row, int64_t n_vec);

// The GEMM function of a choice (word engine: by ISA; lane engines: AVX-512).
GemmKernel gemm_kernel(const KernelChoice& choice);
// The word-layout activation packer of an ISA.
PackRowsKernel pack_rows_kernel(Isa isa);

}  // namespace bk
