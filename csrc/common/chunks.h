// The multi-tensor work table: every tensor is cut into fixed-size chunks, and
// a flat chunk id maps back to (tensor, offset) by a binary search over each
// tensor's first chunk id. The split depends only on the sizes, never on the
// thread or block count, so per-chunk partials reduced in chunk order give the
// same bits on every run.
#pragma once
#include <cstdint>

#include "macros.h"

namespace layersel {

// Elements per chunk. CPU: big enough to amortise scheduling, small enough to
// balance 2..64 threads; CUDA: one block's share of a large tensor.
constexpr int64_t kCpuChunk = 1 << 16;
constexpr int64_t kCudaChunk = 1 << 16;

LS_HD int64_t num_chunks(int64_t numel, int64_t chunk) { return (numel + chunk - 1) / chunk; }

// The last i in [0, n) with key(i) <= x, for key non-decreasing in i and
// key(0) <= x (0 when n <= 1): which tensor holds a chunk id (by the tensors'
// first chunk ids) or an element (by their first elements, CUDA's tail bits).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable  // key is a host lambda on the CPU, a device one in a kernel
#endif
template <typename Key>
LS_HD_INLINE int32_t last_at_or_below(int32_t n, int64_t x, Key key) {
  int32_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;
    if (key(mid) <= x) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// first_chunk has n + 1 entries, first_chunk[0] == 0, non-decreasing;
// returns the tensor t with first_chunk[t] <= chunk_id < first_chunk[t + 1].
LS_HD int32_t tensor_of_chunk(const int64_t* first_chunk, int32_t n, int64_t chunk_id) {
  return last_at_or_below(n, chunk_id, [first_chunk](int32_t i) { return first_chunk[i]; });
}

}  // namespace layersel
