// Score outputs: one flat buffer per dtype (one allocation per dtype, not per
// tensor), each work-table entry pointing at its slice.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "work_table.h"

namespace layersel {

// One buffer per dtype, in order of first appearance; each entry's `out` points
// at its slice. Python splits the buffers into views.
// `alloc(numel, dtype)` makes each buffer.
template <typename Alloc>
std::vector<at::Tensor> allocate_grouped_outputs(WorkTable& table, Alloc alloc) {
  std::vector<at::Tensor> buffers;
  std::vector<int32_t> codes;
  std::vector<int64_t> sizes;
  for (const TensorEntry& e : table.entries) {
    size_t g = 0;
    while (g < codes.size() && codes[g] != e.dtype) ++g;
    if (g == codes.size()) {
      codes.push_back(e.dtype);
      sizes.push_back(0);
    }
    sizes[g] += e.numel;
  }
  for (size_t g = 0; g < codes.size(); ++g) {
    buffers.push_back(alloc(sizes[g], scalar_type_of_code(codes[g])));
  }
  std::vector<int64_t> fill(codes.size(), 0);
  for (TensorEntry& e : table.entries) {
    size_t g = 0;
    while (codes[g] != e.dtype) ++g;
    e.out = static_cast<char*>(buffers[g].data_ptr()) + fill[g] * buffers[g].element_size();
    fill[g] += e.numel;
  }
  return buffers;
}

}  // namespace layersel
