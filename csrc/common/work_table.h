// Host-side construction of the multi-tensor work table, shared by the CPU and
// CUDA backends, with the argument checks every op makes.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "chunks.h"
#include "dtypes.h"

namespace layersel {

inline int32_t dtype_code(const at::Tensor& t, const char* op, size_t index) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kByte: return kU8;
    case at::kChar: return kI8;
    case at::kShort: return kI16;
    case at::kInt: return kI32;
    case at::kLong: return kI64;
    default:
      TORCH_CHECK_TYPE(false, "layersel::", op, ": tensor #", index, " has dtype ", t.scalar_type(),
                       ", which is not supported (expected a floating or integer dtype)");
  }
  return kF32;  // unreachable
}

// One entry per tensor; pointers are raw so that the same struct can be
// copied to the device as a flat array.
struct TensorEntry {
  const void* x;     // model tensor
  const void* y;     // initial-model tensor (or nullptr)
  void* out;         // output (scores / masks), or nullptr
  int64_t numel;
  int64_t base;      // global element index of element 0 (mask streams, output offsets)
  int32_t dtype;
  int32_t pad;
};

struct WorkTable {
  std::vector<TensorEntry> entries;
  std::vector<int64_t> first_chunk;  // n + 1 entries
  std::vector<at::Tensor> keep_alive;  // contiguous copies of strided inputs
  int64_t total_numel = 0;
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

}  // namespace layersel

namespace layersel {

inline c10::ScalarType scalar_type_of_code(int32_t code) {
  switch (code) {
    case kF32: return at::kFloat;
    case kF64: return at::kDouble;
    case kF16: return at::kHalf;
    case kBF16: return at::kBFloat16;
    case kU8: return at::kByte;
    case kI8: return at::kChar;
    case kI16: return at::kShort;
    case kI32: return at::kInt;
    default: return at::kLong;
  }
}

// Score outputs: one flat buffer per dtype, in order of first appearance; each
// entry's `out` points at its slice. Python splits the buffers into views.
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

namespace layersel {

// The value of score dtype P whose order key (csrc/common/radix.h) is `key`,
// as a 0-d CPU tensor.
template <typename P>
at::Tensor key_to_value(uint64_t key, at::ScalarType dtype) {
  using U = typename std::conditional<sizeof(P) == 8, uint64_t,
                                      typename std::conditional<sizeof(P) == 4, uint32_t, uint16_t>::type>::type;
  constexpr U kSign = U(1) << (sizeof(P) * 8 - 1);
  U u = static_cast<U>(key);
  if constexpr (std::is_integral<P>::value) {
    u ^= kSign;
  } else {
    u = (u & kSign) ? static_cast<U>(u ^ kSign) : static_cast<U>(~u);
  }
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(dtype));
  std::memcpy(out.data_ptr(), &u, sizeof(U));
  return out;
}

// kth(P{}) -> the key, for the score dtypes the radix select supports; the
// result as a 0-d tensor of that dtype.
template <typename Kth>
at::Tensor kth_value_for_dtype(at::ScalarType score_dtype, Kth kth) {
  switch (score_dtype) {
    case at::kFloat: return key_to_value<float>(kth(float{}), score_dtype);
    case at::kDouble: return key_to_value<double>(kth(double{}), score_dtype);
    case at::kHalf: return key_to_value<c10::Half>(kth(c10::Half{}), score_dtype);
    case at::kBFloat16: return key_to_value<c10::BFloat16>(kth(c10::BFloat16{}), score_dtype);
    case at::kLong: return key_to_value<int64_t>(kth(int64_t{}), score_dtype);
    default:
      TORCH_CHECK_TYPE(false, "layersel::kth_largest_score: score dtype ", score_dtype,
                       " is not supported (float32, float64, float16, bfloat16, int64)");
  }
}

}  // namespace layersel
