// CPU: one of fl4health's six score formulas over all tensors, one parallel
// region, written into one buffer per dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/grouped_outputs.h"
#include "../common/scores.h"
#include "cpu_kernel_utils.h"

namespace layersel {
namespace {

template <typename T, int64_t Kind>
inline void score_loop(const T* x, const T* y, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = score_value<T>(Kind, x[i], score_kind_uses_initial(Kind) ? y[i] : x[i]);
}

template <typename T>
LS_CPU_CLONES void score_chunk(int64_t kind, const T* x, const T* y, T* out, int64_t n) {
  // The kind is a template argument so that each loop is branch-free.
  switch (kind) {
    case 0: score_loop<T, 0>(x, y, out, n); break;
    case 1: score_loop<T, 1>(x, y, out, n); break;
    case 2: score_loop<T, 2>(x, y, out, n); break;
    case 3: score_loop<T, 3>(x, y, out, n); break;
    case 4: score_loop<T, 4>(x, y, out, n); break;
    default: score_loop<T, 5>(x, y, out, n); break;
  }
}

std::vector<at::Tensor> scores_cpu(at::TensorList model, at::TensorList initial, int64_t kind) {
  TORCH_CHECK_VALUE(kind >= 0 && kind < kNumScoreKinds, "layersel::scores: kind must be in [0, ",
                    kNumScoreKinds, "), got ", kind);
  const bool needs_y = score_kind_uses_initial(kind);
  WorkTable table = build_work_table(model, initial, needs_y, kCpuChunk, "scores");
  std::vector<at::Tensor> buffers = allocate_grouped_outputs(table, empty_cpu_output);
  for_each_chunk(table, kCpuChunk, [&](const TensorEntry& e, int32_t, int64_t, int64_t off, int64_t len) {
    LS_SWITCH_DTYPE(e.dtype, T, {
      const T* x = static_cast<const T*>(e.x) + off;
      const T* y = needs_y ? static_cast<const T*>(e.y) + off : x;
      score_chunk<T>(kind, x, y, static_cast<T*>(e.out) + off, len);
    });
  });
  return buffers;
}

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CPU, m) { m.impl("scores", &layersel::scores_cpu); }
