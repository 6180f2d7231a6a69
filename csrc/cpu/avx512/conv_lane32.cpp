// Lane-32 engine (C <= 32): see conv_lane_avx512.h.
#include "cpu/common/kernels.h"

#if BK_X86
#define BK_SMALL_LANE 32
#define BK_SMALL_TARGET BK_TARGET_AVX512
#include "cpu/avx512/conv_lane_avx512.h"

namespace bk {
void conv_lane32_avx512(const ConvPlan& p, int64_t u_begin, int64_t u_end) {
  small_engine(p, u_begin, u_end);
}
}  // namespace bk
#endif
