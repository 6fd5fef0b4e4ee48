// The six fl4health score formulas and the drift term, element by element,
// with torch's semantics for every dtype (integer wrap-around included).
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "macros.h"

namespace layersel {

// Score kinds, in the order of the fl4health functions (layersel_ext/_score_kinds.py
// has the same values); kinds travel through the op schemas as plain ints.
enum class ScoreKind : int64_t {
  kLargestFinalMagnitude = 0,     //  |x|
  kSmallestFinalMagnitude = 1,    // -|x|
  kLargestMagnitudeChange = 2,    //  |x - y|
  kSmallestMagnitudeChange = 3,   // -|x - y|
  kLargestIncreaseInMagnitude = 4,   //  |x| - |y|
  kSmallestIncreaseInMagnitude = 5,  // -(|x| - |y|)
  kGiven = 6,  // sparse selection only: the y tensor holds the score (custom score functions)
};
// Kinds below this are formulas of (x, y) (layersel::scores takes those only).
constexpr int64_t kNumFormulaKinds = static_cast<int64_t>(ScoreKind::kGiven);
constexpr int64_t kGivenScore = static_cast<int64_t>(ScoreKind::kGiven);

LS_HD bool score_kind_uses_initial(int64_t kind) {
  return kind >= static_cast<int64_t>(ScoreKind::kLargestMagnitudeChange);
}

// A score kind as a compile-time constant (an int64_t, as kinds travel).
template <ScoreKind K>
using KindConstant = std::integral_constant<int64_t, static_cast<int64_t>(K)>;

// Calls fn(KindConstant<kind>()) for a kind the op has checked: the one switch
// over kinds, outside the loops, so that each loop is instantiated for one
// kind and has no per-element branch on it (CUDA: once per step of a few
// elements, csrc/cuda/sparse_select.cu). (Any other value: kGiven.)
#if defined(__CUDACC__)
#pragma nv_exec_check_disable  // fn is a host lambda on the CPU, a device one in a kernel
#endif
template <typename Fn>
LS_HD_INLINE void with_score_kind(int64_t kind, Fn&& fn) {
  switch (static_cast<ScoreKind>(kind)) {
    case ScoreKind::kLargestFinalMagnitude: fn(KindConstant<ScoreKind::kLargestFinalMagnitude>()); break;
    case ScoreKind::kSmallestFinalMagnitude: fn(KindConstant<ScoreKind::kSmallestFinalMagnitude>()); break;
    case ScoreKind::kLargestMagnitudeChange: fn(KindConstant<ScoreKind::kLargestMagnitudeChange>()); break;
    case ScoreKind::kSmallestMagnitudeChange: fn(KindConstant<ScoreKind::kSmallestMagnitudeChange>()); break;
    case ScoreKind::kLargestIncreaseInMagnitude: fn(KindConstant<ScoreKind::kLargestIncreaseInMagnitude>()); break;
    case ScoreKind::kSmallestIncreaseInMagnitude: fn(KindConstant<ScoreKind::kSmallestIncreaseInMagnitude>()); break;
    default: fn(KindConstant<ScoreKind::kGiven>()); break;
  }
}

// Integer arithmetic wraps like torch's (two's complement), without UB.
template <typename T>
LS_HD T wrap_sub(T a, T b) {
  if constexpr (std::is_integral<T>::value) {
    using U = typename std::make_unsigned<T>::type;
    return static_cast<T>(static_cast<U>(static_cast<U>(a) - static_cast<U>(b)));
  } else {
    return static_cast<T>(a - b);  // Half/BFloat16: computed in float, rounded once
  }
}

template <typename T>
LS_HD T wrap_neg(T a) {
  return wrap_sub(static_cast<T>(0), a) ;
}

template <typename T>
LS_HD T abs_like_torch(T a) {
  if constexpr (std::is_integral<T>::value) {
    if constexpr (std::is_unsigned<T>::value) {
      return a;
    } else {
      return a < 0 ? wrap_neg(a) : a;  // abs(INT_MIN) == INT_MIN, as in torch
    }
  } else if constexpr (std::is_same<T, double>::value) {
    return fabs(a);
  } else {
    return static_cast<T>(fabsf(static_cast<float>(a)));  // clears the sign of -0.0 too
  }
}

// Floating negation is a sign flip (exact, NaN-preserving): (-1) * v in torch.
template <typename T>
LS_HD T negate_like_torch(T a) {
  if constexpr (std::is_integral<T>::value) {
    return wrap_neg(a);
  } else if constexpr (std::is_same<T, double>::value || std::is_same<T, float>::value) {
    return -a;
  } else {
    return static_cast<T>(-static_cast<float>(a));
  }
}

// Formula `kind` (a formula kind; anything else computes the last formula).
template <typename T>
LS_HD T score_value(int64_t kind, T x, T y) {
  switch (static_cast<ScoreKind>(kind)) {
    case ScoreKind::kLargestFinalMagnitude: return abs_like_torch(x);
    case ScoreKind::kSmallestFinalMagnitude: return negate_like_torch(abs_like_torch(x));
    case ScoreKind::kLargestMagnitudeChange: return abs_like_torch(wrap_sub(x, y));
    case ScoreKind::kSmallestMagnitudeChange: return negate_like_torch(abs_like_torch(wrap_sub(x, y)));
    case ScoreKind::kLargestIncreaseInMagnitude: return wrap_sub(abs_like_torch(x), abs_like_torch(y));
    default: return negate_like_torch(wrap_sub(abs_like_torch(x), abs_like_torch(y)));  // kSmallestIncreaseInMagnitude
  }
}

// fl4health's drift term: (a - b) in the tensor's dtype, then .float().
template <typename T>
LS_HD float drift_term(T a, T b) {
  return static_cast<float>(wrap_sub(a, b));
}

// One term of a layer's squared drift norm, the one definition every backend
// uses (the torch twin too): the square of the drift term in float32, as
// fl4health's float32 norm computes it (so a square that underflows to 0 or
// overflows to inf does so here too), then widened to double. The terms are
// summed in double and the total is rounded to float32 before the square root
// (layersel_ext/parameter_selection_criteria.py): a total above the float32
// maximum is inf, as in fl4health, but without fl4health's float32
// accumulation error.
template <typename T>
LS_HD double drift_square(T a, T b) {
  const float d = drift_term(a, b);
  return static_cast<double>(LS_FMUL(d, d));
}

// drift_square() of two int8 values given by their bits, in integer arithmetic
// alone (the wrapped difference sign-extended by mask and offset): equal to
// drift_square(int8_t(a), int8_t(b)) for all 65,536 pairs (ctest common_math).
// The CUDA drift kernel uses it because nvcc 13.0 (sm_90, -O3 and -O0 alike)
// miscompiles the signed conversion of int8 elements taken out of a 16-byte
// vector register: on an H200 the int8 drift came out ~16,000x too large while
// uint8/int16 were exact, and this form gave the exact sum (2026-11-26).
LS_HD double drift_square_i8_bits(uint8_t a, uint8_t b) {
  const int d = ((static_cast<int>(a) - static_cast<int>(b) + 128) & 255) - 128;
  const float f = static_cast<float>(d);
  return static_cast<double>(LS_FMUL(f, f));
}

// A one-element entry: torch's norm of one element is its absolute value (no
// square, so no underflow or overflow), so the op returns the exact square in
// double, whose square root is |d| exactly.
template <typename T>
LS_HD double drift_square_single(T a, T b) {
  const double d = drift_term(a, b);
  return d * d;
}

}  // namespace layersel
