// Shared launch plumbing for the CUDA kernels: upload of the work table (one
// pinned host buffer, one async copy on the current stream) and reductions.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include <cstring>

#include "../common/work_table.h"

namespace layersel {

constexpr int kThreads = 256;

// What a kernel needs of the work table, passed by value.
struct TableRef {
  const TensorEntry* entries = nullptr;
  const int64_t* first_chunk = nullptr;
  int32_t n = 0;
  int64_t chunk = kCudaChunk;  // elements per chunk (the table's split)
};

struct DeviceTable {
  TableRef ref;
  at::Tensor storage;  // keeps the device copy alive until the kernels are queued
};

// Copies entries and first_chunk to `device` with one H2D copy from pinned
// memory on the current stream (the caching host allocator keeps the pinned
// block until that copy has run).
inline DeviceTable upload_table(const WorkTable& table, c10::Device device) {
  const size_t entry_bytes = table.entries.size() * sizeof(TensorEntry);
  const size_t chunk_bytes = table.first_chunk.size() * sizeof(int64_t);
  at::Tensor host = at::empty({static_cast<int64_t>(entry_bytes + chunk_bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* p = static_cast<uint8_t*>(host.data_ptr());
  std::memcpy(p, table.entries.data(), entry_bytes);
  std::memcpy(p + entry_bytes, table.first_chunk.data(), chunk_bytes);
  DeviceTable out;
  out.storage = host.to(device, /*non_blocking=*/true);
  auto* d = static_cast<const uint8_t*>(out.storage.data_ptr());
  out.ref.entries = reinterpret_cast<const TensorEntry*>(d);
  out.ref.first_chunk = reinterpret_cast<const int64_t*>(d + entry_bytes);
  out.ref.n = static_cast<int32_t>(table.entries.size());
  out.ref.chunk = table.chunk;
  return out;
}

// The CUDA device of a non-empty list whose tensors build_work_table found on
// one device; a clear error (not CUDAGuard's internal assert) for an empty
// list or a list on another device (a CPU model beside CUDA initial tensors
// reaches the CUDA kernel through the dispatcher).
inline c10::Device cuda_device_of(at::TensorList tensors, const char* op) {
  TORCH_CHECK_VALUE(!tensors.empty(), "layersel::", op, ": got an empty list of model tensors");
  const c10::Device device = tensors[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "layersel::", op, ": tensor #0 is on ", device,
                    " but other arguments are on a CUDA device (one device per call)");
  return device;
}

// The (tensor, chunk) a block owns: its tensor's index and entry, and the
// chunk's offset and length in that tensor.
struct ChunkRef {
  int32_t t;
  TensorEntry e;
  int64_t off;
  int64_t len;
};

__device__ __forceinline__ ChunkRef locate_chunk(const TableRef& table, int64_t c) {
  const int32_t t = tensor_of_chunk(table.first_chunk, table.n, c);
  const TensorEntry e = table.entries[t];
  const int64_t off = (c - table.first_chunk[t]) * table.chunk;
  return ChunkRef{t, e, off, min(table.chunk, e.numel - off)};
}

// Elements per chunk for the launches of one block per chunk whose results do
// not depend on the split (scores: element-wise; masks: Philox by global
// index; fingerprints and the sparse counts: exact integer sums; the sparse
// compaction: in order): kCudaChunk on a large model; on a smaller one,
// smaller chunks (down to 4,096 elements) so that the grid has at least 4
// blocks per SM. Little's law: the bytes in flight must cover bandwidth x
// latency (~2-3 MB on an H100/H200), and a block keeps about 8 KB in flight
// (256 threads, 32 bytes each); a 5M-parameter model in 65,536-element chunks
// is 77 blocks, ~0.6 MB. (The drift norms keep kCudaChunk: their float64
// partials are summed per chunk, so the split would change the bits.)
inline int64_t chunk_for_bandwidth(at::TensorList model) {
  if (model.empty() || !model[0].is_cuda()) return kCudaChunk;  // the table's checks report it
  int64_t total = 0;
  for (const at::Tensor& t : model) total += t.numel();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, model[0].get_device()));
  int64_t chunk = kCudaChunk;
  while (chunk > 4096 && total / chunk < 4 * static_cast<int64_t>(sms)) chunk /= 2;
  return chunk;
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block in a fixed tree order; the result is valid in thread 0.
// (double: the same bits on every run; uint64_t: exact, mod 2^64.)
template <typename V>
__device__ __forceinline__ V block_sum(V v) {
  __shared__ V warp_partials[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_partials[threadIdx.x] : V(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

// 16-byte vector load of 16 / sizeof(T) elements.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kCount = 16 / sizeof(T);
  T v[kCount];
};

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace layersel
