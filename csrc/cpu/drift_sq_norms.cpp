// CPU: per-tensor sums of float(model - initial)^2 in one parallel region.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/scores.h"
#include "cpu_kernel_utils.h"

namespace layersel {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kBlock = 1024;  // 64 terms per float lane, then into double

// 16/32-bit floats: float lanes over short blocks (vectorises 8 wide), block
// sums in double; 1e9 terms lose nothing visible.
template <typename T>
inline double sq_sum_float_lanes(const T* a, const T* b, int64_t n) {
  double total = 0.0;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    float acc[kLanes] = {};
    for (int64_t j = 0; j < kBlock; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float d = drift_term(a[i + j + l], b[i + j + l]);
        acc[l] += d * d;
      }
    double block = 0.0;
    for (int l = 0; l < kLanes; ++l) block += acc[l];
    total += block;
  }
  double tail = 0.0;
  for (; i < n; ++i) {
    const double d = drift_term(a[i], b[i]);
    tail += d * d;
  }
  return total + tail;
}

// float64 and integers: float32 differences, squared and summed in double.
template <typename T>
inline double sq_sum_double_lanes(const T* a, const T* b, int64_t n) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const double d = drift_term(a[i + l], b[i + l]);
      acc[l] += d * d;
    }
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  for (; i < n; ++i) {
    const double d = drift_term(a[i], b[i]);
    total += d * d;
  }
  return total;
}

LS_CPU_CLONES double sq_sum_f32(const float* a, const float* b, int64_t n) { return sq_sum_float_lanes(a, b, n); }
LS_CPU_CLONES double sq_sum_f16(const c10::Half* a, const c10::Half* b, int64_t n) {
  return sq_sum_float_lanes(a, b, n);
}
LS_CPU_CLONES double sq_sum_bf16(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n) {
  return sq_sum_float_lanes(a, b, n);
}
LS_CPU_CLONES double sq_sum_f64(const double* a, const double* b, int64_t n) { return sq_sum_double_lanes(a, b, n); }

template <typename T>
double sq_sum(const T* a, const T* b, int64_t n) {
  return sq_sum_double_lanes(a, b, n);
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
      partial[c] = sq_sum(static_cast<const T*>(e.x) + off, static_cast<const T*>(e.y) + off, len);
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
