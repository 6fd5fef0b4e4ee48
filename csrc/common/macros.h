// Host/device portability macros shared by the CPU and CUDA backends.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LS_HD __host__ __device__ __forceinline__
#else
// always_inline: the CPU hot loops are cloned per ISA (target_clones), and a
// helper left out of line would run the baseline code and block vectorisation.
#define LS_HD inline __attribute__((always_inline))
#endif

// Host and device like LS_HD, but only `inline` on the host (where LS_HD forces
// inlining): for dispatchers such as with_score_kind, whose host callers hold
// the hot loops themselves.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define LS_HD_INLINE __host__ __device__ inline
#else
#define LS_HD_INLINE inline
#endif

// Exactly rounded float arithmetic that no compiler may contract into FMA.
// The Bernoulli comparison must give the same bits on CPU and GPU, so every
// step of it goes through these (nvcc contracts a*b+c by default; the host
// side is compiled with -ffp-contract=off).
#if defined(__CUDA_ARCH__)
#define LS_FMUL(a, b) __fmul_rn((a), (b))
#define LS_FADD(a, b) __fadd_rn((a), (b))
#define LS_FSUB(a, b) __fsub_rn((a), (b))
#define LS_FDIV(a, b) __fdiv_rn((a), (b))
#else
#define LS_FMUL(a, b) ((a) * (b))
#define LS_FADD(a, b) ((a) + (b))
#define LS_FSUB(a, b) ((a) - (b))
#define LS_FDIV(a, b) ((a) / (b))
#endif
