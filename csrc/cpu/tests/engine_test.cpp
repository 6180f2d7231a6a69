// Torch-free test of the CPU engine against the scalar reference (reference/reference_conv.h).
//
//   * conformance: many random shapes (C in 1..17, 31, 33, 63..65, 130; kernels 1x1, 3x3, 5x3, 3x5, 2x2;
//     strides 1..3; paddings 0..2; tiny spatial sizes; M, N in 1..3; modes sign / hv; NCHW and
//     channels_last; with and without bias / residual / clamp; out and / or pairs), run on EVERY kernel
//     this CPU supports, forced (each ISA path x word engine folded / unfolded x lane 32 x lane 16), on 1
//     and 2 threads, and on the automatic choice of run_mbn_conv2d. Pairs must be equal; out must be
//     bit-equal (a zero may differ in sign only: the scalar / AVX2 engines start the sum from +0.0 and
//     vmaxps returns +0.0 for max(-0.0, +0.0));
//   * units: select_kernel / kernel_supported / conv_engine, make_plan and the scratch layout, the
//     padding classes and the correction table against brute force, the NaN and non-finite residual
//     flags, empty outputs, an unsupported forced kernel.
//
// Built and run by tests/test_cpp_units.py with the flags of setup.py (-O3 -ffp-contract=off ...):
//   engine_test [cases] [seed]      prints "<checks> checks, <n> failures" and exits non-zero on failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/common/conv_plan.h"
#include "cpu/common/engine.h"
#include "cpu/common/padding.h"
#include "cpu/common/select_kernel.h"
#include "cpu/reference/reference_conv.h"

namespace {

using namespace bk;

int64_t g_checks = 0, g_failures = 0;

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    ++g_checks;                                                            \
    if (!(cond)) {                                                         \
      ++g_failures;                                                        \
      if (g_failures <= 30) {                                              \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);        \
        std::printf(__VA_ARGS__);                                          \
        std::printf("\n");                                                 \
      }                                                                    \
    }                                                                      \
  } while (0)

const float kInf = std::numeric_limits<float>::infinity();

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

bool same_float(float a, float b) { return bits_of(a) == bits_of(b) || (a == 0.0f && b == 0.0f); }

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (const auto& name : isa_supported()) out.push_back(parse_isa(name));
  return out;
}

// Every kernel that can run this conv here.
std::vector<KernelChoice> all_kernels(int64_t C, int64_t KH, int64_t KW, int64_t sw) {
  std::vector<KernelChoice> out;
  for (Isa isa : supported_isas())
    for (Engine e : {Engine::Word, Engine::Lane32, Engine::Lane16})
      for (bool fold : {false, true}) {
        const KernelChoice k{isa, e, fold};
        if (kernel_supported(k, C, KH, KW, sw)) out.push_back(k);
      }
  return out;
}

std::string describe(const KernelChoice& k) {
  return std::string(isa_name(k.isa)) + "/" + engine_name(k.engine) + (k.fold_taps ? "/folded" : "");
}

struct Case {
  int64_t B, C, H, W, M, Co, KH, KW, sh, sw, ph, pw, N;
  int mode;
  bool channels_last, want_out, want_pairs, bias, residual, clamp;
  std::vector<float> x, v, alpha, beta, bias_v, residual_v;
  std::vector<uint64_t> w;
  float lo = -kInf, hi = kInf;
  int64_t OH() const { return (H + 2 * ph - KH) / sh + 1; }
  int64_t OW() const { return (W + 2 * pw - KW) / sw + 1; }
  int64_t Nb() const { return mode == kModeSign ? 1 : N; }
  std::string str() const {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "B%ld C%ld H%ld W%ld M%ld Co%ld K%ldx%ld s%ld,%ld p%ld,%ld N%ld mode%d cl%d out%d pairs%d "
                  "bias%d res%d clamp%d",
                  long(B), long(C), long(H), long(W), long(M), long(Co), long(KH), long(KW), long(sh), long(sw),
                  long(ph), long(pw), long(N), mode, channels_last, want_out, want_pairs, bias, residual, clamp);
    return buf;
  }
  ConvArgs args(float* out, int32_t* pairs) const {
    return ConvArgs{x.data(), B, C, H, W, channels_last, w.data(), M, Co, KH, KW, mode, v.data(), N, sh, sw, ph, pw,
                    alpha.data(), beta.data(), bias ? bias_v.data() : nullptr,
                    residual ? residual_v.data() : nullptr, lo, hi, out, pairs};
  }
};

template <typename R>
int64_t pick(R& rng, std::initializer_list<int64_t> values) {
  std::uniform_int_distribution<size_t> d(0, values.size() - 1);
  return *(values.begin() + d(rng));
}

template <typename R>
int64_t uniform(R& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

// Random floats with exact zeros, -0.0 and values right at the hv thresholds (0.5 - v) mixed in.
template <typename R>
void fill_x(R& rng, Case& c) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  c.x.resize(c.B * c.C * c.H * c.W);
  for (auto& f : c.x) {
    const int64_t r = uniform(rng, 0, 9);
    f = r == 0 ? 0.0f : r == 1 ? -0.0f : (r == 2 && !c.v.empty()) ? 0.5f - c.v[uniform(rng, 0, c.N - 1)] : nd(rng);
  }
}

// Random packed weights [M, Co, KH, KW, words]; unused high bits of the last word are 0 (the contract).
template <typename R>
void fill_w(R& rng, Case& c) {
  std::mt19937_64 wr(rng());
  const int64_t words = (c.C + 63) / 64;
  c.w.assign(c.M * c.Co * c.KH * c.KW * words, 0);
  for (int64_t i = 0; i < static_cast<int64_t>(c.w.size()); ++i) {
    const int64_t valid = std::min<int64_t>(64, c.C - (i % words) * 64);
    const uint64_t word = wr();
    c.w[i] = valid == 64 ? word : word & ((uint64_t(1) << valid) - 1);
  }
}

template <typename R>
Case random_case(R& rng, bool big_batch) {
  Case c{};
  c.C = pick(rng, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 31, 32, 33, 63, 64, 65, 130});
  static const int64_t kKernels[][2] = {{1, 1}, {3, 3}, {5, 3}, {3, 5}, {2, 2}, {1, 3}};
  const auto& k = kKernels[uniform(rng, 0, 5)];
  c.KH = k[0], c.KW = k[1];
  c.sh = uniform(rng, 1, 3), c.sw = uniform(rng, 1, 3);
  if (uniform(rng, 0, 2) == 0) c.sw = 1;  // lane 16 needs stride 1 along W
  c.ph = uniform(rng, 0, 2), c.pw = uniform(rng, 0, 2);
  c.H = uniform(rng, std::max<int64_t>(1, c.KH - 2 * c.ph), 9);
  c.W = uniform(rng, std::max<int64_t>(1, c.KW - 2 * c.pw), 11);
  c.B = big_batch ? uniform(rng, 16, 20) : uniform(rng, 1, 3);
  c.M = uniform(rng, 1, 3), c.N = uniform(rng, 1, 3);
  c.Co = uniform(rng, 0, 3) == 0 ? uniform(rng, 17, 70) : uniform(rng, 1, 16);
  c.mode = uniform(rng, 0, 1) ? kModeHv : kModeSign;
  c.channels_last = uniform(rng, 0, 1);
  const int64_t outs = uniform(rng, 0, 3);
  c.want_out = outs != 1, c.want_pairs = outs != 0;
  c.bias = c.want_out && uniform(rng, 0, 1), c.residual = c.want_out && uniform(rng, 0, 2) == 0;
  c.clamp = c.want_out && uniform(rng, 0, 1);
  std::uniform_real_distribution<float> ud(-0.6f, 0.8f), sd(0.05f, 1.5f);
  c.v.resize(c.N);
  for (auto& f : c.v) f = ud(rng);
  fill_x(rng, c);
  fill_w(rng, c);
  // Signed scales (a folded BatchNorm can flip alpha), bias, residual.
  c.alpha.resize(c.M * c.Co);
  for (auto& f : c.alpha) f = sd(rng) * (uniform(rng, 0, 3) == 0 ? -1.0f : 1.0f);
  c.beta.resize(c.Nb());
  for (auto& f : c.beta) f = sd(rng) * (uniform(rng, 0, 4) == 0 ? -1.0f : 1.0f);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  c.bias_v.resize(c.Co);
  for (auto& f : c.bias_v) f = nd(rng);
  c.residual_v.resize(c.B * c.OH() * c.OW() * c.Co);
  for (auto& f : c.residual_v) f = nd(rng);
  if (c.clamp) {
    const int64_t r = uniform(rng, 0, 2);
    c.lo = r == 1 ? -kInf : r == 0 ? 0.0f : -1.0f;
    c.hi = r == 0 ? kInf : 1.0f;
  }
  return c;
}

// Runs every supported kernel (1 and 2 threads) and the automatic choice; compares with the reference.
void conformance_case(const Case& c, int64_t index) {
  const int64_t P = c.B * c.OH() * c.OW(), out_n = P * c.Co, pairs_n = c.M * c.Nb() * P * c.Co;
  std::vector<float> ref_out(c.want_out ? out_n : 0, 7.0f);
  std::vector<int32_t> ref_pairs(c.want_pairs ? pairs_n : 0, 7);
  const int ref_flags = reference_mbn_conv2d(
      c.args(c.want_out ? ref_out.data() : nullptr, c.want_pairs ? ref_pairs.data() : nullptr));
  std::vector<KernelChoice> kernels = all_kernels(c.C, c.KH, c.KW, c.sw);
  const size_t n_forced = kernels.size();
  kernels.push_back(select_kernel(supported_isas()[0], c.C, c.KH, c.KW, c.sw));
  for (size_t ki = 0; ki <= n_forced; ++ki)
    for (int threads : {1, 2}) {
      if (ki == n_forced && threads == 2) continue;
      const KernelChoice& k = kernels[ki];
      std::vector<float> out(c.want_out ? out_n : 0, -3.0f);
      std::vector<int32_t> pairs(c.want_pairs ? pairs_n : 0, -3);
      float* o = c.want_out ? out.data() : nullptr;
      int32_t* pr = c.want_pairs ? pairs.data() : nullptr;
      int flags;
      if (ki == n_forced) {  // the public entry point, automatic choice
        const Case& a = c;
        flags = run_mbn_conv2d(a.x.data(), a.B, a.C, a.H, a.W, a.channels_last, a.w.data(), a.M, a.Co, a.KH,
                               a.KW, a.mode, a.v.data(), a.N, a.sh, a.sw, a.ph, a.pw, a.alpha.data(),
                               a.beta.data(), a.bias ? a.bias_v.data() : nullptr,
                               a.residual ? a.residual_v.data() : nullptr, a.lo, a.hi, o, pr,
                               isa_supported()[0], 1);
      } else {
        flags = run_conv(c.args(o, pr), k, threads);
      }
      const std::string what = "case " + std::to_string(index) + " [" + c.str() + "] kernel " + describe(k) +
                               (ki == n_forced ? " (auto)" : "") + " threads " + std::to_string(threads);
      CHECK(flags == ref_flags, "%s: flags %d, reference %d", what.c_str(), flags, ref_flags);
      int64_t bad = 0, first = -1;
      for (int64_t i = 0; i < static_cast<int64_t>(pairs.size()); ++i)
        if (pairs[i] != ref_pairs[i]) bad += 1, first = first < 0 ? i : first;
      CHECK(bad == 0, "%s: %ld pairs differ, first at %ld: %d vs %d", what.c_str(), long(bad), long(first),
            bad ? pairs[first] : 0, bad ? ref_pairs[first] : 0);
      bad = 0, first = -1;
      for (int64_t i = 0; i < static_cast<int64_t>(out.size()); ++i)
        if (!same_float(out[i], ref_out[i])) bad += 1, first = first < 0 ? i : first;
      CHECK(bad == 0, "%s: %ld outputs differ, first at %ld: %.9g vs %.9g", what.c_str(), long(bad), long(first),
            bad ? out[first] : 0.0, bad ? ref_out[first] : 0.0);
    }
}

// ------------------------------------------------------------------------------------------- units
void test_select_kernel() {
  const bool avx512 = cpu_supports(Isa::Avx512), bitalg = cpu_has_bitalg();
  for (Isa isa : supported_isas()) {
    for (int64_t C : {1, 5, 16, 17, 32, 33, 64, 65, 200})
      for (int64_t KH : {1, 3, 5})
        for (int64_t KW : {1, 3, 5})
          for (int64_t sw : {1, 2}) {
            const KernelChoice k = select_kernel(isa, C, KH, KW, sw);
            CHECK(k.isa == isa, "isa");
            CHECK(kernel_supported(k, C, KH, KW, sw), "select_kernel picked an unsupported kernel C%ld", long(C));
            CHECK(conv_engine(isa_name(isa), C, KH, KW, sw) == engine_name(k.engine), "conv_engine string");
            if (isa != Isa::Avx512 || C > 32) CHECK(k.engine == Engine::Word, "word engine expected C%ld", long(C));
            if (k.engine == Engine::Word) CHECK(k.fold_taps == (C <= 32 && KW >= 2), "fold rule C%ld KW%ld",
                                                long(C), long(KW));
            if (k.engine == Engine::Lane16) CHECK(C <= 16 && sw == 1 && bitalg, "lane16 preconditions");
            CHECK(!kernel_supported({isa, Engine::Word, true}, C, KH, KW, sw) || (C <= 32 && KW >= 2), "fold");
            if (isa != Isa::Avx512) {
              CHECK(!kernel_supported({isa, Engine::Lane32, false}, C, KH, KW, sw), "lane32 needs avx512");
              CHECK(!kernel_supported({isa, Engine::Lane16, false}, C, KH, KW, sw), "lane16 needs avx512");
            }
          }
  }
  if (avx512) {  // the documented table (docs/cpu_kernels.md): 3x3, C = 16 -> lane16 (BITALG) / 32 -> lane32
    CHECK(select_kernel(Isa::Avx512, 16, 3, 3, 1).engine == (bitalg ? Engine::Lane16 : Engine::Lane32), "16@3x3");
    CHECK(select_kernel(Isa::Avx512, 32, 3, 3, 1).engine == Engine::Lane32, "32@3x3");
    // stride 2 rules lane 16 out; lane 32 (9 steps) loses to the folded word engine (2 * 3 = 6)
    CHECK(select_kernel(Isa::Avx512, 16, 3, 3, 2).engine == Engine::Word, "16@3x3 stride 2");
    CHECK(select_kernel(Isa::Avx512, 16, 1, 1, 2).engine == Engine::Lane32, "16@1x1 stride 2");
    CHECK(select_kernel(Isa::Avx512, 64, 3, 3, 1).engine == Engine::Word, "64@3x3");
    CHECK(!kernel_supported({Isa::Avx512, Engine::Lane16, false}, 16, 3, 3, 2), "lane16 needs sw 1");
    CHECK(!kernel_supported({Isa::Avx512, Engine::Lane32, false}, 33, 3, 3, 1), "lane32 needs C <= 32");
  }
  CHECK(std::string(engine_name(Engine::Word)) == "word" && std::string(engine_name(Engine::Lane16)) == "lane16" &&
            std::string(engine_name(Engine::Lane32)) == "lane32",
        "engine names");
}

void test_plan() {
  ConvArgs a{};
  a.B = 2, a.C = 16, a.H = 8, a.W = 7, a.M = 2, a.Co = 5, a.KH = 3, a.KW = 3, a.N = 3;
  a.sh = 1, a.sw = 2, a.ph = 1, a.pw = 0;
  const ConvGeometry g = make_geometry(a);
  CHECK(g.Hp == 10 && g.Wp == 7 && g.OH == 8 && g.OW == 3 && g.P == 48, "geometry");
  // Word engine, folded: G = min(64 / 16, 3) = 3 taps per word, one word per kernel row.
  ConvPlan p = make_plan(g, {Isa::Scalar, Engine::Word, true});
  CHECK(p.word.chan_words == 1 && p.word.taps_per_word == 3 && p.word.folded_words_per_krow == 1, "fold");
  CHECK(p.gemm.depth == 3 && p.gemm.co_padded == 8 && p.gemm.cols == 16 && p.gemm.block == 4, "gemm folded");
  CHECK(p.lane.bits == 0 && p.lane.units_per_row == 3 && p.ops.plane == 2 * 10 * 7, "word lane");
  ScratchLayout s = make_scratch_layout(p);
  CHECK(s.elem_bytes == 8 && s.fold_count == 1 && s.full_taps == 3 && s.last_taps == 3, "fold planes");
  CHECK(s.plane_bytes % 64 == 0 && s.plane_bytes >= size_t(3 * p.ops.plane * 8 + 256), "plane bytes");
  std::vector<int64_t> koff = make_row_offsets(p, s);
  const int64_t fp = static_cast<int64_t>(s.plane_bytes / 8);
  CHECK(koff.size() == 3 && koff[0] == fp && koff[1] == fp + 7 && koff[2] == fp + 14, "folded koff");
  // Unfolded.
  p = make_plan(g, {Isa::Scalar, Engine::Word, false});
  CHECK(p.word.taps_per_word == 0 && p.word.folded_words_per_krow == 3 && p.gemm.depth == 9, "unfolded");
  s = make_scratch_layout(p);
  koff = make_row_offsets(p, s);
  CHECK(s.fold_count == 0 && koff[4] == 7 + 1 && koff[8] == 14 + 2, "unfolded koff");
  // C = 12, KW = 5: G = 5 (64 / 12 = 5); C = 30, KW = 5: G = 2, groups 2 + 2 + 1 (last group one tap: no
  // second plane, the last word read from the packed plane itself).
  a.C = 30, a.KW = 5, a.pw = 2;
  p = make_plan(make_geometry(a), {Isa::Scalar, Engine::Word, true});
  s = make_scratch_layout(p);
  CHECK(p.word.taps_per_word == 2 && p.word.folded_words_per_krow == 3 && s.fold_count == 1 && s.last_taps == 1,
        "fold 2+2+1");
  a.C = 20, a.KW = 5;  // G = 3: groups 3 + 2 -> two folded planes
  p = make_plan(make_geometry(a), {Isa::Scalar, Engine::Word, true});
  s = make_scratch_layout(p);
  CHECK(p.word.taps_per_word == 3 && s.fold_count == 2 && s.full_taps == 3 && s.last_taps == 2, "fold 3+2");
  // Lane engines: co padded to 16, elements per pixel, lane 16 units are pixel pairs.
  a.C = 16, a.KW = 3, a.pw = 1, a.sw = 1, a.Co = 17;
  const ConvGeometry g2 = make_geometry(a);
  p = make_plan(g2, {Isa::Avx512, Engine::Lane16, false});
  CHECK(p.lane.bits == 16 && p.gemm.co_padded == 32 && p.gemm.depth == 9 && p.lane.units_per_row == 4 &&
            p.ops.plane == 2 * 10 * 9,
        "lane16 plan");
  CHECK(make_scratch_layout(p).elem_bytes == 2, "lane16 element");
  p = make_plan(g2, {Isa::Avx512, Engine::Lane32, false});
  CHECK(p.lane.bits == 32 && p.lane.units_per_row == 7 && make_scratch_layout(p).elem_bytes == 4, "lane32 plan");
  // Block sizes.
  CHECK(block_rows(Isa::Avx512, 1) == 24 && block_rows(Isa::Avx512, 2) == 12 && block_rows(Isa::Avx512, 3) == 8 &&
            block_rows(Isa::Avx512, 9) == 6 && block_rows(Isa::Avx2, 5) == 3 && block_rows(Isa::Scalar, 5) == 4,
        "block_rows");
  for (int64_t uw = 1; uw < 80; ++uw)
    for (int64_t nv = 1; nv < 6; ++nv) {
      const int64_t r = lane_block_units(uw, nv);
      const bool allowed = r == 4 || r == 8 || r == 12 || r == 16 || r == 24;
      CHECK(allowed && (r == 4 || r * std::min<int64_t>(nv, 4) <= 24), "lane block %ld for uw %ld nv %ld",
            long(r), long(uw), long(nv));
    }
}

void test_padding(std::mt19937_64& rng) {
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t k = uniform(rng, 1, 5), s = uniform(rng, 1, 3), pad = uniform(rng, 0, 2);
    const int64_t in = uniform(rng, std::max<int64_t>(1, k - 2 * pad), 12), out = (in + 2 * pad - k) / s + 1;
    std::vector<int32_t> cls;
    const auto classes = tap_classes(out, s, pad, k, in, cls);
    for (int64_t o = 0; o < out; ++o) {
      const TapRange r = classes[cls[o]];
      for (int64_t t = 0; t < k; ++t) {
        const int64_t i = o * s - pad + t;
        CHECK((i >= 0 && i < in) == (t >= r.lo && t < r.hi), "tap class o%ld t%ld", long(o), long(t));
      }
    }
    for (size_t a = 0; a < classes.size(); ++a)
      for (size_t b = a + 1; b < classes.size(); ++b) CHECK(!(classes[a] == classes[b]), "classes distinct");
  }
  // The correction table against brute force: base = KH*KW*C - sum_padded (C - 2 popcount), i.e. the sum
  // over in-bounds taps of C plus the sum over padded taps of 2 popcount.
  for (int trial = 0; trial < 60; ++trial) {
    ConvArgs a{};
    a.B = 1, a.C = pick(rng, {1, 7, 16, 33, 64, 65}), a.M = uniform(rng, 1, 2), a.Co = uniform(rng, 1, 9);
    a.KH = uniform(rng, 1, 5), a.KW = uniform(rng, 1, 5), a.sh = uniform(rng, 1, 3), a.sw = uniform(rng, 1, 3);
    a.ph = uniform(rng, 0, 2), a.pw = uniform(rng, 0, 2), a.N = 1;
    a.H = uniform(rng, std::max<int64_t>(1, a.KH - 2 * a.ph), 9);
    a.W = uniform(rng, std::max<int64_t>(1, a.KW - 2 * a.pw), 9);
    const ConvGeometry g = make_geometry(a);
    const ConvPlan p = make_plan(g, {Isa::Scalar, Engine::Word, false});
    std::vector<int32_t> pc(p.gemm.cols * g.KH * g.KW, 0);
    for (int64_t m = 0; m < g.M; ++m)
      for (int64_t co = 0; co < g.Co; ++co)
        for (int64_t t = 0; t < g.KH * g.KW; ++t) pc[(m * p.gemm.co_padded + co) * g.KH * g.KW + t] = uniform(rng, 0, g.C);
    const PaddingTable table = make_padding_table(g, p.gemm, pc);
    for (int64_t oh = 0; oh < g.OH; ++oh)
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t cls = table.row_cls[oh] * table.n_col_cls + table.col_cls[ow];
        for (int64_t col = 0; col < p.gemm.cols; ++col) {
          int64_t want = 0;
          for (int64_t kh = 0; kh < g.KH; ++kh)
            for (int64_t kw = 0; kw < g.KW; ++kw) {
              const int64_t h = oh * g.sh - g.ph + kh, w = ow * g.sw - g.pw + kw;
              const bool inside = h >= 0 && h < g.H && w >= 0 && w < g.W;
              want += inside ? g.C : 2 * pc[col * g.KH * g.KW + kh * g.KW + kw];
            }
          CHECK(table.base[cls * p.gemm.cols + col] == want, "padding base oh%ld ow%ld col%ld", long(oh), long(ow),
                long(col));
        }
      }
  }
}

void test_flags_and_errors(std::mt19937_64& rng) {
  // NaN in x: flag kXHasNan from every kernel (and the reference); a non-finite residual: kResidualNonFinite
  // with out = the IEEE result, equal to the reference.
  for (int64_t C : {5, 16, 70}) {
    Case c = random_case(rng, false);
    c.C = C, c.KH = c.KW = 3, c.sh = c.sw = 1, c.ph = c.pw = 1, c.H = 5, c.W = 6, c.want_out = true;
    c.want_pairs = true;
    fill_x(rng, c);
    fill_w(rng, c);
    c.residual = true, c.residual_v.assign(c.B * c.OH() * c.OW() * c.Co, 0.25f);
    c.residual_v[c.residual_v.size() / 2] = kInf;
    c.residual_v[0] = std::numeric_limits<float>::quiet_NaN();
    conformance_case(c, -1);  // flags and outputs as the reference (kResidualNonFinite, NaN / inf outputs)
    c.x[c.x.size() / 3] = std::numeric_limits<float>::quiet_NaN();
    for (const KernelChoice& k : all_kernels(c.C, c.KH, c.KW, c.sw)) {
      std::vector<float> out(c.B * c.OH() * c.OW() * c.Co);
      CHECK(run_conv(c.args(out.data(), nullptr), k, 1) & kXHasNan, "NaN flag %s", describe(k).c_str());
    }
    std::vector<float> out(c.B * c.OH() * c.OW() * c.Co);
    CHECK(reference_mbn_conv2d(c.args(out.data(), nullptr)) == kXHasNan, "reference NaN flag");
  }
  // Empty output: 0 without reading x.
  Case c = random_case(rng, false);
  ConvArgs a = c.args(nullptr, nullptr);
  a.B = 0, a.x = nullptr;
  CHECK(run_conv(a, {Isa::Scalar, Engine::Word, false}, 1) == 0, "empty output");
  // Unsupported forced kernel and bad arguments throw.
  a = c.args(nullptr, nullptr);
  a.C = 33;
  bool threw = false;
  try {
    run_conv(a, {Isa::Scalar, Engine::Word, true}, 1);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "folding C = 33 must throw");
  threw = false;
  a = c.args(nullptr, nullptr);
  a.mode = 7;
  try {
    run_conv(a, {Isa::Scalar, Engine::Word, false}, 1);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "mode 7 must throw");
}

// The STE backward passes (issue 16) on every ISA path and thread count against an inline reference of
// engine.h's arithmetic, bit for bit (signed zeros included), with x + v exactly 0 / 1, |x| exactly 1,
// their float neighbours and lengths that leave vector tails.
void test_ste_backward(std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::vector<std::vector<float>> shifts = {{}, {0.25f}, {0.5f, 0.25f, 0.75f}, {0.125f, -0.5f, 1.5f, 0.375f}};
  for (int64_t n : {1L, 15L, 16L, 17L, 100L, 70001L}) {
    for (const auto& v : shifts) {
      const int N = v.empty() ? 1 : int(v.size());
      std::vector<float> edges = {1.0f, -1.0f, 0.0f, -0.0f, 0.5f};
      for (float vk : v) edges.push_back(0.0f - vk), edges.push_back(1.0f - vk);
      std::vector<float> x(n), g(n), out(n), beta(N);
      for (int k = 0; k < N; ++k) beta[k] = 0.25f + std::abs(normal(rng));
      for (int64_t i = 0; i < n; ++i) {
        x[i] = normal(rng);
        if (i % 3 == 0) {
          const float e = edges[(i / 3) % edges.size()];
          const int which = int((i / 3 / edges.size()) % 3);
          x[i] = which == 0 ? e : std::nextafter(e, which == 1 ? kInf : -kInf);
        }
        g[i] = i % 11 == 5 ? -0.0f : normal(rng);
        out[i] = i % 4 == 0 ? edges[i % edges.size()] : normal(rng);
      }
      std::vector<float> want(n), want_clamp(n);
      for (int64_t i = 0; i < n; ++i) {
        float acc = 0.0f;
        for (int k = 0; k < N; ++k) {
          const bool in = v.empty() ? std::fabs(x[i]) <= 1.0f : (x[i] + v[k] >= 0.0f && x[i] + v[k] <= 1.0f);
          const float t = in ? g[i] * beta[k] : 0.0f;
          acc = k == 0 ? t : acc + t;
        }
        want[i] = acc;
        want_clamp[i] = (out[i] > -1.0f && out[i] < 1.0f) ? g[i] : 0.0f;
      }
      for (Isa isa : supported_isas()) {
        for (int threads : {1, 2}) {
          std::vector<float> got(n, 7.0f), got_clamp(n, 7.0f);
          SteGradArgs a{x.data(), g.data(), v.empty() ? nullptr : v.data(), beta.data(), N, got.data()};
          run_ste_grad_x(a, n, isa_name(isa), threads);
          run_clamp_grad(g.data(), out.data(), -1.0f, 1.0f, got_clamp.data(), n, isa_name(isa), threads);
          int64_t bad = 0, bad_clamp = 0;
          for (int64_t i = 0; i < n; ++i) {
            bad += bits_of(got[i]) != bits_of(want[i]);
            bad_clamp += bits_of(got_clamp[i]) != bits_of(want_clamp[i]);
          }
          CHECK(bad == 0, "ste_grad_x %s n %ld N %d threads %d: %ld differ", isa_name(isa), long(n), N,
                threads, long(bad));
          CHECK(bad_clamp == 0, "clamp_grad %s n %ld threads %d: %ld differ", isa_name(isa), long(n),
                threads, long(bad_clamp));
        }
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t cases = argc > 1 ? std::atoll(argv[1]) : 400;
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 12345;
  std::mt19937_64 rng(seed);
  std::printf("isa paths:");
  for (const auto& s : isa_supported()) std::printf(" %s", s.c_str());
  std::printf(" (bitalg %d)\n", int(cpu_has_bitalg()));
  test_select_kernel();
  test_plan();
  test_padding(rng);
  test_flags_and_errors(rng);
  test_ste_backward(rng);
  std::vector<int64_t> engines_run(3, 0);
  for (int64_t i = 0; i < cases; ++i) {
    const Case c = random_case(rng, i % 25 == 24);  // every 25th: a batch big enough for the per-image path
    for (const KernelChoice& k : all_kernels(c.C, c.KH, c.KW, c.sw))
      engines_run[k.engine == Engine::Word ? 0 : k.engine == Engine::Lane32 ? 1 : 2] += 1;
    conformance_case(c, i);
  }
  std::printf("kernel runs (x2 threads): word %ld, lane32 %ld, lane16 %ld\n", long(engines_run[0]),
              long(engines_run[1]), long(engines_run[2]));
  std::printf("%ld checks, %ld failures\n", long(g_checks), long(g_failures));
  return g_failures == 0 ? 0 : 1;
}
