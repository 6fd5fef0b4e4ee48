// AVX2 form of csrc/common/philox.h + bernoulli.h for the CPU mask kernel:
// eight Philox blocks (32 elements) per step. The same operations in the same
// order (no FMA: this code is compiled for "avx2" only, with -ffp-contract=off),
// so the masks are bit-identical to the scalar shared math and to CUDA; the
// tests compare them on every run.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LS_HAVE_AVX2_PATH 1
#include <immintrin.h>

#include <cstdint>

#include "../common/philox.h"

namespace layersel {
namespace avx2 {

#define LS_AVX2 __attribute__((target("avx2"), always_inline)) inline

// hi and lo 32 bits of m * a, lane by lane.
LS_AVX2 void mulhilo(__m256i m, __m256i a, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);   // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Words of blocks first .. first + 7, in element order: out[q] holds elements
// 8q .. 8q + 7 of the 32 (element 4j + lane uses word `lane` of block j).
LS_AVX2 void philox8(const PhiloxStream& s, uint64_t first, __m256i out[4]) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // first + j never wraps the low word for j < 8 when first % 8 == 0 (the caller aligns).
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(first))), idx);
  __m256i c1 = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(first >> 32)));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  const __m256i m0 = _mm256_set1_epi32(static_cast<int32_t>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int32_t>(0xCD9E8D57u));
  uint32_t k0 = s.k0, k1 = s.k1;
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo(m0, c0, hi0, lo0);
    mulhilo(m1, c2, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int32_t>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int32_t>(k1)));
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // 4 x 8 transpose to element order.
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
  const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2);  // blocks 0 | 4
  const __m256i u1 = _mm256_unpackhi_epi64(t0, t2);  // blocks 1 | 5
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3);  // blocks 2 | 6
  const __m256i u3 = _mm256_unpackhi_epi64(t1, t3);  // blocks 3 | 7
  out[0] = _mm256_permute2x128_si256(u0, u1, 0x20);  // blocks 0, 1
  out[1] = _mm256_permute2x128_si256(u2, u3, 0x20);  // blocks 2, 3
  out[2] = _mm256_permute2x128_si256(u0, u1, 0x31);  // blocks 4, 5
  out[3] = _mm256_permute2x128_si256(u2, u3, 0x31);  // blocks 6, 7
}

// bernoulli_sample(score, word) for 8 lanes; returns an all-ones lane where 1.
LS_AVX2 __m256 sample8(__m256 score, __m256i word) {
  const __m256 ordered = _mm256_cmp_ps(score, score, _CMP_ORD_Q);
  const __m256 neg = _mm256_xor_ps(score, _mm256_set1_ps(-0.0f));
  __m256 x = _mm256_blendv_ps(_mm256_set1_ps(87.0f), neg, ordered);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  x = _mm256_min_ps(x, _mm256_set1_ps(87.0f));
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 k = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), magic), magic);
  const __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(k, _mm256_set1_ps(0.693359375f))),
                                 _mm256_mul_ps(k, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(0.5f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(k), _mm256_set1_epi32(127));
  const __m256 ex = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
  const __m256 prob = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), ex));
  const __m256i odd = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(word, 9), 1), _mm256_set1_epi32(1));
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(odd), _mm256_set1_ps(1.0f / 16777216.0f));
  return _mm256_cmp_ps(u, prob, _CMP_LT_OQ);
}

// 32 elements whose global indices start at a multiple of 32: masks (0/1) of
// scores `x` (already float) written to `out` as bytes.
LS_AVX2 void sample32(const PhiloxStream& s, uint64_t first_block, const float* x, uint8_t* out) {
  __m256i words[4];
  philox8(s, first_block, words);
  for (int q = 0; q < 4; ++q) {
    const __m256 hit = sample8(_mm256_loadu_ps(x + 8 * q), words[q]);
    const uint32_t bits = static_cast<uint32_t>(_mm256_movemask_ps(hit));
    for (int l = 0; l < 8; ++l) out[8 * q + l] = static_cast<uint8_t>((bits >> l) & 1u);
  }
}

#undef LS_AVX2

}  // namespace avx2
}  // namespace layersel
#endif
