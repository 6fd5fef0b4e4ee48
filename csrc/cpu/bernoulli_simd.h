// SIMD forms of csrc/common/philox.h + bernoulli.h for the CPU mask kernel,
// for AVX2 (8 lanes) and AVX-512 (16 lanes). Each ISA namespace defines a
// dozen primitives; the Philox rounds, the exp polynomial and the comparison
// are written once, in bernoulli_simd_body.inc, included into both. The same
// operations in the same order as the scalar shared math (no FMA: these
// targets do not enable it, and -ffp-contract=off), so masks are bit-identical
// to it and to CUDA; the tests compare them on every run.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LS_HAVE_SIMD_PATH 1
#include <immintrin.h>

#include <cstdint>

#include "../common/philox.h"

namespace layersel {

namespace avx2 {
#define LS_SIMD __attribute__((target("avx2"), always_inline)) inline
constexpr int kLanes = 8;
using VI = __m256i;
using VF = __m256;
using VB = __m256;  // comparison result: all-ones lanes
LS_SIMD VI set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int32_t>(v)); }
LS_SIMD VF set1f(float v) { return _mm256_set1_ps(v); }
LS_SIMD VI iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
LS_SIMD VI add_i(VI a, VI b) { return _mm256_add_epi32(a, b); }
LS_SIMD VI xor_i(VI a, VI b) { return _mm256_xor_si256(a, b); }
LS_SIMD VI or_i(VI a, VI b) { return _mm256_or_si256(a, b); }
LS_SIMD VI srli(VI a, int n) { return _mm256_srli_epi32(a, n); }
LS_SIMD VI slli(VI a, int n) { return _mm256_slli_epi32(a, n); }
LS_SIMD void mulhilo(VI m, VI a, VI& hi, VI& lo) {
  const VI even = _mm256_mul_epu32(a, m);                        // lanes 0, 2, 4, 6
  const VI odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
LS_SIMD VF add(VF a, VF b) { return _mm256_add_ps(a, b); }
LS_SIMD VF sub(VF a, VF b) { return _mm256_sub_ps(a, b); }
LS_SIMD VF mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
LS_SIMD VF div(VF a, VF b) { return _mm256_div_ps(a, b); }
LS_SIMD VF maxf(VF a, VF b) { return _mm256_max_ps(a, b); }
LS_SIMD VF minf(VF a, VF b) { return _mm256_min_ps(a, b); }
LS_SIMD VF negate(VF a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
LS_SIMD VF select_ordered(VF s, VF if_ordered, VF if_nan) {
  return _mm256_blendv_ps(if_nan, if_ordered, _mm256_cmp_ps(s, s, _CMP_ORD_Q));
}
LS_SIMD VI to_int(VF a) { return _mm256_cvttps_epi32(a); }
LS_SIMD VF to_float(VI a) { return _mm256_cvtepi32_ps(a); }
LS_SIMD VF as_float(VI a) { return _mm256_castsi256_ps(a); }
LS_SIMD uint32_t less_bits(VF a, VF b) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ)));
}
LS_SIMD VF loadf(const float* p) { return _mm256_loadu_ps(p); }
// 4 x 8 words (word-major) to element order: out[q] = elements 8q .. 8q + 7.
LS_SIMD void to_element_order(VI c0, VI c1, VI c2, VI c3, VI out[4]) {
  const VI t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
  const VI t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
  const VI u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);  // blocks 0|4, 1|5
  const VI u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);  // blocks 2|6, 3|7
  out[0] = _mm256_permute2x128_si256(u0, u1, 0x20);
  out[1] = _mm256_permute2x128_si256(u2, u3, 0x20);
  out[2] = _mm256_permute2x128_si256(u0, u1, 0x31);
  out[3] = _mm256_permute2x128_si256(u2, u3, 0x31);
}
// Lane masks (bit l: lane l) as kLanes 0/1 integers of M's size, one vector store.
template <typename M>
LS_SIMD void store_mask(uint32_t bits, M* out) {
  const VI v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(bits)), iota()), set1(1u));
  if constexpr (sizeof(M) == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out) + 1, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  } else if constexpr (sizeof(M) == 4) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), v);
  } else {
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));  // 8 x 16 bits
    if constexpr (sizeof(M) == 2) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), w);
    } else {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(w, w));
    }
  }
}
#include "bernoulli_simd_body.inc"
#undef LS_SIMD
}  // namespace avx2

namespace avx512 {
#define LS_SIMD __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"), always_inline)) inline
constexpr int kLanes = 16;
using VI = __m512i;
using VF = __m512;
LS_SIMD VI set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int32_t>(v)); }
LS_SIMD VF set1f(float v) { return _mm512_set1_ps(v); }
LS_SIMD VI iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
LS_SIMD VI add_i(VI a, VI b) { return _mm512_add_epi32(a, b); }
LS_SIMD VI xor_i(VI a, VI b) { return _mm512_xor_si512(a, b); }
LS_SIMD VI or_i(VI a, VI b) { return _mm512_or_si512(a, b); }
LS_SIMD VI srli(VI a, int n) { return _mm512_srli_epi32(a, n); }
LS_SIMD VI slli(VI a, int n) { return _mm512_slli_epi32(a, n); }
LS_SIMD void mulhilo(VI m, VI a, VI& hi, VI& lo) {
  const VI even = _mm512_mul_epu32(a, m);
  const VI odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
LS_SIMD VF add(VF a, VF b) { return _mm512_add_ps(a, b); }
LS_SIMD VF sub(VF a, VF b) { return _mm512_sub_ps(a, b); }
LS_SIMD VF mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
LS_SIMD VF div(VF a, VF b) { return _mm512_div_ps(a, b); }
LS_SIMD VF maxf(VF a, VF b) { return _mm512_max_ps(a, b); }
LS_SIMD VF minf(VF a, VF b) { return _mm512_min_ps(a, b); }
LS_SIMD VF negate(VF a) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN))); }
LS_SIMD VF select_ordered(VF s, VF if_ordered, VF if_nan) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, s, _CMP_ORD_Q), if_nan, if_ordered);
}
LS_SIMD VI to_int(VF a) { return _mm512_cvttps_epi32(a); }
LS_SIMD VF to_float(VI a) { return _mm512_cvtepi32_ps(a); }
LS_SIMD VF as_float(VI a) { return _mm512_castsi512_ps(a); }
LS_SIMD uint32_t less_bits(VF a, VF b) { return static_cast<uint32_t>(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ)); }
LS_SIMD VF loadf(const float* p) { return _mm512_loadu_ps(p); }
// 4 x 16 words (word-major) to element order: out[q] = elements 16q .. 16q + 15.
LS_SIMD void to_element_order(VI c0, VI c1, VI c2, VI c3, VI out[4]) {
  const VI t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
  const VI t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
  const VI u0 = _mm512_unpacklo_epi64(t0, t2);  // blocks 0 | 4 | 8 | 12
  const VI u1 = _mm512_unpackhi_epi64(t0, t2);  // blocks 1 | 5 | 9 | 13
  const VI u2 = _mm512_unpacklo_epi64(t1, t3);  // blocks 2 | 6 | 10 | 14
  const VI u3 = _mm512_unpackhi_epi64(t1, t3);  // blocks 3 | 7 | 11 | 15
  const VI a = _mm512_shuffle_i32x4(u0, u1, 0x88), b = _mm512_shuffle_i32x4(u2, u3, 0x88);  // 0 8 1 9 | 2 10 3 11
  const VI c = _mm512_shuffle_i32x4(u0, u1, 0xDD), d = _mm512_shuffle_i32x4(u2, u3, 0xDD);  // 4 12 5 13 | 6 14 7 15
  out[0] = _mm512_shuffle_i32x4(a, b, 0x88);  // blocks 0 1 2 3
  out[1] = _mm512_shuffle_i32x4(c, d, 0x88);  // 4 5 6 7
  out[2] = _mm512_shuffle_i32x4(a, b, 0xDD);  // 8 9 10 11
  out[3] = _mm512_shuffle_i32x4(c, d, 0xDD);  // 12 13 14 15
}
// Lane masks (bit l: lane l) as kLanes 0/1 integers of M's size, vector stores.
template <typename M>
LS_SIMD void store_mask(uint32_t bits, M* out) {
  const __mmask16 m = static_cast<__mmask16>(bits);
  if constexpr (sizeof(M) == 8) {
    _mm512_storeu_si512(out, _mm512_maskz_set1_epi64(static_cast<__mmask8>(m), 1));
    _mm512_storeu_si512(out + 8, _mm512_maskz_set1_epi64(static_cast<__mmask8>(m >> 8), 1));
  } else if constexpr (sizeof(M) == 4) {
    _mm512_storeu_si512(out, _mm512_maskz_set1_epi32(m, 1));
  } else if constexpr (sizeof(M) == 2) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_maskz_set1_epi16(m, 1));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_maskz_set1_epi8(m, 1));
  }
}
#include "bernoulli_simd_body.inc"
#undef LS_SIMD
}  // namespace avx512

}  // namespace layersel
#endif
