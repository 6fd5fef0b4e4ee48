// The allocator of large CPU outputs (scores, masks, sparse values/indices)
// and of the sparse select's scratch (marks, bracket keys): a bounded cache of
// idle blocks, with its policy in one place.
//
// Why: a client selects every round, and a fresh 200 MB output costs more in
// first-touch page faults (51 ms measured on the CI machine) than the whole
// mask kernel. Blocks of at least 8 MiB that an output returns when its last
// user (a tensor, a numpy array) lets go are kept, and a later output of up to
// that size (and at least half of it) is served from one, so the kernel writes
// into pages that are already mapped.
// Policy: at most LAYERSEL_OUTPUT_CACHE_MB of idle blocks (default 1024; 0
// turns the cache off: every output is a fresh allocation); the oldest idle
// block is freed first when the limit would be passed. Outputs below 8 MiB are
// plain allocations, unless the caller names a smaller minimum (the coded
// wire's prior: a layer's few MB of quantized theta every round; such blocks
// serve only outputs as small). The storage is resizable as torch.empty's is.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/Storage.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

namespace layersel {

class OutputBlockCache {
 public:
  static OutputBlockCache& instance() {
    static OutputBlockCache* cache = new OutputBlockCache();  // never destroyed: deleters may run at exit
    return *cache;
  }

  static constexpr size_t kMinBytes = size_t{8} << 20;

  at::Tensor empty(int64_t n, at::ScalarType dtype, size_t min_bytes = kMinBytes) {
    const size_t bytes = std::max<size_t>(1, static_cast<size_t>(n) * c10::elementSize(dtype));
    const bool cached = bytes >= min_bytes;
    void* p = nullptr;
    size_t capacity = bytes;
    if (cached && limit_ > 0) {
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
    c10::DataPtr data(p, new Block{p, capacity, cached}, &release, c10::Device(c10::kCPU));
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
    bool cached;  // kept when idle
  };
  static void release(void* ctx) {
    const Block* block = static_cast<const Block*>(ctx);
    instance().give_back(block->p, block->capacity, block->cached);
    delete block;
  }

 private:
  OutputBlockCache() {
    const char* env = std::getenv("LAYERSEL_OUTPUT_CACHE_MB");
    limit_ = (env ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : size_t{1024}) << 20;
  }

  void give_back(void* p, size_t capacity, bool cached) {
    if (cached && capacity <= limit_) {
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

// An output that the cache keeps and serves from min_bytes up (not only from 8 MiB).
inline at::Tensor empty_cpu_output_from(int64_t n, at::ScalarType dtype, size_t min_bytes) {
  return OutputBlockCache::instance().empty(n, dtype, min_bytes);
}

}  // namespace layersel
