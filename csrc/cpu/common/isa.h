// Instruction-set paths of the CPU engine and their run-time detection (cpu_features.cpp).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define BK_X86 1
// Function-level ISA targets: the translation units stay baseline x86-64; runtime CPUID picks a path.
#define BK_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,popcnt,fma")))
#define BK_TARGET_AVX512_BITALG \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx512bitalg,popcnt,fma")))
#define BK_TARGET_AVX2 __attribute__((target("avx2,fma,popcnt")))
#else
#define BK_X86 0
#endif

namespace bk {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// CPU + OS support (CPUID feature bits and XSAVE-enabled register state).
bool cpu_supports(Isa isa);
// AVX512_BITALG (vpopcntw), needed by the lane-16 engine.
bool cpu_has_bitalg();
std::vector<std::string> isa_supported();  // best first, "scalar" always last
// Parses "avx512" / "avx2" / "scalar"; throws std::invalid_argument for unknown or unsupported names.
Isa parse_isa(const std::string& name);
const char* isa_name(Isa isa);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace bk
