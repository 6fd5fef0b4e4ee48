// CUDA: Bernoulli(sigmoid(score)) masks of every score tensor in one launch.
// Element g of the concatenation uses word g % 4 of Philox block g / 4, the
// same stream and comparison as the CPU kernel (csrc/common/), so a seed gives
// the same masks on both.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common/bernoulli.h"
#include "../common/philox.h"
#include "cuda_utils.cuh"

namespace layersel {
namespace {

template <typename M>
__global__ void __launch_bounds__(kThreads) sample_masks_kernel(const TensorEntry* entries,
                                                                const int64_t* first_chunk, int32_t n,
                                                                uint64_t seed, M* out) {
  const int64_t c = blockIdx.x;
  const auto [t, e, off, len] = locate_chunk(entries, first_chunk, n, c);
  const uint64_t g0 = static_cast<uint64_t>(e.base + off);
  const uint64_t g1 = g0 + static_cast<uint64_t>(len);  // exclusive
  const PhiloxStream stream(seed);
  // Each thread takes whole Philox blocks; edge blocks are shared with the
  // neighbouring chunk or tensor, each writing only its own elements.
  for (uint64_t b = (g0 >> 2) + threadIdx.x; b <= ((g1 - 1) >> 2); b += blockDim.x) {
    const Philox4x32Out r = stream.block(b);
    LS_SWITCH_FLOAT_DTYPE(e.dtype, T, {
      const T* x = static_cast<const T*>(e.x);
#pragma unroll
      for (int lane = 0; lane < 4; ++lane) {
        const uint64_t g = 4 * b + lane;
        if (g >= g0 && g < g1) {
          const int64_t i = static_cast<int64_t>(g) - e.base;
          out[g] = static_cast<M>(bernoulli_sample(static_cast<float>(x[i]), r.v[lane]));
        }
      }
    });
  }
}

at::Tensor sample_masks_cuda(at::TensorList scores, int64_t seed, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype != at::kBool, "layersel::sample_masks: bool masks are refused (the server sums masks)");
  WorkTable table = build_work_table(scores, {}, /*needs_y=*/false, kCudaChunk, "sample_masks");
  for (size_t i = 0; i < table.entries.size(); ++i)
    TORCH_CHECK_TYPE(is_floating_code(table.entries[i].dtype), "layersel::sample_masks: score tensor #", i,
                     " has dtype ", scores[i].scalar_type(), "; scores must be floating point");
  const c10::Device device = scores[0].device();
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({table.total_numel}, at::TensorOptions().dtype(dtype).device(device));
  const int64_t chunks = table.total_chunks();
  if (chunks == 0) return out;
  DeviceTable dt = upload_table(table, device);
  AT_DISPATCH_INTEGRAL_TYPES(dtype, "sample_masks_cuda", [&] {
    sample_masks_kernel<scalar_t><<<static_cast<unsigned>(chunks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dt.entries, dt.first_chunk, dt.n, static_cast<uint64_t>(seed), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CUDA, m) { m.impl("sample_masks", &layersel::sample_masks_cuda); }
