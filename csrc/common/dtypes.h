// The dtypes the kernels read, in ONE table (LS_DTYPES): the codes carried in
// the work table, the C++ types, the ScalarTypes and the dtype switches are all
// generated from it, so adding a dtype is one line here (plus the Python
// twin's SUPPORTED_DTYPES, which a test compares with build_info()["dtypes"]).
// Codes let one launch / one parallel region cover tensors of several dtypes
// (fp32 weights beside int64 BatchNorm counters): a block or chunk switches
// once on its tensor's code.
#pragma once
#include <cstdint>

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "macros.h"

// X(code name, C++ type, c10::ScalarType, extra arguments...); the floating
// rows first.
#define LS_FLOAT_DTYPES(X, ...)                                   \
  X(kF32, float, c10::ScalarType::Float, __VA_ARGS__)             \
  X(kF64, double, c10::ScalarType::Double, __VA_ARGS__)           \
  X(kF16, c10::Half, c10::ScalarType::Half, __VA_ARGS__)          \
  X(kBF16, c10::BFloat16, c10::ScalarType::BFloat16, __VA_ARGS__)
#define LS_INTEGER_DTYPES(X, ...)                          \
  X(kU8, uint8_t, c10::ScalarType::Byte, __VA_ARGS__)      \
  X(kI8, int8_t, c10::ScalarType::Char, __VA_ARGS__)       \
  X(kI16, int16_t, c10::ScalarType::Short, __VA_ARGS__)    \
  X(kI32, int32_t, c10::ScalarType::Int, __VA_ARGS__)      \
  X(kI64, int64_t, c10::ScalarType::Long, __VA_ARGS__)
#define LS_DTYPES(X, ...) LS_FLOAT_DTYPES(X, __VA_ARGS__) LS_INTEGER_DTYPES(X, __VA_ARGS__)

namespace layersel {

#define LS_DTYPE_ENUM_(code, type, scalar, ...) code,
enum DtypeCode : int32_t { LS_DTYPES(LS_DTYPE_ENUM_, ~) };
#undef LS_DTYPE_ENUM_

LS_HD bool is_floating_code(int32_t code) {
#define LS_DTYPE_IS_(code_, type, scalar, c) \
  if (c == ::layersel::code_) return true;
  LS_FLOAT_DTYPES(LS_DTYPE_IS_, code)
#undef LS_DTYPE_IS_
  return false;
}

// The code of a ScalarType, or -1 when the kernels do not read it.
inline int32_t code_of_scalar_type(c10::ScalarType s) {
#define LS_DTYPE_CODE_(code, type, scalar, v) \
  if (v == scalar) return ::layersel::code;
  LS_DTYPES(LS_DTYPE_CODE_, s)
#undef LS_DTYPE_CODE_
  return -1;
}

inline c10::ScalarType scalar_type_of_code(int32_t code) {
#define LS_DTYPE_SCALAR_(code_, type, scalar, c) \
  if (c == ::layersel::code_) return scalar;
  LS_DTYPES(LS_DTYPE_SCALAR_, code)
#undef LS_DTYPE_SCALAR_
  return c10::ScalarType::Undefined;
}

}  // namespace layersel

// Runs the body (the arguments after T) with T bound to the C++ type of
// `code`; FLOAT: the floating codes only (mask sampling reads float scores).
#define LS_DTYPE_CASE_(code, type, scalar, T, ...) \
  case ::layersel::code: {                          \
    using T = type;                                 \
    __VA_ARGS__;                                    \
    break;                                          \
  }
#define LS_SWITCH_DTYPE(code, T, ...)         \
  switch (code) {                             \
    LS_DTYPES(LS_DTYPE_CASE_, T, __VA_ARGS__) \
    default:                                  \
      break;                                  \
  }
#define LS_SWITCH_FLOAT_DTYPE(code, T, ...)         \
  switch (code) {                                   \
    LS_FLOAT_DTYPES(LS_DTYPE_CASE_, T, __VA_ARGS__) \
    default:                                        \
      break;                                        \
  }
