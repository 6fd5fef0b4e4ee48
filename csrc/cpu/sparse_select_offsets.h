// The sparse selection in the compact COO wire's form (layersel_ext/wire_coo.py):
// sparse_select's values and, instead of int64 [nnz, ndim] indices, the flat
// row-major offsets the encoder takes, int64 [nnz]. Every tensor's values are
// views of one buffer, one right after the other (padded only to a larger
// dtype's alignment), so _C.coo_encode sends them without a copy; the offsets
// are views of another. Bound into the Python module as _C.sparse_select_offsets
// (CPU tensors; the same checks and errors as torch.ops.layersel.sparse_select).
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace layersel {

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sparse_select_offsets(
    const std::vector<at::Tensor>& model, const std::vector<at::Tensor>& initial, int64_t kind, int64_t k,
    at::ScalarType score_dtype);

}  // namespace layersel
