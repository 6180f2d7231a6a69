// Persistent std::thread pool (no OpenMP, so it never clashes with torch's libgomp).
#pragma once
#include <cstdint>
#include <functional>

namespace bk {

// Calls fn(begin, end) over chunks of [0, ntasks) of `grain` tasks, on up to `nthreads` threads
// (the caller is one of them), dynamically scheduled. If the pool is busy with another caller's job,
// runs inline on the calling thread. Exceptions from fn are rethrown in the caller.
void parallel_for(int64_t ntasks, int nthreads, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& fn);

}  // namespace bk
