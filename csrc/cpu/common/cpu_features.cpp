// Runtime ISA detection: CPUID feature bits plus the OS-enabled register state (XGETBV).
#include <stdexcept>

#include "cpu/common/isa.h"

#if BK_X86
#include <cpuid.h>
#endif

namespace bk {
namespace {

struct Features {
  bool avx2 = false;
  bool avx512 = false;  // AVX512F + BW + DQ + VL + VPOPCNTDQ with ZMM state enabled by the OS
  bool bitalg = false;  // and AVX512_BITALG
};

#if BK_X86
uint64_t read_xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

Features detect() {
  Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12),
             popcnt = c & (1u << 23);
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;
  const bool zmm_state = (xcr0 & 0xE6) == 0xE6;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512dq = b & (1u << 17),
             avx512bw = b & (1u << 30), avx512vl = b & (1u << 31), vpopcntdq = c & (1u << 14),
             bitalg = c & (1u << 12);
  f.avx2 = ymm_state && avx2 && fma && popcnt;
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl && vpopcntdq;
  f.bitalg = f.avx512 && bitalg;
  return f;
}
#else
Features detect() { return Features{}; }
#endif

const Features& features() {
  static const Features f = detect();
  return f;
}

}  // namespace

bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return features().avx512;
    case Isa::Avx2: return features().avx2;
    default: return true;
  }
}

bool cpu_has_bitalg() { return features().bitalg; }

std::vector<std::string> isa_supported() {
  std::vector<std::string> out;
  if (cpu_supports(Isa::Avx512)) out.push_back("avx512");
  if (cpu_supports(Isa::Avx2)) out.push_back("avx2");
  out.push_back("scalar");
  return out;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

Isa parse_isa(const std::string& name) {
  Isa isa;
  if (name == "avx512") isa = Isa::Avx512;
  else if (name == "avx2") isa = Isa::Avx2;
  else if (name == "scalar") isa = Isa::Scalar;
  else throw std::invalid_argument("isa: expected 'avx512', 'avx2' or 'scalar', got '" + name + "'");
  if (!cpu_supports(isa))
    throw std::invalid_argument("isa: '" + name + "' is not supported by this CPU/OS (supported: " +
                                [] {
                                  std::string s;
                                  for (const auto& n : isa_supported()) s += (s.empty() ? "" : ", ") + n;
                                  return s;
                                }() + ")");
  return isa;
}

}  // namespace bk
