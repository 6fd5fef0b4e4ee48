// Host-side construction of the multi-tensor work table, shared by the CPU and
// CUDA backends, with the argument checks every op makes.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "chunks.h"
#include "dtypes.h"

namespace layersel {

inline int32_t dtype_code(const at::Tensor& t, const char* op, size_t index) {
  const int32_t code = code_of_scalar_type(t.scalar_type());
  TORCH_CHECK_TYPE(code >= 0, "layersel::", op, ": tensor #", index, " has dtype ", t.scalar_type(),
                   ", which is not supported (expected a floating or integer dtype)");
  return code;
}

// One entry per tensor; pointers are raw so that the same struct can be
// copied to the device as a flat array.
struct TensorEntry {
  const void* x;     // model tensor
  const void* y;     // initial-model tensor (or nullptr)
  void* out;         // output (scores / masks), or nullptr
  int64_t numel;
  int64_t base;      // index of element 0 in the concatenation (output offsets)
  int64_t counter;   // index of element 0 in the mask stream and fingerprint (default: base)
  int32_t dtype;
  int32_t pad;
};

struct WorkTable {
  std::vector<TensorEntry> entries;
  std::vector<int64_t> first_chunk;  // n + 1 entries
  std::vector<at::Tensor> keep_alive;  // contiguous copies of strided inputs
  int64_t total_numel = 0;
  int64_t chunk = 0;  // elements per chunk (a tensor's last chunk may be shorter)
  int64_t total_chunks() const { return first_chunk.empty() ? 0 : first_chunk.back(); }
};

inline const at::Tensor& contiguous_or_keep(const at::Tensor& t, WorkTable& table) {
  if (t.is_contiguous()) return t;
  table.keep_alive.push_back(t.contiguous());
  return table.keep_alive.back();
}

// Checks that x (and y, when given) are matching lists on one device and
// builds the table. `y` may be empty when the op does not need it.
inline WorkTable build_work_table(at::TensorList x, at::TensorList y, bool needs_y, int64_t chunk,
                                  const char* op) {
  TORCH_CHECK_VALUE(!needs_y || x.size() == y.size(), "layersel::", op, ": got ", x.size(),
                    " model tensors but ", y.size(), " initial tensors");
  WorkTable table;
  table.chunk = chunk;
  table.entries.reserve(x.size());
  table.keep_alive.reserve(2 * x.size());  // no reallocation: references stay valid
  table.first_chunk.reserve(x.size() + 1);
  table.first_chunk.push_back(0);
  const c10::Device device = x.empty() ? c10::Device(c10::kCPU) : x[0].device();
  for (size_t i = 0; i < x.size(); ++i) {
    const at::Tensor& xi = x[i];
    TORCH_CHECK_VALUE(xi.device() == device, "layersel::", op, ": tensor #", i, " is on ", xi.device(),
                      " but tensor #0 is on ", device);
    TensorEntry e{};
    e.dtype = dtype_code(xi, op, i);
    e.numel = xi.numel();
    e.base = table.total_numel;
    e.counter = e.base;
    e.x = contiguous_or_keep(xi, table).data_ptr();
    if (needs_y) {
      const at::Tensor& yi = y[i];
      TORCH_CHECK_VALUE(yi.device() == device, "layersel::", op, ": initial tensor #", i, " is on ",
                        yi.device(), " but the model tensor is on ", device);
      TORCH_CHECK_TYPE(yi.scalar_type() == xi.scalar_type(), "layersel::", op, ": tensor #", i,
                       " has dtype ", xi.scalar_type(), " but its initial tensor has ", yi.scalar_type());
      TORCH_CHECK_VALUE(yi.sizes() == xi.sizes(), "layersel::", op, ": tensor #", i, " has shape ",
                        xi.sizes(), " but its initial tensor has ", yi.sizes());
      e.y = contiguous_or_keep(yi, table).data_ptr();
    }
    table.total_numel += e.numel;
    table.entries.push_back(e);
    table.first_chunk.push_back(table.first_chunk.back() + num_chunks(e.numel, chunk));
  }
  return table;
}

// Entry i's elements take the mask stream's and the fingerprint's indices
// [counters[i], counters[i] + numel) instead of their place in the
// concatenation: a shard of a larger tensor keeps the indices it has in the
// unsharded model (layersel_ext/_sharded.py), so its masks are that model's.
inline void set_counters(WorkTable& table, const c10::optional<at::IntArrayRef>& counters, const char* op) {
  if (!counters.has_value()) return;
  TORCH_CHECK_VALUE(counters->size() == table.entries.size(), "layersel::", op, ": got ", counters->size(),
                    " counters for ", table.entries.size(), " tensors");
  for (size_t i = 0; i < table.entries.size(); ++i) {
    const int64_t c = (*counters)[i];
    TORCH_CHECK_VALUE(c >= 0 && c <= (int64_t{1} << 62) - table.entries[i].numel, "layersel::", op, ": counter #",
                      i, " is ", c, " (expected 0 <= counter and counter + numel <= 2^62)");
    table.entries[i].counter = c;
  }
}

}  // namespace layersel
