#include "cpu/common/thread_pool.h"

#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

namespace bk {
namespace {

// The work loop every thread of a job runs (the std::thread pool's and OpenMP's): take the next chunk of
// `grain` tasks until none is left; the first exception is kept and ends the job for everyone.
struct Job {
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  std::atomic<int64_t> next{0};
  int64_t ntasks = 0, grain = 1;
  std::mutex mu;
  std::exception_ptr error;

  void run_chunks() {
    for (;;) {
      const int64_t begin = next.fetch_add(grain);
      if (begin >= ntasks) return;
      try {
        (*fn)(begin, std::min(ntasks, begin + grain));
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu);
        if (!error) error = std::current_exception();
        next.store(ntasks);
      }
    }
  }
};

class Pool {
 public:
  // Runs the job; returns false (without running anything) if another job holds the pool.
  bool try_run(int64_t ntasks, int nthreads, int64_t grain,
               const std::function<void(int64_t, int64_t)>& fn) {
    std::unique_lock<std::mutex> job_lock(job_mu_, std::try_to_lock);
    if (!job_lock.owns_lock()) return false;
    const int helpers = nthreads - 1;
    while (static_cast<int>(workers_.size()) < helpers) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { worker_loop(id); });
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_.fn = &fn;
      job_.ntasks = ntasks;
      job_.grain = grain;
      job_.next.store(0);
      job_.error = nullptr;
      helpers_ = helpers;
      finished_ = 0;
      ++generation_;
    }
    cv_.notify_all();
    job_.run_chunks();
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return finished_ == helpers_; });
    job_.fn = nullptr;
    if (job_.error) std::rethrow_exception(job_.error);
    return true;
  }

 private:
  void worker_loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= helpers_) continue;  // this job asked for fewer threads
      }
      job_.run_chunks();
      {
        std::lock_guard<std::mutex> lk(mu_);
        ++finished_;
      }
      done_cv_.notify_all();
    }
  }

  std::mutex job_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;  // detached at exit: the pool is intentionally never destroyed
  Job job_;
  int helpers_ = 0, finished_ = 0;
  uint64_t generation_ = 0;
};

// The pool is leaked on purpose: joining threads during interpreter shutdown can deadlock. After
// fork() the child has none of the parent's threads, so it starts a fresh pool.
std::mutex g_pool_mu;
Pool* g_pool = nullptr;
std::once_flag g_atfork_once;

bool g_forked_child = false;  // set in a fork()ed child: OpenMP's team does not survive fork()

void reset_after_fork() {
  g_pool = nullptr;              // the parent's pool (and its threads) do not exist here
  new (&g_pool_mu) std::mutex();  // it may have been held by a parent thread at fork time
  g_forked_child = true;
}

void watch_fork() {
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, reset_after_fork); });
}

Pool& pool() {
  watch_fork();
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (!g_pool) g_pool = new Pool();
  return *g_pool;
}

// torch's OpenMP runtime, when the process has loaded it (import torch does): GOMP_parallel runs a
// function on the calling thread's OpenMP team. Work handed to that team starts at once on threads
// that are spinning after torch's last op, where a second pool's threads would have to compete with
// them for the cores (on 2 cores a chain of packed convs right after a torch op ran ~1.7x slower).
// Looked up, not linked: without a loaded libgomp (the C++ unit tests), or in a fork()ed child (whose
// OpenMP team threads do not exist), the std::thread pool runs.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
GompParallel loaded_gomp_parallel() {
  static const GompParallel fn = [] {
    void* lib = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
    return lib ? reinterpret_cast<GompParallel>(dlsym(lib, "GOMP_parallel")) : nullptr;
  }();
  return fn;
}

thread_local bool t_in_omp_job = false;  // nested calls run inline

}  // namespace

void parallel_for(int64_t ntasks, int nthreads, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& fn) {
  if (ntasks <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t max_useful = (ntasks + grain - 1) / grain;
  nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, max_useful)));
  watch_fork();
  if (nthreads > 1 && !t_in_omp_job && !g_forked_child) {
    if (const GompParallel gomp = loaded_gomp_parallel()) {
      Job job;
      job.fn = &fn, job.ntasks = ntasks, job.grain = grain;
      gomp([](void* data) {
        t_in_omp_job = true;
        static_cast<Job*>(data)->run_chunks();
        t_in_omp_job = false;
      }, &job, static_cast<unsigned>(nthreads), 0);
      if (job.error) std::rethrow_exception(job.error);
      return;
    }
  }
  if (nthreads > 1 && pool().try_run(ntasks, nthreads, grain, fn)) return;
  for (int64_t b = 0; b < ntasks; b += grain) fn(b, std::min(ntasks, b + grain));
}

}  // namespace bk
