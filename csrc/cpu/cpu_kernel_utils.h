// Helpers for the CPU kernels: ISA cloning for the hot loops and the parallel
// walk over a work table's chunks. (Output allocation: output_block_cache.h.)
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>

#include "../common/work_table.h"
#include "output_block_cache.h"

// The hot loops are compiled twice, for AVX2 (x86-64-v3's vector width; no FMA
// is enabled: the target is "avx2" alone) and for the baseline, and picked at
// load time (gcc ifunc): a wheel built here still runs on any x86-64 CPU.
// -ffp-contract=off keeps FMA out of the shared math.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LS_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LS_CPU_CLONES
#endif

namespace layersel {

// Calls fn(entry, tensor_index, chunk_id, offset, length) for every chunk of
// every tensor, the chunks spread over the intra-op threads.
template <typename Fn>
void for_each_chunk(const WorkTable& table, int64_t chunk, Fn fn) {
  const int32_t n = static_cast<int32_t>(table.entries.size());
  const int64_t* first = table.first_chunk.data();
  at::parallel_for(0, table.total_chunks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int32_t t = tensor_of_chunk(first, n, c);
      const TensorEntry& e = table.entries[t];
      const int64_t offset = (c - first[t]) * chunk;
      fn(e, t, c, offset, std::min(chunk, e.numel - offset));
    }
  });
}

}  // namespace layersel
