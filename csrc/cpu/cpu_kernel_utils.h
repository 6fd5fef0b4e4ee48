// Helpers for the CPU kernels: ISA cloning for the hot loops and the parallel
// walk over a work table's chunks. (Output allocation: output_block_cache.h.)
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../common/work_table.h"
#include "cpu_features.h"
#include "output_block_cache.h"

// The hot loops are compiled three times, for x86-64-v4 (AVX-512), for AVX2
// (x86-64-v3's vector width) and for the baseline, and picked at load time (gcc
// ifunc): a wheel built here still runs on any x86-64 CPU. x86-64-v4 has FMA,
// but -ffp-contract=off keeps every a * b + c two rounded operations, so each
// clone gives the bits of the scalar shared math (the tests compare them with
// the torch twins on whatever clone the machine picks). Clones are for the
// passes that compute and key every score of a large model (the sparse
// selection's bracket and marking passes), where the AVX-512 clone is about a
// fifth faster than the baseline; each clone is a full copy of its function,
// so rare paths are not cloned (csrc/cpu/sparse_select.h).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define LS_CPU_CLONES
#endif
// The body of a cloned function, inlined into each clone (and into a plain
// caller where one instantiation serves every ISA).
#define LS_CPU_INLINE inline __attribute__((always_inline))

namespace layersel {

// The SIMD level of the kernels written for AVX2 and AVX-512 (the mask kernel,
// the coded wire's prior and lanes): cpu_simd_support(), which LAYERSEL_CPU_ISA=avx2|portable
// caps (the tests run every level and compare the bits).
inline int cpu_simd_level() {
  const char* env = std::getenv("LAYERSEL_CPU_ISA");
  const std::string cap = env ? env : "";
  const int best = cpu_simd_support();
  if (cap == "portable") return 0;
  return cap == "avx2" ? std::min(best, 1) : best;
}

// The bytes of a wire codec's input (a contiguous 1-D uint8 CPU tensor, or a ValueError naming `what`).
inline const uint8_t* bytes_of(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kByte && t.dim() == 1 && t.is_contiguous(), what,
                    " must be a contiguous 1-D uint8 CPU tensor");
  return t.data_ptr<uint8_t>();
}

// Eight 0/1 bytes as the eight bits of one byte (byte k -> bit k): byte k of
// the word lands on bit 56 + k of the product, and no two terms meet, so
// nothing carries.
inline uint8_t pack_flags8(const uint8_t* flags) {
  uint64_t v;
  std::memcpy(&v, flags, 8);
  return static_cast<uint8_t>((v * 0x0102040810204080ull) >> 56);
}

// Sixty-four 0/1 bytes as the bits of one word (byte k -> bit k).
inline uint64_t pack_flags64(const uint8_t* flags) {
  uint64_t w = 0;
  for (int b = 0; b < 64; b += 8) w |= static_cast<uint64_t>(pack_flags8(flags + b)) << b;
  return w;
}

// Calls fn(entry, tensor_index, chunk_id, offset, length) for every chunk of
// every tensor. The intra-op threads take runs of chunks from a shared
// counter, not a fixed half each: chunks differ in length (a small tensor's is
// short) and in cost (a sparse pass collects more keys from some tensors), and
// with a static split one thread waited for the other (resnet_like's sparse
// selection here). A run is about one full chunk's worth of elements (one
// chunk on a large model; ~100 chunks of many_small's 2,100 tensors, where a
// contended counter update per chunk cost more than the chunk). Every chunk
// still runs on exactly one thread, so per-chunk outputs, per-thread tables
// (at::get_thread_num()) and results reduced in chunk order are as before.
template <typename Fn>
void for_each_chunk(const WorkTable& table, int64_t chunk, Fn fn) {
  const int32_t n = static_cast<int32_t>(table.entries.size());
  const int64_t* first = table.first_chunk.data();
  const int64_t total = table.total_chunks();
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(total, at::get_num_threads());
  // Chunks per run: a full chunk's worth of elements, at most 1/16 of a thread's share.
  const int64_t average = total > 0 ? std::max<int64_t>(1, table.total_numel / total) : 1;
  const int64_t run = std::max<int64_t>(1, std::min(chunk / average, total / (16 * std::max<int64_t>(workers, 1))));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(run, std::memory_order_relaxed); begin < total;
         begin = next.fetch_add(run, std::memory_order_relaxed)) {
      const int64_t end = std::min(total, begin + run);
      int32_t t = tensor_of_chunk(first, n, begin);
      for (int64_t c = begin; c < end; ++c) {
        while (first[t + 1] <= c) ++t;  // the run's next tensor (empty ones own no chunk)
        const TensorEntry& e = table.entries[t];
        const int64_t offset = (c - first[t]) * chunk;
        fn(e, t, c, offset, std::min(chunk, e.numel - offset));
      }
    }
  });
}

}  // namespace layersel
