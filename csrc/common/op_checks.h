// Argument checks that several kernels make, with one message each (the
// table-building checks themselves live in work_table.h).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "work_table.h"

namespace layersel {

// Masks are summed by the server: an integer dtype, never bool. (uint16/32/64
// masks are made from uint8 ones by the Python wrapper.)
inline void check_mask_dtype(at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype != at::kBool, "layersel::sample_masks: bool masks are refused (the server sums masks)");
  TORCH_CHECK_TYPE(dtype == at::kByte || dtype == at::kChar || dtype == at::kShort || dtype == at::kInt ||
                       dtype == at::kLong,
                   "layersel::sample_masks: mask dtype must be uint8, int8, int16, int32 or int64, got ", dtype);
}

inline void check_floating_scores(const WorkTable& table, at::TensorList scores) {
  for (size_t i = 0; i < table.entries.size(); ++i)
    TORCH_CHECK_TYPE(is_floating_code(table.entries[i].dtype), "layersel::sample_masks: score tensor #", i,
                     " has dtype ", scores[i].scalar_type(), "; scores must be floating point");
}

}  // namespace layersel
