// CPU: the extraction of fl4health's sparse COO selection. A marking pass
// computes every score and keeps one bit per element (64 to a word), counting
// them per chunk; the outputs are then allocated exactly and a writing pass
// walks the set bits only, reading the kept values and writing their
// row-major indices at each chunk's offset (the order torch.nonzero gives).
// sparse_select marks during the sample select's pass where it can
// (sparse_select_kth.cpp): a large model is then read once.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/op_checks.h"
#include "../common/radix.h"
#include "sparse_select.h"
#include "sparse_select_offsets.h"

namespace layersel {
namespace {

// ceil(len / 64) words per chunk, at a prefix offset (a chunk of a small tensor
// is short); left uninitialised: the marking passes write every word they own.
Marks allocate_marks(const WorkTable& table) {
  Marks m;
  m.counts.assign(static_cast<size_t>(table.total_chunks()), 0);
  m.first_word.assign(m.counts.size() + 1, 0);
  for (size_t t = 0; t < table.entries.size(); ++t) {
    const int64_t numel = table.entries[t].numel;
    for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) {
      const int64_t len = std::min(kCpuChunk, numel - (c - table.first_chunk[t]) * kCpuChunk);
      m.first_word[c + 1] = m.first_word[c] + (len + 63) / 64;
    }
  }
  m.storage = empty_cpu_output(m.first_word.back() + 1, at::kLong);
  m.bits = reinterpret_cast<uint64_t*>(m.storage.data_ptr<int64_t>());
  return m;
}

// The marks of a chunk, vectorised: the scores are computed once, in this
// pass (the bits take about n/8 bytes). The values written are those read in
// the writing pass (another thread updating the weights in place between the
// passes gives a stale answer, never a memory error).
template <int64_t Kind, typename T>
LS_CPU_INLINE int64_t mark_chunk_body(const T* x, const T* y, int64_t n, double threshold, uint64_t* words,
                                      int64_t kind) {
  const int64_t kd = loop_kind<Kind>(kind);
  int64_t count = 0;
  for (int64_t w = 0; w * 64 < n; ++w) {
    const int64_t begin = w * 64, m = std::min<int64_t>(64, n - begin);
    uint64_t word = 0;
    for (int64_t b = 0; b < m; ++b) {
      const int64_t i = begin + b;
      const bool keep = passes_threshold(sparse_score<T>(kd, x[i], y[i]), threshold) && is_nonzero(x[i]);
      word |= static_cast<uint64_t>(keep) << b;
    }
    words[w] = word;
    count += __builtin_popcountll(word);
  }
  return count;
}

// mark_chunk_body per ISA for one kind of a floating dtype, plainly for the
// integer dtypes (RuntimeKind: small buffers).
template <int64_t Kind, typename T>
LS_CPU_CLONES int64_t mark_chunk_cloned(const T* x, const T* y, int64_t n, double threshold, uint64_t* words) {
  return mark_chunk_body<Kind, T>(x, y, n, threshold, words, Kind);
}
template <int64_t Kind, typename T>
inline int64_t mark_chunk(const T* x, const T* y, int64_t n, double threshold, uint64_t* words, int64_t kind) {
  if constexpr (Kind == kRuntimeKind) {
    return mark_chunk_body<Kind, T>(x, y, n, threshold, words, kind);
  } else {
    return mark_chunk_cloned<Kind, T>(x, y, n, threshold, words);
  }
}

// Row-major coordinates of the kept elements only; the common 1-D and 2-D
// cases without a 64-bit division loop. flat: the flat offset alone, as for a
// 1-D tensor.
template <typename T>
void write_chunk(const T* x, int64_t off, int64_t n, const uint64_t* words, T* values, int64_t* indices,
                 const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides, bool flat) {
  const size_t ndim = flat ? 1 : sizes.size();
  const bool small = off + n <= int64_t{UINT32_MAX};
  int64_t w = 0;
  for (int64_t k = 0; k * 64 < n; ++k) {
    for (uint64_t word = words[k]; word != 0; word &= word - 1) {
      const int64_t i = k * 64 + __builtin_ctzll(word);
      values[w] = x[i];
      const int64_t flat = off + i;
      int64_t* out = indices + w * static_cast<int64_t>(ndim);
      if (ndim == 1) {
        out[0] = flat;
      } else if (ndim == 2 && small) {
        const uint32_t row = static_cast<uint32_t>(flat) / static_cast<uint32_t>(sizes[1]);
        out[0] = row;
        out[1] = flat - static_cast<int64_t>(row) * sizes[1];
      } else {
        for (size_t dim = 0; dim < ndim; ++dim) out[dim] = (flat / strides[dim]) % sizes[dim];
      }
      ++w;
    }
  }
}

// The marking pass of an extraction: every score against its tensor's threshold.
void mark_above_thresholds(const WorkTable& table, int64_t kind, at::ArrayRef<double> thresholds, Marks& marks) {
  each_score_chunk<void>(table, kind, [&](auto kc, const auto* x, const auto* y, int64_t len, auto* tag, ChunkAt at) {
    using T = std::remove_pointer_t<decltype(tag)>;
    marks.counts[at.chunk] = mark_chunk<decltype(kc)::value, T>(x, y, len, thresholds[at.tensor],
                                                                marks.bits + marks.first_word[at.chunk], kind);
  });
}

// A view of `n` elements of `dtype` at byte `offset` of `storage` (aligned to the dtype).
at::Tensor view_at(const at::Storage& storage, int64_t offset, int64_t n, at::ScalarType dtype) {
  return at::empty({0}, at::TensorOptions().dtype(dtype)).set_(storage, offset / c10::elementSize(dtype), {n}, {1});
}

// The writing pass: values and row-major indices of the marked elements, per
// tensor, each chunk's at its offset among its tensor's (torch.nonzero's order).
// flat (the compact wire's form): flat offsets, int64 [nnz], instead of
// indices, and every tensor's values and offsets views of one buffer each, the
// values one right after the other (padded only to a larger dtype's alignment),
// as the wire concatenates them.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> write_marked(const WorkTable& table, at::TensorList model,
                                                                          const Marks& marks, bool flat = false) {
  const size_t n = table.entries.size();
  std::vector<at::Tensor> values(n), indices(n);
  std::vector<int64_t> chunk_offset(marks.counts.size()), totals(n), value_at(n);
  std::vector<std::vector<int64_t>> sizes(n), strides(n);
  int64_t value_bytes = 0, entries = 0;
  for (size_t t = 0; t < n; ++t) {
    int64_t total = 0;
    for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) {
      chunk_offset[c] = total;
      total += marks.counts[c];
    }
    const at::Tensor& x = model[t];
    sizes[t] = x.sizes().vec();
    strides[t].assign(sizes[t].size(), 1);
    for (int64_t dim = static_cast<int64_t>(sizes[t].size()) - 2; dim >= 0; --dim)
      strides[t][dim] = strides[t][dim + 1] * sizes[t][dim + 1];
    totals[t] = total;
    if (flat) {
      const int64_t size = static_cast<int64_t>(c10::elementSize(x.scalar_type()));
      value_at[t] = (value_bytes + size - 1) / size * size;
      value_bytes = value_at[t] + total * size;
      entries += total;
    } else {
      values[t] = empty_cpu_output(total, x.scalar_type());
      indices[t] = empty_cpu_output(total * x.dim(), at::kLong).view({total, x.dim()});
    }
  }
  if (flat) {
    const at::Storage value_storage = empty_cpu_output(value_bytes, at::kByte).storage();
    const at::Storage offset_storage = empty_cpu_output(entries, at::kLong).storage();
    int64_t at = 0;
    for (size_t t = 0; t < n; ++t) {
      values[t] = view_at(value_storage, value_at[t], totals[t], model[t].scalar_type());
      indices[t] = view_at(offset_storage, at * 8, totals[t], at::kLong);
      at += totals[t];
    }
  }
  for_each_chunk(table, kCpuChunk, [&](const TensorEntry& e, int32_t t, int64_t c, int64_t off, int64_t len) {
    if (marks.counts[c] == 0) return;
    LS_SWITCH_DTYPE(e.dtype, T, {
      T* v = values[t].data_ptr<T>() + chunk_offset[c];
      const int64_t row = flat ? 1 : static_cast<int64_t>(sizes[t].size());
      int64_t* ix = indices[t].data_ptr<int64_t>() + chunk_offset[c] * row;
      write_chunk<T>(static_cast<const T*>(e.x) + off, off, len, marks.bits + marks.first_word[c], v, ix,
                     sizes[t], strides[t], flat);
    });
  });
  return {values, indices};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sparse_extract_cpu(at::TensorList model,
                                                                                at::TensorList initial, int64_t kind,
                                                                                at::ArrayRef<double> thresholds) {
  check_sparse_kind(kind, "sparse_extract");
  check_threshold_count(thresholds.size(), model.size());
  const WorkTable table = build_work_table(model, initial, score_kind_uses_initial(kind), kCpuChunk, "sparse_extract");
  Marks marks = allocate_marks(table);
  mark_above_thresholds(table, kind, thresholds, marks);
  return write_marked(table, model, marks);
}

// sparse_extract(model, initial, kind, thresholds) with every threshold the
// k-th largest score v = kth_largest_score(model, initial, kind, k, score_dtype),
// where each tensor's dtype is score_dtype (floating) or, with float32 scores,
// an integer dtype (a float32 model's int64 buffers: sparse_coo compares those
// with float32(v) = v in float32, the key's own order). On large models the
// sample select's pass marks as it brackets (one read of the model instead of
// two); else the k-th largest as kth_largest_score finds it (the sample select's
// answer, when only the marks could not be completed) and the marking pass.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> select_marked(at::TensorList model,
                                                                           at::TensorList initial, int64_t kind,
                                                                           int64_t k, at::ScalarType score_dtype,
                                                                           bool flat) {
  check_sparse_kind(kind, "sparse_select");
  const WorkTable table = build_work_table(model, initial, score_kind_uses_initial(kind), kCpuChunk, "sparse_select");
  check_rank(k, table.total_numel);
  check_sparse_select_dtypes(model, score_dtype);
  Marks marks = allocate_marks(table);
  LS_SWITCH_FLOAT_DTYPE(code_of_scalar_type(score_dtype), P, {
    uint64_t kth = 0;
    if (!sampled_kth_largest_key<P>(table, kind, k, kth, &marks)) kth = kth_largest_key<P>(table, kind, k, false);
    if (!marks.complete) {  // a threshold of 0 or NaN, a small model, a missed bracket: the marking pass
      const std::vector<double> thresholds(model.size(), key_value<P>(kth));
      mark_above_thresholds(table, kind, thresholds, marks);
    }
  });
  return write_marked(table, model, marks, flat);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sparse_select_cpu(at::TensorList model,
                                                                               at::TensorList initial, int64_t kind,
                                                                               int64_t k, at::ScalarType score_dtype) {
  return select_marked(model, initial, kind, k, score_dtype, false);
}

}  // namespace

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sparse_select_offsets(
    const std::vector<at::Tensor>& model, const std::vector<at::Tensor>& initial, int64_t kind, int64_t k,
    at::ScalarType score_dtype) {
  for (const at::Tensor& x : model) {
    TORCH_CHECK_VALUE(x.device().is_cpu(), "sparse_select_offsets: CPU tensors only, got one on ", x.device());
  }
  return select_marked(model, initial, kind, k, score_dtype, true);
}

}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CPU, m) {
  m.impl("sparse_extract", &layersel::sparse_extract_cpu);
  m.impl("sparse_select", &layersel::sparse_select_cpu);
}
