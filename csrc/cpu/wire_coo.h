// The compact sparse-COO wire format's codec on CPU tensors (the format:
// layersel_ext/wire_coo.py; the codec: common/coo_codec.h). Bound into the
// Python module as _C.coo_encode / _C.coo_decode; the arrays come from numpy
// without copies (torch.from_numpy) and go back the same way.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>
#include <vector>

namespace layersel {

// indices[t]: int64 [nnz_t, ndim_t] contiguous; shapes[t]: its tensor's shape;
// value_bytes[t]: its values' little-endian bytes (uint8, 1-D, contiguous).
// Returns (the first tensor with an index outside its shape, or -1; per tensor
// the position code and its payload bytes; all payloads, concatenated; all
// value bytes, concatenated). With an index outside a shape only the first is set.
std::tuple<int64_t, std::vector<int64_t>, std::vector<int64_t>, at::Tensor, at::Tensor> coo_encode(
    const std::vector<at::Tensor>& indices, const std::vector<std::vector<int64_t>>& shapes,
    const std::vector<at::Tensor>& value_bytes);

// The inverse, from a stream whose meta the caller has checked (shapes of at
// most 64 dimensions and fewer than 2**62 elements, nnz <= numel, the byte
// counts adding up to the arrays' sizes). Returns (the first tensor whose
// positions are invalid, or -1; why; per tensor its int64 [nnz, ndim] indices;
// one buffer holding every tensor's value bytes, each tensor's at a multiple of
// 64; where each starts). With an invalid tensor only the first two are set.
// Refuses (ValueError) before allocating when the outputs would take more than
// max_bytes (coo::decoded_bytes summed over the tensors).
std::tuple<int64_t, std::string, std::vector<at::Tensor>, at::Tensor, std::vector<int64_t>> coo_decode(
    const std::vector<int64_t>& codes, const std::vector<std::vector<int64_t>>& shapes,
    const std::vector<int64_t>& nnz, const at::Tensor& positions, const std::vector<int64_t>& position_bytes,
    const at::Tensor& values, const std::vector<int64_t>& value_bytes, int64_t max_bytes);

}  // namespace layersel
