// CUDA: fl4health's sparse COO selection without a sort. Radix select: one
// launch per 11-bit digit, a block per chunk with a shared-memory histogram
// (integer atomics: exact counts); a one-block launch then picks the digit on
// the device (the prefix and the rank left stay in device memory for the next
// pass). Extraction: a counting launch (one count per chunk), the counts to
// the host (they size the outputs), then a writing launch in which each block
// compacts its chunk tile by tile (ballot + a warp scan of the warps' counts),
// so the indices come out row-major as torch.nonzero gives them.
//
// Blocking syncs: kth_largest_score 1 (the key); sparse_extract 1 (the
// counts); sparse_select 1 (the counts: the threshold goes from the key to the
// counting launch on the device).
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
constexpr int kWarps = kThreads / 32;

// The elements a thread handles per step of the per-chunk loops: item j of
// thread i is element base + j * kThreads + i, so each of the kItems loads is
// coalesced across the block, and all kItems are issued before any is used
// (bytes in flight). A step covers kStep consecutive elements.
constexpr int kItems = 4;
constexpr int64_t kStep = kThreads * kItems;
static_assert(kItems * kWarps == 32, "one warp scans a step's per-(item, warp) counts");

template <typename T>
struct StepItems {
  T x[kItems];
  T y[kItems];
};

// y null (a kind that reads no initial tensor): s.y = s.x, no second load.
template <typename T>
__device__ __forceinline__ StepItems<T> load_step(const T* x, const T* y, int64_t base, int64_t len) {
  StepItems<T> s;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = base + j * kThreads + threadIdx.x;
    s.x[j] = i < len ? x[i] : T(0);
    s.y[j] = i < len && y ? y[i] : s.x[j];
  }
  return s;
}

__device__ __forceinline__ bool in_chunk(int64_t base, int j, int64_t len) {
  return base + j * kThreads + threadIdx.x < len;
}

// The step's scores, with the switch over kinds once per step instead of once
// per element (the kind is a runtime value; instantiating the whole loops per
// kind would multiply this file's instantiations by 7).
template <typename T>
__device__ __forceinline__ void score_step(int64_t kind, const StepItems<T>& s, T (&scores)[kItems]) {
  with_score_kind(kind, [&](auto kc) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) scores[j] = sparse_score<T>(decltype(kc)::value, s.x[j], s.y[j]);
  });
}

// The chunk's x and y (y null when the kind reads no initial tensor).
template <typename T>
struct ChunkData {
  const T* x;
  const T* y;
};

template <typename T>
__device__ __forceinline__ ChunkData<T> chunk_data(const TensorEntry& e, int64_t off) {
  return {static_cast<const T*>(e.x) + off, e.y ? static_cast<const T*>(e.y) + off : nullptr};
}

// (The per-chunk loops live in these templates, not inside LS_SWITCH_DTYPE's
// macro argument, where nvcc ignores #pragma unroll.)
template <typename P, typename T>
__device__ __forceinline__ void histogram_chunk(ChunkData<T> c, int64_t len, int64_t kind, int d, uint64_t prefix,
                                                unsigned int* local) {
  constexpr int bits = static_cast<int>(sizeof(P) * 8);
  for (int64_t base = 0; base < len; base += kStep) {
    const StepItems<T> s = load_step(c.x, c.y, base, len);
    T scores[kItems];
    score_step(kind, s, scores);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (!in_chunk(base, j, len)) break;
      const P v = static_cast<P>(scores[j]);
      const int32_t digit = key_digit(order_key<P>(v), bits, d, prefix);
      if (digit >= 0) atomicAdd(&local[digit], 1u);
    }
  }
}

// state: {prefix, remaining} after pass d - 1 (pick_digit_kernel); pass 0 reads neither.
template <typename P>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(TableRef table, int64_t kind, int d, const int64_t* state, unsigned long long* hist) {
  __shared__ unsigned int local[kDigitBins];
  const uint64_t prefix = d == 0 ? 0 : static_cast<uint64_t>(state[0]);
  for (int b = threadIdx.x; b < kDigitBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const auto [t, e, off, len] = locate_chunk(table, blockIdx.x);
  LS_SWITCH_DTYPE(e.dtype, T, { histogram_chunk<P>(chunk_data<T>(e, off), len, kind, d, prefix, local); });
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

// The radix passes, queued: the returned {prefix, remaining} holds the k-th
// largest key in [0] once they have run (no sync here).
template <typename P>
at::Tensor select_key_on_device(const WorkTable& table, const DeviceTable& dt, int64_t kind, int64_t k,
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
        dt.ref, kind, d, state.data_ptr<int64_t>(), counts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pick_digit_kernel<<<1, kThreads, 0, stream>>>(counts, digit_width(bits, d), d, k, state.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return state;
}

template <typename P>
uint64_t kth_largest_key(const WorkTable& table, const DeviceTable& dt, int64_t kind, int64_t k,
                         c10::Device device) {
  const at::Tensor host = select_key_on_device<P>(table, dt, kind, k, device).cpu();  // the select's one sync
  return static_cast<uint64_t>(host.data_ptr<int64_t>()[0]);
}

at::Tensor kth_largest_score_cuda(at::TensorList model, at::TensorList initial, int64_t kind, int64_t k,
                                  at::ScalarType score_dtype) {
  check_sparse_kind(kind, "kth_largest_score");
  const WorkTable table =
      build_work_table(model, initial, score_kind_uses_initial(kind), chunk_for_bandwidth(model), "kth_largest_score");
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
};

// Tensor t is compared with thresholds[t * stride]: stride 1, a threshold per
// tensor (sparse_extract); stride 0, one for all (sparse_select's k-th largest).
struct Thresholds {
  const double* values;
  int32_t stride;
  __device__ __forceinline__ double of(int32_t t) const { return values[t * stride]; }
};

template <typename T>
__device__ __forceinline__ bool keep(T score, T x, double threshold) {
  return passes_threshold(score, threshold) && is_nonzero(x);
}

template <typename T>
__device__ __forceinline__ uint64_t count_chunk(ChunkData<T> c, int64_t len, int64_t kind, double threshold) {
  uint64_t count = 0;
  for (int64_t base = 0; base < len; base += kStep) {
    const StepItems<T> s = load_step(c.x, c.y, base, len);
    T scores[kItems];
    score_step(kind, s, scores);
#pragma unroll
    for (int j = 0; j < kItems; ++j) count += in_chunk(base, j, len) && keep(scores[j], s.x[j], threshold);
  }
  return count;
}

__global__ void __launch_bounds__(kThreads)
    count_kernel(TableRef table, int64_t kind, Thresholds thresholds, int64_t* counts) {
  const auto [t, e, off, len] = locate_chunk(table, blockIdx.x);
  uint64_t count = 0;
  LS_SWITCH_DTYPE(e.dtype, T, { count = count_chunk(chunk_data<T>(e, off), len, kind, thresholds.of(t)); });
  count = block_sum(count);
  if (threadIdx.x == 0) counts[blockIdx.x] = static_cast<int64_t>(count);
}

// Stream compaction of one chunk, a step (kStep consecutive elements) at a
// time: each warp ballots its kept items, one warp scans the step's 32
// (item, warp) counts in element order, and every kept element is written at
// the rows before this step + its (item, warp)'s offset + the kept lanes below
// it. Ordered (row-major indices, as torch.nonzero), coalesced, the data read
// once. Returns the rows the data filled (possibly more than cap, whose rows
// only are written).
template <typename T>
__device__ __forceinline__ int64_t compact_chunk(ChunkData<T> c, int64_t off, int64_t len, int64_t kind,
                                                 double threshold, const ExtractTarget& target, int64_t cap) {
  __shared__ int offsets[kItems * kWarps];  // per (item j, warp w) at j * kWarps + w: kept before it in the step
  __shared__ int step_total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lanes_below = (1u << lane) - 1u;
  T* values = static_cast<T*>(target.values);
  int64_t written = 0;  // rows of the steps before this one (the same in every thread)
  for (int64_t base = 0; base < len && written < cap; base += kStep) {
    const StepItems<T> s = load_step(c.x, c.y, base, len);
    T scores[kItems];
    score_step(kind, s, scores);
    bool kept[kItems];
    unsigned ballots[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      kept[j] = in_chunk(base, j, len) && keep(scores[j], s.x[j], threshold);
      ballots[j] = __ballot_sync(0xffffffffu, kept[j]);
    }
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < kItems; ++j) offsets[j * kWarps + warp] = __popc(ballots[j]);
    }
    __syncthreads();
    if (warp == 0) {  // exclusive scan of the 32 counts, in element order
      const int mine = offsets[lane];
      int inclusive = mine;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int other = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += other;
      }
      offsets[lane] = inclusive - mine;
      if (lane == 31) step_total = inclusive;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (!kept[j]) continue;
      const int64_t w = written + offsets[j * kWarps + warp] + __popc(ballots[j] & lanes_below);
      if (w >= cap) continue;
      values[w] = s.x[j];
      int64_t flat = off + base + j * kThreads + threadIdx.x;
      int64_t* row = target.indices + w * target.ndim;
      for (int dim = target.ndim - 1; dim > 0; --dim) {
        row[dim] = flat % target.sizes[dim];
        flat /= target.sizes[dim];
      }
      if (target.ndim > 0) row[0] = flat;
    }
    written += step_total;
    __syncthreads();  // every read of offsets and step_total before the next step writes them
  }
  return written;
}

template <typename T>
__device__ __forceinline__ void zero_rows(const ExtractTarget& target, int64_t from, int64_t cap) {
  T* values = static_cast<T*>(target.values);
  for (int64_t w = from + threadIdx.x; w < cap; w += blockDim.x) {
    values[w] = T(0);
    for (int dim = 0; dim < target.ndim; ++dim) target.indices[w * target.ndim + dim] = 0;
  }
}

__global__ void __launch_bounds__(kThreads)
    write_kernel(TableRef table, int64_t kind, Thresholds thresholds, const ExtractTarget* targets,
                 const int64_t* counts) {
  // The output holds exactly counts[c] rows for this chunk (the counting
  // pass). Writes stop there even if the data changed in between (another
  // thread updating the weights in place): the answer may be stale, memory is
  // never corrupted; rows the data no longer fills are zeroed.
  const int64_t cap = counts[blockIdx.x];
  if (cap == 0) return;
  const auto [t, e, off, len] = locate_chunk(table, blockIdx.x);
  const ExtractTarget& target = targets[blockIdx.x];  // read where used (a copy would sit in local memory)
  LS_SWITCH_DTYPE(e.dtype, T, {
    const int64_t written = compact_chunk(chunk_data<T>(e, off), off, len, kind, thresholds.of(t), target, cap);
    zero_rows<T>(target, min(written, cap), cap);
  });
}

void check_dims(at::TensorList model, const char* op) {
  for (size_t t = 0; t < model.size(); ++t)
    TORCH_CHECK_VALUE(model[t].dim() <= kMaxDims, "layersel::", op, ": tensor #", t, " has ", model[t].dim(),
                      " dimensions; the CUDA kernel handles up to ", kMaxDims);
}

// The extraction once the thresholds are on the device (queued before it on
// the current stream): the counting launch, the counts to the host (the one
// sync: they size the outputs), the outputs, the writing launch.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> extract(at::TensorList model, const WorkTable& table,
                                                                     const DeviceTable& dt, int64_t kind,
                                                                     Thresholds thresholds, c10::Device device) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t n = table.entries.size();
  const int64_t chunks = table.total_chunks();
  std::vector<at::Tensor> values(n), indices(n);
  at::Tensor counts = at::empty({chunks}, at::TensorOptions().dtype(at::kLong).device(device));
  if (chunks > 0) {
    count_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
        dt.ref, kind, thresholds, counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The sync: the counts size the outputs (none when every tensor is empty).
  const at::Tensor host_counts = chunks > 0 ? counts.cpu() : at::empty({0}, at::kLong);
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
      running += hc[c];
    }
  }
  if (chunks == 0) return {values, indices};
  at::Tensor host_targets = at::empty({static_cast<int64_t>(targets.size() * sizeof(ExtractTarget))},
                                      at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host_targets.data_ptr(), targets.data(), targets.size() * sizeof(ExtractTarget));
  const at::Tensor device_targets = host_targets.to(device, /*non_blocking=*/true);
  write_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
      dt.ref, kind, thresholds,
      reinterpret_cast<const ExtractTarget*>(device_targets.data_ptr()), counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values, indices};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sparse_extract_cuda(at::TensorList model,
                                                                                 at::TensorList initial,
                                                                                 int64_t kind,
                                                                                 at::ArrayRef<double> thresholds) {
  check_sparse_kind(kind, "sparse_extract");
  check_threshold_count(thresholds.size(), model.size());
  const WorkTable table =
      build_work_table(model, initial, score_kind_uses_initial(kind), chunk_for_bandwidth(model), "sparse_extract");
  check_dims(model, "sparse_extract");
  const c10::Device device = cuda_device_of(model, "sparse_extract");
  const c10::cuda::CUDAGuard guard(device);
  const DeviceTable dt = upload_table(table, device);
  // Pinned host memory and an async copy: from pageable memory the copy would wait for the stream.
  const int64_t n = static_cast<int64_t>(model.size());
  at::Tensor thr = at::empty({n}, at::TensorOptions().dtype(at::kDouble).pinned_memory(true));
  std::memcpy(thr.data_ptr<double>(), thresholds.data(), n * sizeof(double));
  thr = thr.to(device, /*non_blocking=*/true);
  return extract(model, table, dt, kind, Thresholds{thr.data_ptr<double>(), 1}, device);
}

// The k-th largest key (pick_digit_kernel's state[0]) as the double every
// tensor is compared with, as sparse_select_cpu's key_value.
template <typename P>
__global__ void key_threshold_kernel(const int64_t* state, double* threshold) {
  *threshold = key_value<P>(static_cast<uint64_t>(state[0]));
}

// sparse_extract with every threshold the k-th largest score in score_dtype
// (the dtype rules of check_sparse_select_dtypes), the key never leaving the
// device: one sync (the counts) instead of kth_largest_score's and
// sparse_extract's two.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sparse_select_cuda(at::TensorList model,
                                                                                at::TensorList initial, int64_t kind,
                                                                                int64_t k, at::ScalarType score_dtype) {
  check_sparse_kind(kind, "sparse_select");
  const WorkTable table =
      build_work_table(model, initial, score_kind_uses_initial(kind), chunk_for_bandwidth(model), "sparse_select");
  check_rank(k, table.total_numel);
  check_sparse_select_dtypes(model, score_dtype);
  check_dims(model, "sparse_select");
  const c10::Device device = cuda_device_of(model, "sparse_select");
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DeviceTable dt = upload_table(table, device);
  at::Tensor threshold = at::empty({1}, at::TensorOptions().dtype(at::kDouble).device(device));
  LS_SWITCH_FLOAT_DTYPE(code_of_scalar_type(score_dtype), P, {
    const at::Tensor state = select_key_on_device<P>(table, dt, kind, k, device);
    key_threshold_kernel<P><<<1, 1, 0, stream>>>(state.data_ptr<int64_t>(), threshold.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return extract(model, table, dt, kind, Thresholds{threshold.data_ptr<double>(), 0}, device);
}

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CUDA, m) {
  m.impl("kth_largest_score", &layersel::kth_largest_score_cuda);
  m.impl("sparse_extract", &layersel::sparse_extract_cuda);
  m.impl("sparse_select", &layersel::sparse_select_cuda);
}
