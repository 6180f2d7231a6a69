// Portable NaN scan of a float buffer (also the vector scans' tail).
#include <cmath>

#include "cpu/common/kernels.h"

namespace bk {

bool has_nan_scalar(const float* x, int64_t n) {
  bool found = false;
  for (int64_t i = 0; i < n; ++i) found |= std::isnan(x[i]);
  return found;
}

}  // namespace bk
