// CPU: Bernoulli(sigmoid(score)) masks for all score tensors in one parallel
// region, from the Philox stream shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/bernoulli.h"
#include "../common/philox.h"
#include "cpu_kernel_utils.h"

namespace layersel {
namespace {

// Elements [g, g + n) of the global stream; g is the global index of x[0].
template <typename T, typename M>
LS_CPU_CLONES void sample_chunk(PhiloxStream stream, uint64_t g, const T* x, M* out, int64_t n) {
  int64_t i = 0;
  // Head up to a multiple of 4 in the global index.
  if (g & 3u) {
    const Philox4x32Out r = stream.block(g >> 2);
    for (uint32_t lane = g & 3u; lane < 4 && i < n; ++lane, ++i)
      out[i] = static_cast<M>(bernoulli_sample(static_cast<float>(x[i]), r.v[lane]));
  }
  // Whole Philox blocks: four elements per call.
  const uint64_t first_block = (g + i) >> 2;
  const int64_t whole = (n - i) / 4;
  for (int64_t b = 0; b < whole; ++b) {
    const Philox4x32Out r = stream.block(first_block + b);
    const int64_t j = i + 4 * b;
    for (int lane = 0; lane < 4; ++lane)
      out[j + lane] = static_cast<M>(bernoulli_sample(static_cast<float>(x[j + lane]), r.v[lane]));
  }
  i += 4 * whole;
  if (i < n) {
    const Philox4x32Out r = stream.block((g + i) >> 2);
    for (int lane = 0; i < n; ++lane, ++i)
      out[i] = static_cast<M>(bernoulli_sample(static_cast<float>(x[i]), r.v[lane]));
  }
}

at::Tensor sample_masks_cpu(at::TensorList scores, int64_t seed, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype != at::kBool, "layersel::sample_masks: bool masks are refused (the server sums masks)");
  WorkTable table = build_work_table(scores, {}, /*needs_y=*/false, kCpuChunk, "sample_masks");
  for (size_t i = 0; i < table.entries.size(); ++i)
    TORCH_CHECK_TYPE(is_floating_code(table.entries[i].dtype), "layersel::sample_masks: score tensor #", i,
                     " has dtype ", scores[i].scalar_type(), "; scores must be floating point");
  at::Tensor out = at::empty({table.total_numel}, at::TensorOptions().dtype(dtype));
  const PhiloxStream stream(static_cast<uint64_t>(seed));
  AT_DISPATCH_INTEGRAL_TYPES(dtype, "sample_masks_cpu", [&] {
    using M = scalar_t;
    M* o = out.data_ptr<M>();
    for_each_chunk(table, kCpuChunk, [&](const TensorEntry& e, int32_t, int64_t, int64_t off, int64_t len) {
      LS_SWITCH_FLOAT_DTYPE(e.dtype, T, {
        sample_chunk<T, M>(stream, static_cast<uint64_t>(e.base + off), static_cast<const T*>(e.x) + off,
                           o + e.base + off, len);
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CPU, m) { m.impl("sample_masks", &layersel::sample_masks_cpu); }
