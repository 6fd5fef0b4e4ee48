// Argument checks that the CPU and CUDA kernels make, with one message each
// (the table-building checks themselves live in work_table.h; the Python twin's
// copy of both is layersel_ext/_checks.py).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "scores.h"
#include "work_table.h"

namespace layersel {

// layersel::scores takes the six formulas; the sparse ops take kGiven too.
inline void check_formula_kind(int64_t kind) {
  TORCH_CHECK_VALUE(kind >= 0 && kind < kNumFormulaKinds, "layersel::scores: kind must be in [0, ",
                    kNumFormulaKinds, "), got ", kind);
}

inline void check_sparse_kind(int64_t kind, const char* op) {
  TORCH_CHECK_VALUE(kind >= 0 && kind <= kGivenScore, "layersel::", op, ": kind must be in [0, ", kGivenScore,
                    "], got ", kind);
}

// A 1-based rank among `total` scores.
inline void check_rank(int64_t k, int64_t total) {
  TORCH_CHECK_VALUE(k >= 1 && k <= total, "layersel::kth_largest_score: k must be in [1, ", total, "], got ", k);
}

inline void check_threshold_count(size_t thresholds, size_t tensors) {
  TORCH_CHECK_VALUE(thresholds == tensors, "layersel::sparse_extract: got ", thresholds, " thresholds for ",
                    tensors, " tensors");
}

// sparse_select compares every tensor with the k-th largest score of one
// floating dtype: tensors of that dtype, or, with float32 scores, integer
// tensors too (a float32 model's int64 buffers: compared in float32, the
// keys' own order). Anything else takes kth_largest_score + sparse_extract.
inline void check_sparse_select_dtypes(at::TensorList model, at::ScalarType score_dtype) {
  TORCH_CHECK_TYPE(at::isFloatingType(score_dtype), "layersel::sparse_select: score dtype ", score_dtype,
                   " is not floating point");
  for (size_t t = 0; t < model.size(); ++t) {
    const at::ScalarType dt = model[t].scalar_type();
    const bool integer_beside_float32 = score_dtype == at::kFloat && at::isIntegralType(dt, /*includeBool=*/false);
    TORCH_CHECK_TYPE(dt == score_dtype || integer_beside_float32, "layersel::sparse_select: tensor #", t,
                     " has dtype ", dt, "; with ", score_dtype, " scores every tensor must be ", score_dtype,
                     score_dtype == at::kFloat ? " or an integer dtype" : "");
  }
}

// Masks are summed by the server: an integer dtype, never bool. (uint16/32/64
// masks are made from uint8 ones by the Python wrapper.)
inline void check_mask_dtype(at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype != at::kBool, "layersel::sample_masks: bool masks are refused (the server sums masks)");
  TORCH_CHECK_TYPE(dtype == at::kByte || dtype == at::kChar || dtype == at::kShort || dtype == at::kInt ||
                       dtype == at::kLong,
                   "layersel::sample_masks: mask dtype must be uint8, int8, int16, int32 or int64, got ", dtype);
}

inline void check_floating_scores(const WorkTable& table, at::TensorList scores, const char* op) {
  for (size_t i = 0; i < table.entries.size(); ++i)
    TORCH_CHECK_TYPE(is_floating_code(table.entries[i].dtype), "layersel::", op, ": score tensor #", i,
                     " has dtype ", scores[i].scalar_type(), "; scores must be floating point");
}

// The work table of a list of score tensors (mask sampling, fingerprints):
// floating scores, each tensor at its stream index (set_counters).
inline WorkTable score_table(at::TensorList scores, const c10::optional<at::IntArrayRef>& counters, int64_t chunk,
                             const char* op) {
  WorkTable table = build_work_table(scores, {}, /*needs_y=*/false, chunk, op);
  check_floating_scores(table, scores, op);
  set_counters(table, counters, op);
  return table;
}

}  // namespace layersel
