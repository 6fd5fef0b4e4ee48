// CPU: one of fl4health's six score formulas over all tensors, one parallel
// region, written into one buffer per dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/grouped_outputs.h"
#include "../common/op_checks.h"
#include "../common/scores.h"
#include "cpu_kernel_utils.h"

namespace layersel {
namespace {

// One kind's loop, branch-free, compiled per ISA (the kind's switch is outside,
// in with_score_kind).
template <typename T, int64_t Kind>
LS_CPU_CLONES void score_loop(const T* x, const T* y, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = score_value<T>(Kind, x[i], score_kind_uses_initial(Kind) ? y[i] : x[i]);
}

std::vector<at::Tensor> scores_cpu(at::TensorList model, at::TensorList initial, int64_t kind) {
  check_formula_kind(kind);
  const bool needs_y = score_kind_uses_initial(kind);
  WorkTable table = build_work_table(model, initial, needs_y, kCpuChunk, "scores");
  std::vector<at::Tensor> buffers = allocate_grouped_outputs(table, empty_cpu_output);
  for_each_chunk(table, kCpuChunk, [&](const TensorEntry& e, int32_t, int64_t, int64_t off, int64_t len) {
    LS_SWITCH_DTYPE(e.dtype, T, {
      const T* x = static_cast<const T*>(e.x) + off;
      const T* y = needs_y ? static_cast<const T*>(e.y) + off : x;
      T* out = static_cast<T*>(e.out) + off;
      with_score_kind(kind, [&](auto k) {
        if constexpr (decltype(k)::value != kGivenScore) score_loop<T, decltype(k)::value>(x, y, out, len);
      });
    });
  });
  return buffers;
}

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CPU, m) { m.impl("scores", &layersel::scores_cpu); }
