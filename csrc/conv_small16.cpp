// Small-channel engine, 16-bit lanes (C <= 16, stride 1 along W): see conv_small_avx512.h.
#include "bk_common.h"

#if BK_X86
#define BK_SMALL_LANE 16
#define BK_SMALL_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx512bitalg,popcnt,fma")))
#include "conv_small_avx512.h"

namespace bk {
void conv_small16_avx512(const ConvPlan& p, int64_t u_begin, int64_t u_end) {
  small_engine(p, u_begin, u_end);
}
}  // namespace bk
#endif
