// CPU: per-tensor sums of drift_square(model, initial) (float32 squares, summed
// in double) in one parallel region.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/scores.h"
#include "cpu_kernel_utils.h"

namespace layersel {
namespace {

constexpr int kLanes = 16;

// drift_square() (csrc/common/scores.h) summed over a chunk: element i goes to
// double lane i % 16 (by index, whatever the alignment), the lanes are added in
// a fixed order at the end. Vectorises: float32 squares, widened, added in
// double lanes.
template <typename T>
inline double sq_sum_lanes(const T* a, const T* b, int64_t n) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += drift_square(a[i + l], b[i + l]);
  for (int l = 0; i < n; ++i, ++l) acc[l] += drift_square(a[i], b[i]);
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

LS_CPU_CLONES double sq_sum_f32(const float* a, const float* b, int64_t n) { return sq_sum_lanes(a, b, n); }
LS_CPU_CLONES double sq_sum_f16(const c10::Half* a, const c10::Half* b, int64_t n) { return sq_sum_lanes(a, b, n); }
LS_CPU_CLONES double sq_sum_bf16(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n) {
  return sq_sum_lanes(a, b, n);
}
LS_CPU_CLONES double sq_sum_f64(const double* a, const double* b, int64_t n) { return sq_sum_lanes(a, b, n); }

template <typename T>
double sq_sum(const T* a, const T* b, int64_t n) {
  return sq_sum_lanes(a, b, n);
}
template <>
double sq_sum<float>(const float* a, const float* b, int64_t n) { return sq_sum_f32(a, b, n); }
template <>
double sq_sum<c10::Half>(const c10::Half* a, const c10::Half* b, int64_t n) { return sq_sum_f16(a, b, n); }
template <>
double sq_sum<c10::BFloat16>(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n) {
  return sq_sum_bf16(a, b, n);
}
template <>
double sq_sum<double>(const double* a, const double* b, int64_t n) { return sq_sum_f64(a, b, n); }

at::Tensor drift_sq_norms_cpu(at::TensorList model, at::TensorList initial) {
  WorkTable table = build_work_table(model, initial, /*needs_y=*/true, kCpuChunk, "drift_sq_norms");
  const int64_t n = static_cast<int64_t>(table.entries.size());
  std::vector<double> partial(static_cast<size_t>(table.total_chunks()));
  for_each_chunk(table, kCpuChunk, [&](const TensorEntry& e, int32_t, int64_t c, int64_t off, int64_t len) {
    LS_SWITCH_DTYPE(e.dtype, T, {
      const T* a = static_cast<const T*>(e.x) + off;
      const T* b = static_cast<const T*>(e.y) + off;
      partial[c] = e.numel == 1 ? drift_square_single(a[0], b[0]) : sq_sum(a, b, len);
    });
  });
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t t = 0; t < n; ++t) {  // fixed order: same bits for any thread count
    double s = 0.0;
    for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) s += partial[c];
    o[t] = s;
  }
  return out;
}

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CPU, m) { m.impl("drift_sq_norms", &layersel::drift_sq_norms_cpu); }
