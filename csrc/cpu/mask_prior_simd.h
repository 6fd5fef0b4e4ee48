// The coded wire's prior (maskcode::prepare_prior, common/mask_coder.h) in
// AVX2 and AVX-512, for its whole words: the same quantization, bit words and
// fingerprint, bit for bit. No torch here: the C++ test compares every level
// with the scalar loop (csrc/tests/test_mask_coder.cpp).
//
// Why: every client and the server quantize every layer's theta each round,
// and the scalar loop (a double conversion, three variable shifts and a 64-bit
// multiply an element) cost more than sampling and coding the masks together.
//
// Quantization. Double theta: the same IEEE operations as maskcode::quantize
// (times 2^15, plus 1/2, truncated), so the bits are the scalar code's. Float
// theta, in float: y = theta * 2^15 is exact (a power of two, no overflow),
// w = trunc(y) and y - w are exact (w <= y < w + 1), so w + (y - w >= 1/2) is
// floor(y + 1/2) exactly; and so is the scalar code's double y + 1/2 then
// truncated: for y >= 2^-30 the sum is exact (y's 24 significant bits end no
// lower than the sum's 53 do), and below it any rounding stays in [1/2, 1).
// The C++ test compares the two on every float32 pattern near a step or tie
// (all 2^32 patterns agree, an exhaustive run too long for the test).
//
// The bit words are comparisons of the 16-bit q (16 or 32 lanes a vector)
// packed into masks (movemask, AVX-512's mask registers). The fingerprint
// (common/fingerprint.h) of words [b, b + m),
//   sum_j (2(b + j) + 1) sum_i (q[j][i] + 1) W[i]   (mod 2^64),
// is a sum over lanes i of W[i] times per-lane sums over the words, so the loop
// keeps two 32-bit sums a lane, s[i] = sum_j q[j][i] and
// p[i] = sum_k sum_{j <= k} q[j][i] = sum_j (m - j) q[j][i], two additions a
// lane a word; then sum_j j q[j][i] = m s[i] - p[i], and the terms of the +1
// are a closed form. Both sums stay below 2^32 for m <= kSimdBlockWords.
#pragma once
#include <cstdint>

#include "../common/fingerprint.h"
#include "../common/mask_coder.h"
#include "cpu_features.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define LS_HAVE_PRIOR_SIMD 1
#include <immintrin.h>
#endif

namespace layersel::maskcode {

// The levels of cpu_simd_support() (cpu_features.h); 0: the scalar loop.
constexpr int kPriorAvx2 = 1, kPriorAvx512 = 2;

// Words a block of the SIMD loops: s[i] <= m 2^15 and p[i] <= m (m + 1) / 2 * 2^15 < 2^32.
constexpr int64_t kSimdBlockWords = 256;

// The fingerprint share of words [b, b + m) (all whole) from the per-lane sums
// of q described above.
inline uint64_t fingerprint_of_sums(const uint32_t* s, const uint32_t* p, int64_t b, int64_t m) {
  const uint64_t odd = 2 * static_cast<uint64_t>(b) + 1, mm = static_cast<uint64_t>(m);
  uint64_t part = 0, weights = 0;
  for (int i = 0; i < 64; ++i) {
    const uint64_t w = fingerprint_weight_lo(i);
    part += w * (odd * s[i] + 2 * (mm * s[i] - p[i]));
    weights += w;
  }
  // The +1 of every element: sum_j (2(b + j) + 1) = m (2b + 1) + m (m - 1).
  return part + weights * (mm * odd + mm * (mm - 1));
}

#ifdef LS_HAVE_PRIOR_SIMD

#define LS_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
#define LS_AVX2 __attribute__((target("avx2")))

// Words [w0, w1) of a prior, every one of 64 elements (prepare_prior's
// contract otherwise).
template <typename T>
LS_AVX512 bool prior_words_avx512(const T* theta, int64_t w0, int64_t w1, uint16_t* q, uint64_t* certain,
                                  uint64_t* expected, uint64_t* half, uint64_t* fp) {
  const __m512d scale = _mm512_set1_pd(static_cast<double>(kScale)), rounding = _mm512_set1_pd(0.5);
  const __m512 scale_f = _mm512_set1_ps(static_cast<float>(kScale)), half_f = _mm512_set1_ps(0.5f);
  const __m512i minus_one = _mm512_set1_epi32(-1);
  const __m512i low15 = _mm512_set1_epi16(0x7FFF);
  const __m512i one_q = _mm512_set1_epi16(static_cast<int16_t>(kScale)), half_q = _mm512_set1_epi16(kHalf);
  uint32_t good_all = 0xFFFF;
  uint64_t sum = 0;
  for (int64_t b = w0; b < w1; b += kSimdBlockWords) {
    const int64_t m = w1 - b < kSimdBlockWords ? w1 - b : kSimdBlockWords;
    __m512i s[4], p[4];  // lanes 16g .. 16g + 15 of the words
    for (int g = 0; g < 4; ++g) s[g] = p[g] = _mm512_setzero_si512();
    for (int64_t w = b; w < b + m; ++w) {
      const T* t = theta + 64 * w;
      __m256i q16[4];
      for (int g = 0; g < 4; ++g) {
        __m512i q32;
        if constexpr (sizeof(T) == 4) {
          const __m512 x = _mm512_loadu_ps(t + 16 * g);
          const __mmask16 good = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), x,
                                                         _mm512_set1_ps(1.0f), _CMP_LE_OQ);
          good_all &= good;
          const __m512 y = _mm512_maskz_mul_ps(good, x, scale_f);  // not a probability: quantized as 0
          const __m512i whole = _mm512_cvttps_epi32(y);
          const __m512 frac = _mm512_sub_ps(y, _mm512_cvtepi32_ps(whole));
          q32 = _mm512_mask_sub_epi32(whole, _mm512_cmp_ps_mask(frac, half_f, _CMP_GE_OQ), whole, minus_one);
        } else {
          __m512d lo = _mm512_loadu_pd(t + 16 * g), hi = _mm512_loadu_pd(t + 16 * g + 8);
          const __m512d one = _mm512_set1_pd(1.0), zero = _mm512_setzero_pd();
          const __mmask8 glo = _mm512_mask_cmp_pd_mask(_mm512_cmp_pd_mask(lo, zero, _CMP_GE_OQ), lo, one, _CMP_LE_OQ);
          const __mmask8 ghi = _mm512_mask_cmp_pd_mask(_mm512_cmp_pd_mask(hi, zero, _CMP_GE_OQ), hi, one, _CMP_LE_OQ);
          good_all &= static_cast<uint32_t>(glo) | static_cast<uint32_t>(ghi) << 8;
          lo = _mm512_maskz_mov_pd(glo, lo);
          hi = _mm512_maskz_mov_pd(ghi, hi);
          const __m256i a = _mm512_cvttpd_epi32(_mm512_add_pd(_mm512_mul_pd(lo, scale), rounding));
          const __m256i c = _mm512_cvttpd_epi32(_mm512_add_pd(_mm512_mul_pd(hi, scale), rounding));
          q32 = _mm512_inserti64x4(_mm512_castsi256_si512(a), c, 1);
        }
        s[g] = _mm512_add_epi32(s[g], q32);
        p[g] = _mm512_add_epi32(p[g], s[g]);
        q16[g] = _mm512_cvtepi32_epi16(q32);
      }
      const __m512i lo32 = _mm512_inserti64x4(_mm512_castsi256_si512(q16[0]), q16[1], 1);  // elements 0 .. 31
      const __m512i hi32 = _mm512_inserti64x4(_mm512_castsi256_si512(q16[2]), q16[3], 1);  // 32 .. 63
      _mm512_storeu_si512(q + 64 * w, lo32);
      _mm512_storeu_si512(q + 64 * w + 32, hi32);
      // q <= 2^15, so q & (2^15 - 1) == 0 exactly when q is 0 or 2^15.
      certain[w] = _cvtmask64_u64(_mm512_kunpackd(_mm512_testn_epi16_mask(hi32, low15),
                                                  _mm512_testn_epi16_mask(lo32, low15)));
      expected[w] = _cvtmask64_u64(_mm512_kunpackd(_mm512_cmpeq_epi16_mask(hi32, one_q),
                                                   _mm512_cmpeq_epi16_mask(lo32, one_q)));
      half[w] = _cvtmask64_u64(_mm512_kunpackd(_mm512_cmpeq_epi16_mask(hi32, half_q),
                                               _mm512_cmpeq_epi16_mask(lo32, half_q)));
    }
    alignas(64) uint32_t sl[64], pl[64];
    for (int g = 0; g < 4; ++g) {
      _mm512_store_si512(sl + 16 * g, s[g]);
      _mm512_store_si512(pl + 16 * g, p[g]);
    }
    sum += fingerprint_of_sums(sl, pl, b, m);
  }
  *fp += sum;
  return good_all == 0xFFFF;
}

// 16 lanes of 0 / -1 (a comparison's) and 16 more as 32 bits, in lane order;
// and 64 such lanes as a word.
LS_AVX2 inline __attribute__((always_inline)) uint32_t lane_bits16(__m256i a, __m256i b) {
  // packs works within 128-bit halves (quads a.lo, b.lo, a.hi, b.hi): put them back in order.
  return static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xD8)));
}
LS_AVX2 inline __attribute__((always_inline)) uint64_t lane_bits64(const __m256i* v) {
  return static_cast<uint64_t>(lane_bits16(v[0], v[1])) | static_cast<uint64_t>(lane_bits16(v[2], v[3])) << 32;
}

template <typename T>
LS_AVX2 bool prior_words_avx2(const T* theta, int64_t w0, int64_t w1, uint16_t* q, uint64_t* certain,
                              uint64_t* expected, uint64_t* half, uint64_t* fp) {
  const __m256d scale = _mm256_set1_pd(static_cast<double>(kScale)), rounding = _mm256_set1_pd(0.5);
  const __m256 scale_f = _mm256_set1_ps(static_cast<float>(kScale)), half_f = _mm256_set1_ps(0.5f);
  const __m256i low15 = _mm256_set1_epi16(0x7FFF), zero16 = _mm256_setzero_si256();
  const __m256i one_q = _mm256_set1_epi16(static_cast<int16_t>(kScale)), half_q = _mm256_set1_epi16(kHalf);
  int good_all = 0xFF;
  uint64_t sum = 0;
  for (int64_t b = w0; b < w1; b += kSimdBlockWords) {
    const int64_t m = w1 - b < kSimdBlockWords ? w1 - b : kSimdBlockWords;
    __m256i s[8], p[8];  // lanes 8g .. 8g + 7 of the words
    for (int g = 0; g < 8; ++g) s[g] = p[g] = _mm256_setzero_si256();
    for (int64_t w = b; w < b + m; ++w) {
      const T* t = theta + 64 * w;
      __m128i q16[8];
      for (int g = 0; g < 8; ++g) {
        __m256i q32;
        if constexpr (sizeof(T) == 4) {
          const __m256 x = _mm256_loadu_ps(t + 8 * g);
          const __m256 good = _mm256_and_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ),
                                            _mm256_cmp_ps(x, _mm256_set1_ps(1.0f), _CMP_LE_OQ));
          good_all &= _mm256_movemask_ps(good);
          const __m256 y = _mm256_and_ps(_mm256_mul_ps(x, scale_f), good);  // not a probability: quantized as 0
          const __m256i whole = _mm256_cvttps_epi32(y);
          const __m256 frac = _mm256_sub_ps(y, _mm256_cvtepi32_ps(whole));
          q32 = _mm256_sub_epi32(whole, _mm256_castps_si256(_mm256_cmp_ps(frac, half_f, _CMP_GE_OQ)));  // + 1
        } else {
          __m256d lo = _mm256_loadu_pd(t + 8 * g), hi = _mm256_loadu_pd(t + 8 * g + 4);
          const __m256d one = _mm256_set1_pd(1.0), zero = _mm256_setzero_pd();
          const __m256d glo = _mm256_and_pd(_mm256_cmp_pd(lo, zero, _CMP_GE_OQ), _mm256_cmp_pd(lo, one, _CMP_LE_OQ));
          const __m256d ghi = _mm256_and_pd(_mm256_cmp_pd(hi, zero, _CMP_GE_OQ), _mm256_cmp_pd(hi, one, _CMP_LE_OQ));
          good_all &= _mm256_movemask_pd(glo) | _mm256_movemask_pd(ghi) << 4;
          lo = _mm256_and_pd(lo, glo);
          hi = _mm256_and_pd(hi, ghi);
          const __m128i a = _mm256_cvttpd_epi32(_mm256_add_pd(_mm256_mul_pd(lo, scale), rounding));
          const __m128i c = _mm256_cvttpd_epi32(_mm256_add_pd(_mm256_mul_pd(hi, scale), rounding));
          q32 = _mm256_inserti128_si256(_mm256_castsi128_si256(a), c, 1);
        }
        s[g] = _mm256_add_epi32(s[g], q32);
        p[g] = _mm256_add_epi32(p[g], s[g]);
        // 0 <= q <= 2^15: no saturation.
        q16[g] = _mm_packus_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1));
      }
      __m256i v[4];  // elements 16k .. 16k + 15
      for (int k = 0; k < 4; ++k) {
        v[k] = _mm256_inserti128_si256(_mm256_castsi128_si256(q16[2 * k]), q16[2 * k + 1], 1);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 64 * w + 16 * k), v[k]);
      }
      __m256i c[4], e[4], h[4];
      for (int k = 0; k < 4; ++k) {
        c[k] = _mm256_cmpeq_epi16(_mm256_and_si256(v[k], low15), zero16);  // q is 0 or 2^15 (q <= 2^15)
        e[k] = _mm256_cmpeq_epi16(v[k], one_q);
        h[k] = _mm256_cmpeq_epi16(v[k], half_q);
      }
      certain[w] = lane_bits64(c);
      expected[w] = lane_bits64(e);
      half[w] = lane_bits64(h);
    }
    alignas(32) uint32_t sl[64], pl[64];
    for (int g = 0; g < 8; ++g) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(sl + 8 * g), s[g]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(pl + 8 * g), p[g]);
    }
    sum += fingerprint_of_sums(sl, pl, b, m);
  }
  *fp += sum;
  return good_all == 0xFF;
}

#undef LS_AVX512
#undef LS_AVX2
#endif

// prepare_prior at a SIMD level (at most cpu_simd_support()): the whole
// words in the vector loop, a layer's last partial word in the scalar one.
template <typename T>
bool prepare_prior_at(int level, const T* theta, int64_t n, int64_t w0, int64_t w1, uint16_t* q, uint64_t* certain,
                      uint64_t* expected, uint64_t* half, uint64_t* fp) {
  bool ok = true;
  int64_t w = w0;
#ifdef LS_HAVE_PRIOR_SIMD
  const int64_t whole = w1 < n / 64 ? w1 : n / 64;
  if (level >= kPriorAvx2 && whole > w0) {
    ok = level == kPriorAvx512 ? prior_words_avx512(theta, w0, whole, q, certain, expected, half, fp)
                               : prior_words_avx2(theta, w0, whole, q, certain, expected, half, fp);
    w = whole;
  }
#else
  (void)level;
#endif
  const bool rest = prepare_prior(theta, n, w, w1, q, certain, expected, half, fp);
  return ok && rest;
}

}  // namespace layersel::maskcode
