// Host test of csrc/cuda/bk_index.h: the index math and the padded-tap correction the CUDA conv uses,
// checked against brute force. Built and run by tests/test_cuda_build.py (g++ or nvcc host code).
// Exit status 0 = all checks passed; every failure is printed.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "bk_index.h"

static int failures = 0;

#define EXPECT_EQ(a, b, ...)                                        \
  do {                                                              \
    if ((a) != (b)) {                                               \
      ++failures;                                                   \
      if (failures <= 20) {                                         \
        std::printf("FAIL %s:%d: %lld != %lld  ", __FILE__, __LINE__, \
                    (long long)(a), (long long)(b));                \
        std::printf(__VA_ARGS__);                                   \
        std::printf("\n");                                          \
      }                                                             \
    }                                                               \
  } while (0)

static void test_geometry() {
  for (int in = 1; in <= 12; ++in)
    for (int k = 1; k <= 7; ++k)
      for (int s = 1; s <= 4; ++s)
        for (int pad = 0; pad <= 3; ++pad) {
          int brute_out = 0;  // number of window starts that fit in the padded input
          for (int start = -pad; start + k <= in + pad; start += s) ++brute_out;
          if (in + 2 * pad < k) brute_out = 0;
          const int got = in + 2 * pad >= k ? bk::out_size(in, k, s, pad) : 0;
          EXPECT_EQ(got, brute_out, "out_size in=%d k=%d s=%d p=%d", in, k, s, pad);
          for (int o = 0; o < brute_out; ++o) {
            int lo = -1, hi = -1;
            bk::valid_taps(o, s, pad, k, in, &lo, &hi);
            int count = 0, first = -1, last = -1;
            for (int t = 0; t < k; ++t) {
              const int i = o * s - pad + t;
              if (i >= 0 && i < in) {
                if (first < 0) first = t;
                last = t;
                ++count;
              }
            }
            EXPECT_EQ(hi - lo, count, "valid_taps count o=%d in=%d k=%d s=%d p=%d", o, in, k, s, pad);
            if (count > 0) {
              EXPECT_EQ(lo, first, "valid_taps lo o=%d in=%d k=%d s=%d p=%d", o, in, k, s, pad);
              EXPECT_EQ(hi, last + 1, "valid_taps hi o=%d in=%d k=%d s=%d p=%d", o, in, k, s, pad);
            }
          }
        }
  for (int c = 1; c <= 200; ++c) EXPECT_EQ(bk::words_for(c), (c + 63) / 64, "words_for %d", c);
}

static void test_popcount(std::mt19937_64& rng) {
  for (int i = 0; i < 1000; ++i) {
    const uint64_t w = rng();
    int brute = 0;
    for (int b = 0; b < 64; ++b) brute += (w >> b) & 1u;
    EXPECT_EQ(bk::popcount64(w), brute, "popcount64");
  }
}

// Packed conv the way mbn_conv.cu computes it (zero-padded buffer, all taps, minus correction) vs a
// direct +-1 conv over unpacked signs that skips padded taps.
static void test_conv(std::mt19937_64& rng, int C, int H, int W, int K, int S, int P, int Co) {
  const int kw_words = bk::words_for(C);
  const int OH = bk::out_size(H, K, S, P), OW = bk::out_size(W, K, S, P);
  if (OH <= 0 || OW <= 0) return;
  std::vector<int> xs(C * H * W), ws(Co * C * K * K);  // +-1 values
  for (int& v : xs) v = (rng() & 1) ? 1 : -1;
  for (int& v : ws) v = (rng() & 1) ? 1 : -1;
  const int hp = H + 2 * P, wp = W + 2 * P;
  std::vector<uint64_t> xpad(static_cast<size_t>(hp) * wp * kw_words, 0);  // zero border
  for (int c = 0; c < C; ++c)
    for (int h = 0; h < H; ++h)
      for (int w = 0; w < W; ++w)
        if (xs[(c * H + h) * W + w] > 0)
          xpad[(static_cast<size_t>(h + P) * wp + w + P) * kw_words + c / 64] |= uint64_t{1} << (c % 64);
  const int taps = K * K;
  std::vector<uint64_t> wp_words(static_cast<size_t>(Co) * taps * kw_words, 0);
  for (int co = 0; co < Co; ++co)
    for (int c = 0; c < C; ++c)
      for (int t = 0; t < taps; ++t)
        if (ws[(co * C + c) * taps + t] > 0)
          wp_words[(static_cast<size_t>(co) * taps + t) * kw_words + c / 64] |= uint64_t{1} << (c % 64);
  std::vector<int32_t> table(static_cast<size_t>(Co) * taps);
  for (int i = 0; i < Co * taps; ++i) {
    table[i] = bk::zero_tap_value(&wp_words[static_cast<size_t>(i) * kw_words], kw_words, C);
    int brute = 0;  // dot of the tap with all -1
    for (int c = 0; c < C; ++c) brute -= ws[((i / taps) * C + c) * taps + i % taps];
    EXPECT_EQ(table[i], brute, "zero_tap_value C=%d", C);
  }
  for (int co = 0; co < Co; ++co)
    for (int oh = 0; oh < OH; ++oh)
      for (int ow = 0; ow < OW; ++ow) {
        int direct = 0;
        for (int kh = 0; kh < K; ++kh)
          for (int kw = 0; kw < K; ++kw) {
            const int ih = oh * S - P + kh, iw = ow * S - P + kw;
            if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
            for (int c = 0; c < C; ++c) direct += xs[(c * H + ih) * W + iw] * ws[(co * C + c) * taps + kh * K + kw];
          }
        int pop = 0;
        for (int t = 0; t < taps; ++t)
          for (int k = 0; k < kw_words; ++k)
            pop += bk::popcount64(xpad[(static_cast<size_t>(oh * S + t / K) * wp + ow * S + t % K) * kw_words + k] ^
                                  wp_words[(static_cast<size_t>(co) * taps + t) * kw_words + k]);
        int kh_lo, kh_hi, kw_lo, kw_hi;
        bk::valid_taps(oh, S, P, K, H, &kh_lo, &kh_hi);
        bk::valid_taps(ow, S, P, K, W, &kw_lo, &kw_hi);
        const int packed = taps * C - 2 * pop -
                           bk::padded_tap_correction(&table[static_cast<size_t>(co) * taps], K, K, kh_lo, kh_hi,
                                                     kw_lo, kw_hi);
        EXPECT_EQ(packed, direct, "conv C=%d H=%d W=%d K=%d S=%d P=%d co=%d oh=%d ow=%d", C, H, W, K, S, P, co, oh,
                  ow);
      }
}

int main() {
  std::mt19937_64 rng(1234);
  test_geometry();
  test_popcount(rng);
  int cases = 0;
  const int channels[] = {1, 63, 64, 65, 130};
  for (int C : channels)
    for (int K : {1, 3, 5})
      for (int S : {1, 2, 3})
        for (int P : {0, 1, 2}) {
          test_conv(rng, C, 7, 5, K, S, P, 3);
          ++cases;
        }
  std::printf("%d conv cases, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
