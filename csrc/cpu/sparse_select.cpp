// CPU: fl4health's sparse COO selection without a sort. The k-th largest score
// comes from a radix select (per-thread 2048-bin histograms, one pass per
// 11-bit digit), the scores computed on the fly from the model tensors; the
// extraction counts the kept elements per chunk, then writes values and
// row-major indices at each chunk's offset (the order torch.nonzero gives).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../common/radix.h"
#include "cpu_kernel_utils.h"

namespace layersel {
namespace {

template <typename P>
constexpr int key_bits() {
  return static_cast<int>(sizeof(P) * 8);
}

// Calls fn(std::integral_constant<int64_t, kind>) so that the score formula is
// a compile-time constant in the hot loops.
template <typename Fn>
void with_kind(int64_t kind, Fn fn) {
  switch (kind) {
    case 0: fn(std::integral_constant<int64_t, 0>()); break;
    case 1: fn(std::integral_constant<int64_t, 1>()); break;
    case 2: fn(std::integral_constant<int64_t, 2>()); break;
    case 3: fn(std::integral_constant<int64_t, 3>()); break;
    case 4: fn(std::integral_constant<int64_t, 4>()); break;
    case 5: fn(std::integral_constant<int64_t, 5>()); break;
    default: fn(std::integral_constant<int64_t, kGivenScore>()); break;
  }
}

// Four interleaved sub-histograms: neighbouring scores often share a digit, and
// a single histogram would serialise on that one counter.
template <int64_t Kind, typename T, typename P>
void histogram_chunk(const T* x, const T* y, int64_t n, int d, uint64_t prefix, int64_t* hist) {
  static_assert(kCpuChunk <= (int64_t{1} << 32), "uint32 sub-histogram counts");
  uint32_t sub[4][kDigitBins] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int j = 0; j < 4; ++j) {
      const P v = static_cast<P>(sparse_score<T>(Kind, x[i + j], y[i + j]));
      const int32_t digit = key_digit(order_key<P>(v), key_bits<P>(), d, prefix);
      if (digit >= 0) ++sub[j][digit];
    }
  }
  for (; i < n; ++i) {
    const P v = static_cast<P>(sparse_score<T>(Kind, x[i], y[i]));
    const int32_t digit = key_digit(order_key<P>(v), key_bits<P>(), d, prefix);
    if (digit >= 0) ++sub[0][digit];
  }
  for (int b = 0; b < kDigitBins; ++b) hist[b] += int64_t{sub[0][b]} + sub[1][b] + sub[2][b] + sub[3][b];
}

template <typename P>
uint64_t kth_largest_key(const WorkTable& table, int64_t kind, int64_t k) {
  const int bits = key_bits<P>();
  const int threads = at::get_num_threads();
  std::vector<int64_t> hist(static_cast<size_t>(threads) * kDigitBins);
  uint64_t prefix = 0;
  int64_t remaining = k;
  for (int d = 0; d < num_digits(bits); ++d) {
    std::fill(hist.begin(), hist.end(), 0);
    for_each_chunk(table, kCpuChunk, [&](const TensorEntry& e, int32_t, int64_t, int64_t off, int64_t len) {
      int64_t* h = hist.data() + static_cast<size_t>(at::get_thread_num()) * kDigitBins;
      LS_SWITCH_DTYPE(e.dtype, T, {
        const T* x = static_cast<const T*>(e.x) + off;
        const T* y = e.y ? static_cast<const T*>(e.y) + off : x;
        with_kind(kind, [&](auto k) { histogram_chunk<decltype(k)::value, T, P>(x, y, len, d, prefix, h); });
      });
    });
    const int width = digit_width(bits, d);
    int chosen = 0;
    for (int b = (1 << width) - 1; b >= 0; --b) {  // from the largest digit down
      int64_t count = 0;
      for (int t = 0; t < threads; ++t) count += hist[static_cast<size_t>(t) * kDigitBins + b];
      if (remaining <= count) {
        chosen = b;
        break;
      }
      remaining -= count;
    }
    prefix = (prefix << width) | static_cast<uint64_t>(chosen);
  }
  return prefix;
}

template <typename P>
at::Tensor key_to_value(uint64_t key, at::ScalarType dtype) {
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(dtype));
  using U = typename std::conditional<sizeof(P) == 8, uint64_t,
                                      typename std::conditional<sizeof(P) == 4, uint32_t,
                                      typename std::conditional<sizeof(P) == 2, uint16_t, uint8_t>::type>::type>::type;
  constexpr U kSign = U(1) << (sizeof(P) * 8 - 1);
  U u = static_cast<U>(key);
  if constexpr (std::is_integral<P>::value) {
    u ^= kSign;
  } else {
    u = (u & kSign) ? static_cast<U>(u ^ kSign) : static_cast<U>(~u);
  }
  std::memcpy(out.data_ptr(), &u, sizeof(U));
  return out;
}

at::Tensor kth_largest_score_cpu(at::TensorList model, at::TensorList initial, int64_t kind, int64_t k,
                                 at::ScalarType score_dtype) {
  TORCH_CHECK_VALUE(kind >= 0 && kind <= kGivenScore, "layersel::kth_largest_score: kind must be in [0, 6], got ",
                    kind);
  const WorkTable table =
      build_work_table(model, initial, kind >= 2, kCpuChunk, "kth_largest_score");
  TORCH_CHECK_VALUE(k >= 1 && k <= table.total_numel, "layersel::kth_largest_score: k must be in [1, ",
                    table.total_numel, "], got ", k);
  switch (score_dtype) {
    case at::kFloat: return key_to_value<float>(kth_largest_key<float>(table, kind, k), score_dtype);
    case at::kDouble: return key_to_value<double>(kth_largest_key<double>(table, kind, k), score_dtype);
    case at::kHalf: return key_to_value<c10::Half>(kth_largest_key<c10::Half>(table, kind, k), score_dtype);
    case at::kBFloat16:
      return key_to_value<c10::BFloat16>(kth_largest_key<c10::BFloat16>(table, kind, k), score_dtype);
    case at::kLong: return key_to_value<int64_t>(kth_largest_key<int64_t>(table, kind, k), score_dtype);
    default:
      TORCH_CHECK_TYPE(false, "layersel::kth_largest_score: score dtype ", score_dtype,
                       " is not supported (float32, float64, float16, bfloat16, int64)");
  }
}

template <int64_t Kind, typename T>
int64_t count_chunk(const T* x, const T* y, int64_t n, double threshold) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i)
    count += passes_threshold(sparse_score<T>(Kind, x[i], y[i]), threshold) && is_nonzero(x[i]);
  return count;
}

template <int64_t kind, typename T>
void write_chunk(const T* x, const T* y, int64_t off, int64_t n, double threshold, T* values,
                 int64_t* indices, const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  const size_t ndim = sizes.size();
  int64_t w = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!(passes_threshold(sparse_score<T>(kind, x[i], y[i]), threshold) && is_nonzero(x[i]))) continue;
    values[w] = x[i];
    const int64_t flat = off + i;
    for (size_t dim = 0; dim < ndim; ++dim) indices[w * ndim + dim] = (flat / strides[dim]) % sizes[dim];
    ++w;
  }
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sparse_extract_cpu(at::TensorList model,
                                                                                at::TensorList initial, int64_t kind,
                                                                                at::ArrayRef<double> thresholds) {
  TORCH_CHECK_VALUE(kind >= 0 && kind <= kGivenScore, "layersel::sparse_extract: kind must be in [0, 6], got ", kind);
  TORCH_CHECK_VALUE(thresholds.size() == model.size(), "layersel::sparse_extract: got ", thresholds.size(),
                    " thresholds for ", model.size(), " tensors");
  const WorkTable table = build_work_table(model, initial, kind >= 2, kCpuChunk, "sparse_extract");
  std::vector<int64_t> counts(static_cast<size_t>(table.total_chunks()));
  for_each_chunk(table, kCpuChunk, [&](const TensorEntry& e, int32_t t, int64_t c, int64_t off, int64_t len) {
    LS_SWITCH_DTYPE(e.dtype, T, {
      const T* x = static_cast<const T*>(e.x) + off;
      const T* y = e.y ? static_cast<const T*>(e.y) + off : x;
      with_kind(kind, [&](auto k) { counts[c] = count_chunk<decltype(k)::value, T>(x, y, len, thresholds[t]); });
    });
  });
  const size_t n = table.entries.size();
  std::vector<at::Tensor> values(n), indices(n);
  std::vector<int64_t> chunk_offset(counts.size());
  std::vector<std::vector<int64_t>> sizes(n), strides(n);
  for (size_t t = 0; t < n; ++t) {
    int64_t total = 0;
    for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) {
      chunk_offset[c] = total;
      total += counts[c];
    }
    const at::Tensor& x = model[t];
    sizes[t] = x.sizes().vec();
    strides[t].assign(sizes[t].size(), 1);
    for (int64_t dim = static_cast<int64_t>(sizes[t].size()) - 2; dim >= 0; --dim)
      strides[t][dim] = strides[t][dim + 1] * sizes[t][dim + 1];
    values[t] = at::empty({total}, x.options());
    indices[t] = at::empty({total, x.dim()}, x.options().dtype(at::kLong));
  }
  for_each_chunk(table, kCpuChunk, [&](const TensorEntry& e, int32_t t, int64_t c, int64_t off, int64_t len) {
    if (counts[c] == 0) return;
    LS_SWITCH_DTYPE(e.dtype, T, {
      const T* x = static_cast<const T*>(e.x) + off;
      const T* y = e.y ? static_cast<const T*>(e.y) + off : x;
      T* v = values[t].data_ptr<T>() + chunk_offset[c];
      int64_t* ix = indices[t].data_ptr<int64_t>() + chunk_offset[c] * static_cast<int64_t>(sizes[t].size());
      with_kind(kind, [&](auto k) {
        write_chunk<decltype(k)::value, T>(x, y, off, len, thresholds[t], v, ix, sizes[t], strides[t]);
      });
    });
  });
  return {values, indices};
}

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CPU, m) {
  m.impl("kth_largest_score", &layersel::kth_largest_score_cpu);
  m.impl("sparse_extract", &layersel::sparse_extract_cpu);
}
