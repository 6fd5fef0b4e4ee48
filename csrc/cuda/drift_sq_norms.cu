// CUDA: per-tensor sums of drift_square(model, initial) (float32 squares, summed
// in double). One launch covers every
// tensor (a block per chunk, any dtype); a second tiny launch adds each
// tensor's chunk partials in chunk order. No float atomics: same bits always.
#include <torch/library.h>

#include "../common/scores.h"
#include "cuda_utils.cuh"

namespace layersel {
namespace {

// The per-element definition is drift_square() (csrc/common/scores.h), as on
// the CPU: each square in float32, summed in double. Which thread adds which
// element depends only on the element's index in the chunk (16-byte vectors by
// index, loaded as vectors when the chunk is aligned and element by element
// when not), so an aligned tensor and a misaligned view of the same data give
// the same bits.
// How a chunk's elements are loaded and squared: as themselves, except int8,
// loaded as its uint8 bits and squared by drift_square_i8_bits (scores.h: nvcc
// 13.0 miscompiles the signed conversion of int8 lanes of a vector register).
template <typename T>
struct DriftElem {
  using Bits = T;
  static __device__ __forceinline__ double sq(T a, T b) { return drift_square(a, b); }
};
template <>
struct DriftElem<int8_t> {
  using Bits = uint8_t;
  static __device__ __forceinline__ double sq(uint8_t a, uint8_t b) { return drift_square_i8_bits(a, b); }
};

template <typename T>
__device__ double chunk_sq_sum(const T* a_in, const T* b_in, int64_t n) {
  using E = DriftElem<T>;
  using B = typename E::Bits;
  using V = Vec16<B>;
  constexpr int K = V::kCount;
  const B* a = reinterpret_cast<const B*>(a_in);
  const B* b = reinterpret_cast<const B*>(b_in);
  const bool vector_loads = aligned16(a) && aligned16(b);
  const int64_t nv = n / K;
  double acc = 0.0;
  for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
    V x, y;
    if (vector_loads) {
      x = reinterpret_cast<const V*>(a)[v];
      y = reinterpret_cast<const V*>(b)[v];
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        x.v[k] = a[v * K + k];
        y.v[k] = b[v * K + k];
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) acc += E::sq(x.v[k], y.v[k]);
  }
  for (int64_t i = nv * K + threadIdx.x; i < n; i += blockDim.x) acc += E::sq(a[i], b[i]);
  return acc;
}

__global__ void __launch_bounds__(kThreads)
    drift_chunks_kernel(TableRef table, double* partial) {
  const int64_t c = blockIdx.x;
  const auto [t, e, off, len] = locate_chunk(table, c);
  double s = 0.0;
  LS_SWITCH_DTYPE(e.dtype, T, {
    const T* a = static_cast<const T*>(e.x) + off;
    const T* b = static_cast<const T*>(e.y) + off;
    s = e.numel == 1 ? (threadIdx.x == 0 ? drift_square_single(a[0], b[0]) : 0.0) : chunk_sq_sum(a, b, len);
  });
  s = block_sum(s);
  if (threadIdx.x == 0) partial[c] = s;
}

__global__ void finalize_kernel(TableRef table, const double* partial, double* out) {
  const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= table.n) return;
  double s = 0.0;
  for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) s += partial[c];
  out[t] = s;
}

at::Tensor drift_sq_norms_cuda(at::TensorList model, at::TensorList initial) {
  WorkTable table = build_work_table(model, initial, /*needs_y=*/true, kCudaChunk, "drift_sq_norms");
  const int64_t n = static_cast<int64_t>(table.entries.size());
  const c10::Device device = cuda_device_of(model, "drift_sq_norms");
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kDouble).device(device));
  const int64_t chunks = table.total_chunks();
  if (chunks == 0) return out.zero_();
  DeviceTable dt = upload_table(table, device);
  at::Tensor partial = at::empty({chunks}, out.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  drift_chunks_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(dt.ref, partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      dt.ref, partial.data_ptr<double>(), out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CUDA, m) { m.impl("drift_sq_norms", &layersel::drift_sq_norms_cuda); }
