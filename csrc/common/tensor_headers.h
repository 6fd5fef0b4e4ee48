// Tensor headers made without the dispatcher. A model of 1,000 small tensors
// otherwise pays a dispatched at::empty, slice or view per tensor (1-3 us each),
// more than the kernels themselves; these cost a header allocation.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>

#include <utility>

namespace layersel {

// A contiguous tensor of `sizes` on `buffer`'s storage, starting `offset`
// elements past the buffer's first element: buffer[offset : offset + numel]
// viewed as `sizes`. It holds its own reference to the storage and has its own
// version counter; autograd does not track it as a view (the buffers here are
// the ops' own outputs, or flat buffers that the caller drops).
inline at::Tensor contiguous_header(const at::Tensor& buffer, c10::IntArrayRef sizes, int64_t offset) {
  c10::intrusive_ptr<c10::TensorImpl> impl = buffer.unsafeGetTensorImpl()->shallow_copy_and_detach(
      c10::VariableVersion(0), /*allow_tensor_metadata_change=*/true);
  impl->set_sizes_contiguous(sizes);
  impl->set_storage_offset(buffer.storage_offset() + offset);
  return at::Tensor(std::move(impl));
}

}  // namespace layersel
