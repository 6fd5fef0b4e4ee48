// Dtype codes carried in the work table, so that one launch / one parallel
// region can cover tensors of several dtypes (fp32 weights beside int64
// BatchNorm counters). A block or chunk switches once on its tensor's code.
#pragma once
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "macros.h"

namespace layersel {

enum DtypeCode : int32_t {
  kF32 = 0,
  kF64 = 1,
  kF16 = 2,
  kBF16 = 3,
  kU8 = 4,
  kI8 = 5,
  kI16 = 6,
  kI32 = 7,
  kI64 = 8,
};

LS_HD bool is_floating_code(int32_t code) { return code <= kBF16; }

// Runs BODY with T bound to the C++ type of `code`.
#define LS_SWITCH_DTYPE(code, T, ...)            \
  switch (code) {                                \
    case ::layersel::kF32: {                     \
      using T = float;                           \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    case ::layersel::kF64: {                     \
      using T = double;                          \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    case ::layersel::kF16: {                     \
      using T = c10::Half;                       \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    case ::layersel::kBF16: {                    \
      using T = c10::BFloat16;                   \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    case ::layersel::kU8: {                      \
      using T = uint8_t;                         \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    case ::layersel::kI8: {                      \
      using T = int8_t;                          \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    case ::layersel::kI16: {                     \
      using T = int16_t;                         \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    case ::layersel::kI32: {                     \
      using T = int32_t;                         \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    default: {                                   \
      using T = int64_t;                         \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
  }

// Same, for the floating codes only (mask sampling reads float scores).
#define LS_SWITCH_FLOAT_DTYPE(code, T, ...) \
  switch (code) {                           \
    case ::layersel::kF64: {                \
      using T = double;                     \
      __VA_ARGS__;                          \
      break;                                \
    }                                       \
    case ::layersel::kF16: {                \
      using T = c10::Half;                  \
      __VA_ARGS__;                          \
      break;                                \
    }                                       \
    case ::layersel::kBF16: {               \
      using T = c10::BFloat16;              \
      __VA_ARGS__;                          \
      break;                                \
    }                                       \
    default: {                              \
      using T = float;                      \
      __VA_ARGS__;                          \
      break;                                \
    }                                       \
  }

}  // namespace layersel
