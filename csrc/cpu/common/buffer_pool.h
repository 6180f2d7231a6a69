// Retaining pool for the engine's large output buffers (handed to torch through DLPack).
#pragma once
#include <cstddef>

namespace bk {

// A 64-byte aligned block of at least `bytes` (a cached one of the same rounded size when there is one:
// its pages are already mapped, so writing it takes no page faults).
void* pool_acquire(size_t bytes);
// Gives a block back: cached while the free blocks stay within the limit, else freed. Any thread.
void pool_release(void* ptr, size_t bytes);
// Frees every cached block.
void pool_clear();
// Cap on the bytes kept in free cached blocks (0: cache nothing).
void pool_set_limit(size_t bytes);
size_t pool_limit();
size_t pool_cached_bytes();

}  // namespace bk
