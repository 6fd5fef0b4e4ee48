// Host side of the radix select: the k-th largest key back to a value of the
// score dtype (csrc/common/radix.h defines the keys), as a 0-d CPU tensor.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "radix.h"

namespace layersel {

// The value of score dtype P whose order key (csrc/common/radix.h) is `key`,
// as a 0-d CPU tensor.
template <typename P>
at::Tensor key_to_value(uint64_t key, at::ScalarType dtype) {
  const KeyUint<P> u = key_value_bits<P>(key);
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(dtype));
  std::memcpy(out.data_ptr(), &u, sizeof(u));
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
