// Why: a fresh multi-megabyte allocation is a fresh mmap, and the first write to each of its 4 KiB
// pages is a page fault (about a microsecond each in a VM: ~1 ms per 8 MiB output, as long as the
// binary conv itself). Layer outputs of the same size recur every forward pass, so the blocks are kept
// mapped and reused. Blocks are bucketed by size rounded to 4 KiB; the cache is bounded, and the blocks
// returned longest ago go first: sizes a workload no longer uses must not crowd out the ones it does
// (a pool full of another model's sizes made a ResNet-20 attack step 17 % slower, 7k more faults).
#include "cpu/common/buffer_pool.h"

#include <pthread.h>

#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>
#include <new>

namespace bk {
namespace {

constexpr size_t kGranule = 4096;

struct FreeBlock {
  void* ptr;
  uint64_t returned;  // release order
};

struct Pool {
  std::mutex mu;
  std::multimap<size_t, FreeBlock> free_blocks;  // rounded size -> block
  size_t cached = 0;
  size_t limit = size_t(512) << 20;
  uint64_t releases = 0;
};

// Leaked on purpose: blocks may come back while the process is shutting down.
Pool* g_pool = new Pool();

void reset_mutex_after_fork() { new (&g_pool->mu) std::mutex(); }  // a parent thread may have held it

size_t rounded(size_t bytes) { return (bytes + kGranule - 1) / kGranule * kGranule; }

void trim_locked(Pool& p) {
  while (p.cached > p.limit && !p.free_blocks.empty()) {
    auto oldest = p.free_blocks.begin();  // a linear scan: at most a few thousand blocks
    for (auto it = p.free_blocks.begin(); it != p.free_blocks.end(); ++it)
      if (it->second.returned < oldest->second.returned) oldest = it;
    p.cached -= oldest->first;
    std::free(oldest->second.ptr);
    p.free_blocks.erase(oldest);
  }
}

}  // namespace

void* pool_acquire(size_t bytes) {
  static std::once_flag atfork_once;
  std::call_once(atfork_once, [] { pthread_atfork(nullptr, nullptr, reset_mutex_after_fork); });
  const size_t size = rounded(bytes == 0 ? 1 : bytes);
  {
    std::lock_guard<std::mutex> lk(g_pool->mu);
    // The most recently returned block of this size (equal keys keep insertion order): its lines are
    // the likeliest to still be in cache.
    const auto range = g_pool->free_blocks.equal_range(size);
    if (range.first != range.second) {
      const auto it = std::prev(range.second);
      void* ptr = it->second.ptr;
      g_pool->cached -= size;
      g_pool->free_blocks.erase(it);
      return ptr;
    }
  }
  void* ptr = std::aligned_alloc(64, size);
  if (!ptr) throw std::bad_alloc();
  return ptr;
}

void pool_release(void* ptr, size_t bytes) {
  if (!ptr) return;
  const size_t size = rounded(bytes == 0 ? 1 : bytes);
  std::lock_guard<std::mutex> lk(g_pool->mu);
  if (size > g_pool->limit) {
    std::free(ptr);
    return;
  }
  g_pool->free_blocks.emplace(size, FreeBlock{ptr, ++g_pool->releases});
  g_pool->cached += size;
  trim_locked(*g_pool);
}

void pool_clear() {
  std::lock_guard<std::mutex> lk(g_pool->mu);
  for (auto& kv : g_pool->free_blocks) std::free(kv.second.ptr);
  g_pool->free_blocks.clear();
  g_pool->cached = 0;
}

void pool_set_limit(size_t bytes) {
  std::lock_guard<std::mutex> lk(g_pool->mu);
  g_pool->limit = bytes;
  trim_locked(*g_pool);
}

size_t pool_limit() {
  std::lock_guard<std::mutex> lk(g_pool->mu);
  return g_pool->limit;
}

size_t pool_cached_bytes() {
  std::lock_guard<std::mutex> lk(g_pool->mu);
  return g_pool->cached;
}

}  // namespace bk
