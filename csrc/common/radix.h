// Exact k-th largest score by radix select over order-preserving keys, and the
// per-tensor threshold test of fl4health's sparse COO selection. Shared by the
// CPU and CUDA backends; never a sort.
//
// Policy (as torch.sort(descending=True), which fl4health uses): NaN ranks
// above +inf, whatever its sign bit; -0.0 and +0.0 are distinct keys but equal
// values, so the threshold test (a float comparison) treats them alike;
// denormals order as their values.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "macros.h"
#include "scores.h"

namespace layersel {

// kGivenScore: the score is given (the y tensor holds it), for custom score functions.
template <typename T>
LS_HD T sparse_score(int64_t kind, T x, T y) {
  return kind == kGivenScore ? y : score_value<T>(kind, x, y);
}

// Radix digits of the full passes: 11 bits, so that a histogram fits in L1 (CPU,
// crowded-digit fallback) or shared memory (CUDA).
constexpr int kDigitBits = 11;
constexpr int kDigitBins = 1 << kDigitBits;

LS_HD int num_digits(int key_bits) { return (key_bits + kDigitBits - 1) / kDigitBits; }
// Bit offset of digit d, counted from the most significant digit (d = 0).
LS_HD int digit_shift(int key_bits, int d) {
  const int s = key_bits - (d + 1) * kDigitBits;
  return s < 0 ? 0 : s;
}
LS_HD int digit_width(int key_bits, int d) {
  const int top = key_bits - d * kDigitBits;
  return top < kDigitBits ? top : kDigitBits;
}

template <typename U, typename F>
LS_HD U bit_cast_to(F f) {
  U u;
#if defined(__CUDA_ARCH__)
  memcpy(&u, &f, sizeof(u));
#else
  std::memcpy(&u, &f, sizeof(u));
#endif
  return u;
}

// The unsigned integer as wide as score dtype P (its keys' bits).
template <typename P>
using KeyUint = typename std::conditional<sizeof(P) == 8, uint64_t,
                                          typename std::conditional<sizeof(P) == 4, uint32_t, uint16_t>::type>::type;

// Order-preserving unsigned key of a value of the promoted score dtype P.
// Floating P: flip all bits of negatives, set the sign of positives; NaN -> max.
// Integer P: flip the sign bit.
template <typename P>
LS_HD uint64_t order_key(P v) {
  if constexpr (std::is_integral<P>::value) {
    using U = typename std::make_unsigned<P>::type;
    return static_cast<uint64_t>(static_cast<U>(static_cast<U>(v) ^ (U(1) << (sizeof(P) * 8 - 1))));
  } else {
    using U = KeyUint<P>;
    constexpr U kSign = U(1) << (sizeof(P) * 8 - 1);
    const double value = static_cast<double>(v);
    if (!(value == value)) return static_cast<uint64_t>(static_cast<U>(~U(0)));  // every NaN ranks first
    U u;
    if constexpr (sizeof(P) == 2) {
      u = v.x;  // c10::Half / c10::BFloat16 raw bits
    } else {
      u = bit_cast_to<U>(v);
    }
    return static_cast<uint64_t>(static_cast<U>((u & kSign) ? static_cast<U>(~u) : static_cast<U>(u | kSign)));
  }
}

// order_key's inverse: the raw bits of the value of P whose key is `key`
// (the all-ones key of every NaN gives one NaN).
template <typename P>
LS_HD KeyUint<P> key_value_bits(uint64_t key) {
  using U = KeyUint<P>;
  constexpr U kSign = U(1) << (sizeof(P) * 8 - 1);
  const U u = static_cast<U>(key);
  if constexpr (std::is_integral<P>::value) {
    return static_cast<U>(u ^ kSign);
  } else {
    return (u & kSign) ? static_cast<U>(u ^ kSign) : static_cast<U>(~u);
  }
}

// The value of score dtype P whose key is `key`, as a double (exact for the
// floating dtypes): the threshold every tensor's scores are compared with
// (passes_threshold).
template <typename P>
LS_HD double key_value(uint64_t key) {
  const KeyUint<P> u = key_value_bits<P>(key);
  if constexpr (std::is_integral<P>::value) {
    return static_cast<double>(static_cast<P>(u));
  } else if constexpr (sizeof(P) == 2) {
    P v;
    v.x = u;
    return static_cast<double>(static_cast<float>(v));
  } else {
    return static_cast<double>(bit_cast_to<P>(u));
  }
}

// The digit of `key` for pass d, or -1 when the key's higher digits do not
// match `prefix` (the digits chosen by the earlier passes).
LS_HD int32_t key_digit(uint64_t key, int key_bits, int d, uint64_t prefix) {
  const int shift = digit_shift(key_bits, d);
  const int width = digit_width(key_bits, d);
  const int above = shift + width;
  if (above < key_bits && (key >> above) != prefix) return -1;
  return static_cast<int32_t>((key >> shift) & ((uint64_t(1) << width) - 1));
}

// fl4health keeps `param_scores >= threshold` with the threshold a Python
// scalar: torch compares a floating score tensor in its own dtype (threshold
// rounded to it by the host) and an integer one in float32. `threshold` here
// is already that rounded value.
template <typename T>
LS_HD bool passes_threshold(T score, double threshold) {
  if constexpr (std::is_integral<T>::value) {
    return static_cast<double>(static_cast<float>(score)) >= threshold;
  } else {
    return static_cast<double>(score) >= threshold;  // exact: T's values are doubles
  }
}

// fl4health sends torch.nonzero of the thresholded tensor: a selected element
// whose value is exactly 0 (or -0.0) is not sent.
template <typename T>
LS_HD bool is_nonzero(T v) {
  if constexpr (std::is_integral<T>::value) {
    return v != 0;
  } else {
    return static_cast<double>(v) != 0.0;
  }
}

}  // namespace layersel
