// CPU: Bernoulli(sigmoid(score)) masks for all score tensors in one parallel
// region, from the Philox stream shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/bernoulli.h"
#include "../common/philox.h"
#include "cpu_kernel_utils.h"

namespace layersel {
namespace {

constexpr int kBatchBlocks = 16;  // 64 elements per batch of Philox blocks

// Elements [g, g + n) of the global stream; g is the global index of x[0].
// Edges (up to the next multiple of 64 in the global index, and the tail) go
// element by element; the middle in batches whose Philox rounds and Bernoulli
// comparisons vectorise.
template <typename T, typename M>
LS_CPU_CLONES void sample_chunk(PhiloxStream stream, uint64_t g, const T* x, M* out, int64_t n) {
  constexpr int64_t kBatch = 4 * kBatchBlocks;
  int64_t i = 0;
  auto one = [&](int64_t k) {
    const uint64_t gk = g + static_cast<uint64_t>(k);
    const Philox4x32Out r = stream.block(gk >> 2);
    out[k] = static_cast<M>(bernoulli_sample(static_cast<float>(x[k]), r.v[gk & 3u]));
  };
  for (; i < n && ((g + i) % kBatch) != 0; ++i) one(i);
  uint32_t words[kBatch];
  for (; i + kBatch <= n; i += kBatch) {
    philox_blocks<kBatchBlocks>(stream, (g + i) >> 2, words);
    for (int k = 0; k < kBatch; ++k)
      out[i + k] = static_cast<M>(bernoulli_sample(static_cast<float>(x[i + k]), words[k]));
  }
  for (; i < n; ++i) one(i);
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
