// CUDA: one of fl4health's six score formulas over every tensor in one launch
// (a block per chunk), into one output buffer per dtype.
#include <torch/library.h>

#include "../common/grouped_outputs.h"
#include "../common/op_checks.h"
#include "../common/scores.h"
#include "cuda_utils.cuh"

namespace layersel {
namespace {

// 16-byte loads where the inputs allow (model tensors are their own
// allocations: they do), 16-byte stores where the output slice allows too. A
// slice that follows, in its dtype's buffer, a tensor whose bytes are not a
// multiple of 16 is misaligned: it keeps the vector loads (two thirds of the
// traffic) and stores element by element.
template <int64_t Kind, typename T>
__device__ void score_chunk(const T* x, const T* y, T* out, int64_t n) {
  using V = Vec16<T>;
  int64_t done = 0;
  if (aligned16(x) && aligned16(y)) {
    const int64_t nv = n / V::kCount;
    const bool vector_out = aligned16(out);
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      const V a = reinterpret_cast<const V*>(x)[i];
      const V b = reinterpret_cast<const V*>(y)[i];
      V r;
#pragma unroll
      for (int k = 0; k < V::kCount; ++k) r.v[k] = score_value<T>(Kind, a.v[k], b.v[k]);
      if (vector_out) {
        reinterpret_cast<V*>(out)[i] = r;
      } else {
#pragma unroll
        for (int k = 0; k < V::kCount; ++k) out[i * V::kCount + k] = r.v[k];
      }
    }
    done = nv * V::kCount;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) out[i] = score_value<T>(Kind, x[i], y[i]);
}

__global__ void __launch_bounds__(kThreads)
    scores_kernel(TableRef table, int64_t kind) {
  const int64_t c = blockIdx.x;
  const auto [t, e, off, len] = locate_chunk(table, c);
  LS_SWITCH_DTYPE(e.dtype, T, {
    const T* x = static_cast<const T*>(e.x) + off;
    const T* y = score_kind_uses_initial(kind) ? static_cast<const T*>(e.y) + off : x;
    // The kind's switch once per chunk: each loop instantiated per kind, no per-element branch.
    with_score_kind(kind, [&](auto kc) {
      score_chunk<decltype(kc)::value, T>(x, y, static_cast<T*>(e.out) + off, len);
    });
  });
}

std::vector<at::Tensor> scores_cuda(at::TensorList model, at::TensorList initial, int64_t kind) {
  check_formula_kind(kind);
  WorkTable table =
      build_work_table(model, initial, score_kind_uses_initial(kind), chunk_for_bandwidth(model), "scores");
  const c10::Device device = cuda_device_of(model, "scores");
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> buffers = allocate_grouped_outputs(table, [&](int64_t n, at::ScalarType dtype) {
    return at::empty({n}, at::TensorOptions().dtype(dtype).device(device));
  });
  const int64_t chunks = table.total_chunks();
  if (chunks == 0) return buffers;
  DeviceTable dt = upload_table(table, device);
  scores_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      dt.ref, kind);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return buffers;
}

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CUDA, m) { m.impl("scores", &layersel::scores_cuda); }
