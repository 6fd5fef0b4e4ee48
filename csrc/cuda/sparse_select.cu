// CUDA: fl4health's sparse COO selection without a sort. Radix select: one
// launch per 11-bit digit, a block per chunk with a shared-memory histogram
// (integer atomics: exact counts); a one-block launch then picks the digit on
// the device (the prefix and the rank left stay in device memory for the next
// pass), so the select costs one sync (the final key), not one per digit.
// Extraction: a counting launch (one count per chunk), then a writing launch
// in which each block compacts its chunk in order (block-wide scan), so the
// indices come out row-major as torch.nonzero gives them.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>
#include <tuple>

#include "../common/op_checks.h"
#include "../common/radix.h"
#include "../common/radix_values.h"
#include "cuda_utils.cuh"

namespace layersel {
namespace {

constexpr int kMaxDims = 8;

// state: {prefix, remaining} after pass d - 1 (pick_digit_kernel); pass 0 reads neither.
template <typename P>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const TensorEntry* entries, const int64_t* first_chunk, int32_t n, int64_t kind, int d,
                     const int64_t* state, unsigned long long* hist) {
  __shared__ unsigned int local[kDigitBins];
  const uint64_t prefix = d == 0 ? 0 : static_cast<uint64_t>(state[0]);
  for (int b = threadIdx.x; b < kDigitBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const int64_t c = blockIdx.x;
  const auto [t, e, off, len] = locate_chunk(entries, first_chunk, n, c);
  constexpr int bits = static_cast<int>(sizeof(P) * 8);
  LS_SWITCH_DTYPE(e.dtype, T, {
    const T* x = static_cast<const T*>(e.x) + off;
    const T* y = e.y ? static_cast<const T*>(e.y) + off : x;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      const P v = static_cast<P>(sparse_score<T>(kind, x[i], y[i]));
      const int32_t digit = key_digit(order_key<P>(v), bits, d, prefix);
      if (digit >= 0) atomicAdd(&local[digit], 1u);
    }
  });
  __syncthreads();
  for (int b = threadIdx.x; b < kDigitBins; b += blockDim.x)
    if (local[b]) atomicAdd(&hist[b], static_cast<unsigned long long>(local[b]));
}

// The digit of pass d holding the `remaining`-th largest key (remaining = k at
// pass 0), as the host loop over the bins from the top did: each thread sums
// 8 consecutive bins (thread 0 the top ones), a block scan gives the counts
// above each thread's bins, and the one thread whose bins hold the rank writes
// state = {prefix << width | digit, the rank left within that digit}. Every
// thread reads state before the scan's barriers, one writes it after them.
__global__ void __launch_bounds__(kThreads)
    pick_digit_kernel(const unsigned long long* hist, int width, int d, int64_t k, int64_t* state) {
  static_assert(kDigitBins % kThreads == 0, "bins per thread");
  constexpr int kPer = kDigitBins / kThreads;
  using Scan = cub::BlockScan<long long, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int64_t remaining = d == 0 ? k : state[1];
  const uint64_t prefix = d == 0 ? 0 : static_cast<uint64_t>(state[0]);
  __syncthreads();  // every read of state before the write below (cub's barriers order it too)
  const int top = kDigitBins - 1 - static_cast<int>(threadIdx.x) * kPer;  // bins top, top - 1, ..., top - kPer + 1
  long long counts[kPer];
  long long sum = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    counts[j] = static_cast<long long>(hist[top - j]);  // bins at or above 1 << width stay 0
    sum += counts[j];
  }
  long long above = 0;
  Scan(temp).ExclusiveSum(sum, above);
  if (above < remaining && remaining <= above + sum) {
    long long left = remaining - above;
    for (int j = 0; j < kPer; ++j) {
      if (left <= counts[j]) {
        state[0] = static_cast<int64_t>((prefix << width) | static_cast<uint64_t>(top - j));
        state[1] = left;
        break;
      }
      left -= counts[j];
    }
  }
}

template <typename P>
uint64_t kth_largest_key(const WorkTable& table, const DeviceTable& dt, int64_t kind, int64_t k,
                         c10::Device device) {
  constexpr int bits = static_cast<int>(sizeof(P) * 8);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorOptions on_device = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor hist = at::empty({kDigitBins}, on_device);
  at::Tensor state = at::empty({2}, on_device);  // {prefix, remaining}, written by pick_digit_kernel
  auto* counts = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  for (int d = 0; d < num_digits(bits); ++d) {
    hist.zero_();
    histogram_kernel<P><<<static_cast<unsigned>(table.total_chunks()), kThreads, 0, stream>>>(
        dt.entries, dt.first_chunk, dt.n, kind, d, state.data_ptr<int64_t>(), counts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pick_digit_kernel<<<1, kThreads, 0, stream>>>(counts, digit_width(bits, d), d, k, state.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor host = state.cpu();  // the select's one sync
  return static_cast<uint64_t>(host.data_ptr<int64_t>()[0]);
}

at::Tensor kth_largest_score_cuda(at::TensorList model, at::TensorList initial, int64_t kind, int64_t k,
                                  at::ScalarType score_dtype) {
  check_sparse_kind(kind, "kth_largest_score");
  const WorkTable table = build_work_table(model, initial, score_kind_uses_initial(kind), kCudaChunk, "kth_largest_score");
  check_rank(k, table.total_numel);
  const c10::Device device = cuda_device_of(model, "kth_largest_score");
  const c10::cuda::CUDAGuard guard(device);
  const DeviceTable dt = upload_table(table, device);
  return kth_value_for_dtype(score_dtype, [&](auto tag) {
    using P = decltype(tag);
    return kth_largest_key<P>(table, dt, kind, k, device);
  });
}

struct ExtractTarget {
  void* values;     // this chunk's first output value
  int64_t* indices; // this chunk's first output index row
  int64_t sizes[kMaxDims];
  int32_t ndim;
  double threshold;
};

template <typename T>
__device__ __forceinline__ bool keep(int64_t kind, const T* x, const T* y, int64_t i, double threshold) {
  return passes_threshold(sparse_score<T>(kind, x[i], y[i]), threshold) && is_nonzero(x[i]);
}

__global__ void __launch_bounds__(kThreads)
    count_kernel(const TensorEntry* entries, const int64_t* first_chunk, int32_t n, int64_t kind,
                 const double* thresholds, int64_t* counts) {
  const int64_t c = blockIdx.x;
  const auto [t, e, off, len] = locate_chunk(entries, first_chunk, n, c);
  double count = 0;
  LS_SWITCH_DTYPE(e.dtype, T, {
    const T* x = static_cast<const T*>(e.x) + off;
    const T* y = e.y ? static_cast<const T*>(e.y) + off : x;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) count += keep(kind, x, y, i, thresholds[t]);
  });
  count = block_sum(count);  // exact: counts are small integers
  if (threadIdx.x == 0) counts[c] = static_cast<int64_t>(count);
}

__global__ void __launch_bounds__(kThreads)
    write_kernel(const TensorEntry* entries, const int64_t* first_chunk, int32_t n, int64_t kind,
                 const ExtractTarget* targets, const int64_t* counts) {
  __shared__ int64_t scan[kThreads];
  __shared__ int64_t found;
  const int64_t c = blockIdx.x;
  // The output holds exactly counts[c] rows for this chunk (the counting
  // pass). Writes stop there even if the data changed in between (another
  // thread updating the weights in place): the answer may be stale, memory is
  // never corrupted; rows the data no longer fills are zeroed.
  const int64_t cap = counts[c];
  if (cap == 0) return;
  const auto [t, e, off, len] = locate_chunk(entries, first_chunk, n, c);
  const ExtractTarget target = targets[c];
  // Each thread owns a contiguous run of the chunk, so a block-wide exclusive
  // scan of the per-thread counts keeps the row-major order.
  const int64_t per = (len + blockDim.x - 1) / blockDim.x;
  const int64_t begin = min(len, per * threadIdx.x), end = min(len, begin + per);
  LS_SWITCH_DTYPE(e.dtype, T, {
    const T* x = static_cast<const T*>(e.x) + off;
    const T* y = e.y ? static_cast<const T*>(e.y) + off : x;
    int64_t mine = 0;
    for (int64_t i = begin; i < end; ++i) mine += keep(kind, x, y, i, target.threshold);
    scan[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t running = 0;
      for (int j = 0; j < static_cast<int>(blockDim.x); ++j) {
        const int64_t v = scan[j];
        scan[j] = running;
        running += v;
      }
      found = min(running, cap);
    }
    __syncthreads();
    int64_t w = scan[threadIdx.x];
    T* values = static_cast<T*>(target.values);
    for (int64_t i = begin; i < end && w < cap; ++i) {
      if (!keep(kind, x, y, i, target.threshold)) continue;
      values[w] = x[i];
      int64_t flat = off + i;
      for (int dim = target.ndim - 1; dim >= 0; --dim) {
        target.indices[w * target.ndim + dim] = flat % target.sizes[dim];
        flat /= target.sizes[dim];
      }
      ++w;
    }
  });
  __syncthreads();
  for (int64_t w = found + threadIdx.x; w < cap; w += blockDim.x) {
    for (int dim = 0; dim < target.ndim; ++dim) target.indices[w * target.ndim + dim] = 0;
  }
  LS_SWITCH_DTYPE(e.dtype, T, {
    T* values = static_cast<T*>(target.values);
    for (int64_t w = found + threadIdx.x; w < cap; w += blockDim.x) values[w] = T(0);
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sparse_extract_cuda(at::TensorList model,
                                                                                 at::TensorList initial,
                                                                                 int64_t kind,
                                                                                 at::ArrayRef<double> thresholds) {
  check_sparse_kind(kind, "sparse_extract");
  check_threshold_count(thresholds.size(), model.size());
  const WorkTable table = build_work_table(model, initial, score_kind_uses_initial(kind), kCudaChunk, "sparse_extract");
  const size_t n = table.entries.size();
  for (size_t t = 0; t < n; ++t)
    TORCH_CHECK_VALUE(model[t].dim() <= kMaxDims, "layersel::sparse_extract: tensor #", t, " has ", model[t].dim(),
                      " dimensions; the CUDA kernel handles up to ", kMaxDims);
  const c10::Device device = cuda_device_of(model, "sparse_extract");
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunks = table.total_chunks();
  std::vector<at::Tensor> values(n), indices(n);
  if (chunks == 0) {
    for (size_t t = 0; t < n; ++t) {
      values[t] = at::empty({0}, model[t].options());
      indices[t] = at::empty({0, model[t].dim()}, model[t].options().dtype(at::kLong));
    }
    return {values, indices};
  }
  const DeviceTable dt = upload_table(table, device);
  // Pinned host memory and an async copy: from pageable memory the copy would wait for the stream.
  at::Tensor thr = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kDouble).pinned_memory(true));
  std::memcpy(thr.data_ptr<double>(), thresholds.data(), n * sizeof(double));
  thr = thr.to(device, /*non_blocking=*/true);
  at::Tensor counts = at::empty({chunks}, at::TensorOptions().dtype(at::kLong).device(device));
  count_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(dt.entries, dt.first_chunk, dt.n, kind,
                                                                      thr.data_ptr<double>(),
                                                                      counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor host_counts = counts.cpu();  // the sync: output sizes
  const int64_t* hc = host_counts.data_ptr<int64_t>();
  std::vector<ExtractTarget> targets(static_cast<size_t>(chunks));
  for (size_t t = 0; t < n; ++t) {
    int64_t total = 0;
    for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) total += hc[c];
    // Outputs of their own (an allocation each): headers on one shared buffer would make the
    // op's outputs alias each other, which torch.compile's AOTAutograd refuses for custom ops.
    values[t] = at::empty({total}, model[t].options());
    indices[t] = at::empty({total, model[t].dim()}, model[t].options().dtype(at::kLong));
    int64_t running = 0;
    for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) {
      ExtractTarget& g = targets[c];
      g.values = static_cast<char*>(values[t].data_ptr()) + running * values[t].element_size();
      g.indices = indices[t].data_ptr<int64_t>() + running * model[t].dim();
      g.ndim = static_cast<int32_t>(model[t].dim());
      for (int dim = 0; dim < g.ndim; ++dim) g.sizes[dim] = model[t].size(dim);
      g.threshold = thresholds[t];
      running += hc[c];
    }
  }
  at::Tensor host_targets = at::empty({static_cast<int64_t>(targets.size() * sizeof(ExtractTarget))},
                                      at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host_targets.data_ptr(), targets.data(), targets.size() * sizeof(ExtractTarget));
  const at::Tensor device_targets = host_targets.to(device, /*non_blocking=*/true);
  write_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
      dt.entries, dt.first_chunk, dt.n, kind, reinterpret_cast<const ExtractTarget*>(device_targets.data_ptr()),
      counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values, indices};
}

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CUDA, m) {
  m.impl("kth_largest_score", &layersel::kth_largest_score_cuda);
  m.impl("sparse_extract", &layersel::sparse_extract_cuda);
}
