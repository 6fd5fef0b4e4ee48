// The SIMD this CPU runs, for the kernels written for AVX2 and AVX-512 (the
// mask kernel, the coded wire's prior). No torch here: the C++ tests use it.
#pragma once

namespace layersel {

// 2: AVX-512 (F, BW, DQ, VL), 1: AVX2, 0: neither, or a build without those
// kernels (they are written for gcc on x86-64).
inline int cpu_simd_support() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return 2;
  return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
  return 0;
#endif
}

}  // namespace layersel
