// Helpers for the CPU kernels: ISA cloning for the hot loops and the parallel
// walk over a work table's chunks.
#pragma once
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#include "../common/work_table.h"

// The hot loops are compiled twice, for AVX2+FMA-free x86-64-v3 and for the
// baseline, and picked at load time (gcc ifunc): a wheel built here still runs
// on any x86-64 CPU. -ffp-contract=off keeps FMA out of the shared math.
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

// Large CPU outputs (scores, masks) come from a small cache of blocks that
// earlier outputs returned when their last user (a tensor, a numpy array) let
// go. A client that selects every round then writes into pages that are
// already mapped: a fresh 200 MB buffer costs more in first-touch page faults
// (51 ms measured here) than the whole mask kernel. The cache holds at most
// LAYERSEL_OUTPUT_CACHE_MB (default 1024; 0 disables) of idle blocks.
class OutputBlockCache {
 public:
  static OutputBlockCache& instance() {
    static OutputBlockCache* cache = new OutputBlockCache();  // never destroyed: deleters may run at exit
    return *cache;
  }

  at::Tensor empty(int64_t n, at::ScalarType dtype) {
    const size_t bytes = std::max<size_t>(1, static_cast<size_t>(n) * c10::elementSize(dtype));
    void* p = nullptr;
    size_t capacity = bytes;
    if (bytes >= kMinBytes && limit_ > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      // Best fit among idle blocks no more than twice the size asked for.
      size_t best = idle_.size();
      for (size_t i = 0; i < idle_.size(); ++i)
        if (idle_[i].second >= bytes && idle_[i].second <= 2 * bytes &&
            (best == idle_.size() || idle_[i].second < idle_[best].second))
          best = i;
      if (best != idle_.size()) {
        p = idle_[best].first;
        capacity = idle_[best].second;
        idle_bytes_ -= capacity;
        idle_.erase(idle_.begin() + static_cast<std::ptrdiff_t>(best));
      }
    }
    if (p == nullptr && posix_memalign(&p, 64, capacity) != 0) throw std::bad_alloc();
    // A resizable storage, as torch.empty's: a caller may resize_ the output (fl4health's
    // outputs allow it); growing it moves the data to memory from the CPU allocator and
    // gives this block back.
    c10::DataPtr data(p, new Block{p, capacity}, &release, c10::Device(c10::kCPU));
    c10::Storage storage(c10::Storage::use_byte_size_t(), static_cast<size_t>(n) * c10::elementSize(dtype),
                         std::move(data), c10::GetCPUAllocator(), /*resizable=*/true);
    at::Tensor out = at::empty({0}, at::TensorOptions().dtype(dtype));
    out.set_(storage, 0, {n}, {1});
    return out;
  }

 private:
  struct Block {
    void* p;
    size_t capacity;
  };
  static void release(void* ctx) {
    const Block* block = static_cast<const Block*>(ctx);
    instance().give_back(block->p, block->capacity);
    delete block;
  }

 private:
  static constexpr size_t kMinBytes = size_t{8} << 20;

  OutputBlockCache() {
    const char* env = std::getenv("LAYERSEL_OUTPUT_CACHE_MB");
    limit_ = (env ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : size_t{1024}) << 20;
  }

  void give_back(void* p, size_t capacity) {
    if (capacity >= kMinBytes && capacity <= limit_) {
      std::lock_guard<std::mutex> lock(mu_);
      while (!idle_.empty() && idle_bytes_ + capacity > limit_) {  // evict the oldest
        std::free(idle_.front().first);
        idle_bytes_ -= idle_.front().second;
        idle_.erase(idle_.begin());
      }
      idle_.emplace_back(p, capacity);
      idle_bytes_ += capacity;
      return;
    }
    std::free(p);
  }

  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> idle_;
  size_t idle_bytes_ = 0;
  size_t limit_ = 0;
};

inline at::Tensor empty_cpu_output(int64_t n, at::ScalarType dtype) {
  return OutputBlockCache::instance().empty(n, dtype);
}

}  // namespace layersel
