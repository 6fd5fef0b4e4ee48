// The coded wire's lane loops (maskcode::ScalarLanes, common/mask_coder.h) in
// AVX-512 (four vectors of 16 rANS states, one for each 16 elements of a
// piece) and in AVX2 (eight vectors of 8), the same bytes. No torch here: the
// C++ test compares them on every stream it makes (csrc/tests/test_mask_coder.cpp).
//
// Why: one rANS state codes a symbol in about 25 instructions (finding the
// element, loading its q, the step, the renormalisation branch); a vector
// step codes up to 16 (8) in about as many, and the vectors of a piece are
// independent dependency chains.
//
// Decoding: the step in 32-bit lanes; the lanes whose state fell below 2^16
// take the next words in lane order (expanded from one load). Encoding: the
// lanes that must renormalise write their low words, in lane order, below the
// stream (compressed, one store); then the division, in float with an exact
// correction (divide()).
#pragma once
#include <cstdint>

#include "../common/mask_coder.h"
#include "cpu_features.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define LS_HAVE_LANES_SIMD 1
#include <immintrin.h>
#endif

namespace layersel::maskcode {

#ifdef LS_HAVE_LANES_SIMD

#define LS_LANES512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,bmi,bmi2,popcnt,lzcnt")))
#define LS_LANES512_INLINE LS_LANES512 inline
#define LS_LANES512_ALWAYS LS_LANES512 inline __attribute__((always_inline))

// Whether this CPU runs the loops below.
inline bool lanes_avx512_supported() {
  static const bool yes = cpu_simd_support() >= 2 && __builtin_cpu_supports("bmi2");
  return yes;
}

struct Avx512Lanes {
  static LS_LANES512_INLINE uint64_t extract(uint64_t v, uint64_t mask) { return _pext_u64(v, mask); }
  static LS_LANES512_INLINE uint64_t deposit(uint64_t v, uint64_t mask) { return _pdep_u64(v, mask); }

  // Vector k holds lanes 16k .. 16k + 15: a piece's elements 16k .. 16k + 15,
  // act the uncertain ones (only those are loaded).
  static LS_LANES512_ALWAYS __m512i load_q(const uint16_t* q, int k, __mmask16 act) {
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(act, q + 16 * k));
  }

  // One vector's decoding step: the bits, and in *next the states before renormalisation.
  static LS_LANES512_ALWAYS __mmask16 decode_step(__m512i x, __mmask16 act, __m512i one, __m512i* next) {
    const __m512i zero = _mm512_sub_epi32(_mm512_set1_epi32(static_cast<int>(kScale)), one);
    const __m512i slot = _mm512_and_si512(x, _mm512_set1_epi32(kScale - 1));
    const __mmask16 b = _mm512_mask_cmpge_epu32_mask(act, slot, zero);
    const __m512i start = _mm512_maskz_mov_epi32(b, zero), freq = _mm512_mask_blend_epi32(b, zero, one);
    *next = _mm512_sub_epi32(_mm512_add_epi32(_mm512_mullo_epi32(freq, _mm512_srli_epi32(x, kProbBits)), slot), start);
    return b;
  }
  // The renormalisation of a vector's lanes `act` in lane order from the words
  // at *in. Unchecked: at least 16 words are left (decode's run check).
  template <bool kChecked>
  static LS_LANES512_ALWAYS void refill(__m512i& x, __mmask16 act, __m512i next, const uint8_t** in, int64_t* left,
                                        bool* bad) {
    const __mmask16 renorm = _mm512_mask_cmplt_epu32_mask(act, next, _mm512_set1_epi32(static_cast<int>(kLow)));
    const int64_t need = _mm_popcnt_u32(renorm);
    __m512i w;
    if (kChecked) {
      const __mmask16 avail = *left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << *left) - 1);  // past the end: 0
      w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(avail, *in));
    } else {
      w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(*in)));
    }
    next = _mm512_mask_or_epi32(next, renorm, _mm512_slli_epi32(next, 16), _mm512_maskz_expand_epi32(renorm, w));
    const int64_t took = !kChecked || need < *left ? need : *left;
    if (kChecked) *bad |= need > *left;
    *in += 2 * took;
    *left -= took;
    x = next;  // an inactive lane's step (q = 0: frequency 2^15, no renormalisation) leaves it as it was
  }

  // A piece's steps take at most 64 words: a run with 64 a piece left needs no bounds checks.
  static LS_LANES512 inline void decode(LaneStream& ls, const LanePiece* p, int64_t n, uint64_t* bits) {
    if (ls.left >= kLanes * n) {
      decode_run<false>(ls, p, n, bits);
    } else {
      decode_run<true>(ls, p, n, bits);
    }
  }
  template <bool kChecked>
  static LS_LANES512_INLINE void decode_run(LaneStream& ls, const LanePiece* p, int64_t n, uint64_t* bits) {
    __m512i x[4];
    for (int k = 0; k < 4; ++k) x[k] = _mm512_loadu_si512(ls.x + 16 * k);
    const uint8_t* in = ls.in;
    int64_t left = ls.left;
    bool bad = false;
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t u = p[i].u;
      uint64_t v = 0;
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const auto act = static_cast<__mmask16>(u >> (16 * k));
        if (!act) continue;
        __m512i next;
        const __mmask16 b = decode_step(x[k], act, load_q(p[i].q, k, act), &next);
        refill<kChecked>(x[k], act, next, &in, &left, &bad);
        v |= static_cast<uint64_t>(b) << (16 * k);
      }
      bits[i] = v;
    }
    for (int k = 0; k < 4; ++k) _mm512_storeu_si512(ls.x + 16 * k, x[k]);
    ls.in = in;
    ls.left = left;
    ls.bad |= bad;
  }

  // floor(y / f) and y mod f (y < 2^32, 0 < f <= 2^15, y / f < 2^17), in
  // float, then corrected exactly. With r0 = (1 + e) / f from the 14-bit
  // estimate (|e| < 2^-14), the Newton step r0 + r0 (1 - 2^-19 - f r0) gives
  // r = (1 - 2^-19 - e^2 - 2^-19 e) / f, plus a rounding below 2^-24: below
  // 1 / f by between 2^-19.2 and 2^-18.9 relatively. y rounded to float times
  // r, rounded, is so below y / f by a relative 2^-19.3 to 2^-18.8, under 0.29
  // for a quotient below 2^17: its integer part is the floor or one less, which
  // the remainder (exact in 32-bit lanes, in [0, 2f)) says and corrects.
  static LS_LANES512_ALWAYS __m512i divide(__m512i y, __m512i f, __m512i* rem) {
    const __m512 ff = _mm512_cvtepu32_ps(f);
    __m512 r = _mm512_rcp14_ps(ff);
    r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(ff, r, _mm512_set1_ps(1.0f - 0x1p-19f)), r);
    __m512i d = _mm512_cvttps_epu32(_mm512_mul_ps(_mm512_cvtepu32_ps(y), r));
    const __m512i m = _mm512_sub_epi32(y, _mm512_mullo_epi32(d, f));
    const __mmask16 under = _mm512_cmpge_epu32_mask(m, f);
    d = _mm512_mask_add_epi32(d, under, d, _mm512_set1_epi32(1));
    *rem = _mm512_mask_sub_epi32(m, under, m, f);
    return d;
  }

  // One vector's encoding step for the bits b of its active lanes: their
  // renormalisation words below *out, in lane order, then the division.
  // Unchecked: at least 16 words of room are left (encode's run check).
  template <bool kChecked>
  static LS_LANES512_ALWAYS void encode_step(__m512i& x, __mmask16 act, __mmask16 b, __m512i one, uint16_t* begin,
                                             uint16_t** out, bool* overflow) {
    const __m512i zero = _mm512_sub_epi32(_mm512_set1_epi32(static_cast<int>(kScale)), one);  // inactive: 2^15
    const __m512i start = _mm512_maskz_mov_epi32(b, zero), freq = _mm512_mask_blend_epi32(b, zero, one);
    const __mmask16 renorm = _mm512_mask_cmpge_epu32_mask(act, x, _mm512_slli_epi32(freq, 17));
    const int need = _mm_popcnt_u32(renorm);
    if (!kChecked || *out - begin >= need) {
      *out -= need;
      _mm256_mask_storeu_epi16(*out, static_cast<__mmask16>((1u << need) - 1),
                               _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(renorm, x)));
    } else {
      *overflow = true;
    }
    const __m512i y = _mm512_mask_srli_epi32(x, renorm, x, 16);
    __m512i rem;
    const __m512i d = divide(y, freq, &rem);
    // An inactive lane (q = 0: frequency 2^15, start 0, no renormalisation) steps to itself.
    x = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(d, kProbBits), rem), start);
  }

  // As decode: a run with room for 64 words a piece needs no bounds checks.
  static LS_LANES512 inline void encode(uint32_t* xs, const LanePiece* p, int64_t n, uint16_t* begin, uint16_t** out,
                                        bool* overflow) {
    if (*out - begin >= kLanes * n) {
      encode_run<false>(xs, p, n, begin, out, overflow);
    } else {
      encode_run<true>(xs, p, n, begin, out, overflow);
    }
  }
  template <bool kChecked>
  static LS_LANES512_INLINE void encode_run(uint32_t* xs, const LanePiece* p, int64_t n, uint16_t* begin,
                                            uint16_t** out, bool* overflow) {
    __m512i x[4];
    for (int k = 0; k < 4; ++k) x[k] = _mm512_loadu_si512(xs + 16 * k);
    uint16_t* o = *out;
    bool over = false;
    for (int64_t i = n - 1; i >= 0; --i) {
      const uint64_t u = p[i].u, m = p[i].m;
#pragma GCC unroll 4
      for (int k = 3; k >= 0; --k) {  // the decoder reads vector 0's words first: they go lowest
        const auto act = static_cast<__mmask16>(u >> (16 * k));
        if (!act) continue;
        encode_step<kChecked>(x[k], act, static_cast<__mmask16>(m >> (16 * k)) & act, load_q(p[i].q, k, act), begin,
                              &o, &over);
      }
    }
    for (int k = 0; k < 4; ++k) _mm512_storeu_si512(xs + 16 * k, x[k]);
    *out = o;
    *overflow |= over;
  }
};

// The block functions with these loops (the rest of them compiled for the same CPU).
LS_LANES512 inline uint16_t* encode_block_avx512(const Segment* segs, int nsegs, const uint8_t* bits, uint64_t bytes,
                                                 uint16_t* begin, uint16_t* end, uint64_t lane_min = kLaneMin,
                                                 int64_t lane_words_min = kLaneWordsMin) {
  return encode_block<Avx512Lanes>(segs, nsegs, bits, bytes, begin, end, lane_min, lane_words_min);
}
LS_LANES512 inline bool decode_block_avx512(const Segment* segs, int nsegs, const uint8_t* in, int64_t words,
                                            uint64_t* out) {
  return decode_block<Avx512Lanes>(segs, nsegs, in, words, out);
}

#define LS_LANES256 __attribute__((target("avx2,fma,bmi,bmi2,popcnt,lzcnt")))
#define LS_LANES256_ALWAYS LS_LANES256 inline __attribute__((always_inline))

// Whether this CPU runs the AVX2 loops below.
inline bool lanes_avx2_supported() {
  static const bool yes =
      cpu_simd_support() >= 1 && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("fma");
  return yes;
}

// The AVX2 lane loops: eight vectors of 8 states (vector k: lanes 8k .. 8k + 7),
// the same bytes. AVX2 has no mask registers, compress or expand: masks are
// vectors (and their movemask), and the words move by permutations from
// tables. Its q and word loads read whole vectors, so near an array's end
// they go through a zeroed copy.
struct Avx2Lanes {
  // For a mask m of 8 lanes: expand[m], the lane of each set lane's word among
  // the set lanes (its rank); top[m], for out position p the lane whose word
  // goes there when the set lanes' words fill the top positions in lane order.
  struct Tables {
    alignas(32) int32_t expand[256][8];
    alignas(32) int32_t top[256][8];
    Tables() {
      for (int m = 0; m < 256; ++m) {
        const int c = __builtin_popcount(m);
        int r = 0;
        for (int l = 0; l < 8; ++l) {
          expand[m][l] = (m >> l) & 1 ? r++ : 0;
          top[m][l] = 0;
        }
        r = 8 - c;
        for (int l = 0; l < 8; ++l) {
          if ((m >> l) & 1) top[m][r++] = l;
        }
      }
    }
  };
  static const Tables& tables() {
    static const Tables t;
    return t;
  }

  static LS_LANES256 inline uint64_t extract(uint64_t v, uint64_t mask) { return _pext_u64(v, mask); }
  static LS_LANES256 inline uint64_t deposit(uint64_t v, uint64_t mask) { return _pdep_u64(v, mask); }

  // Vector k's lanes as all-ones / zero from the half of a piece's 64 mask
  // bits that holds them, broadcast (once a piece, for the four vectors it covers).
  static LS_LANES256_ALWAYS __m256i lane_bits(__m256i half, int k) {
    const __m256i bit = _mm256_slli_epi32(_mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128), 8 * (k % 4));
    return _mm256_cmpeq_epi32(_mm256_and_si256(half, bit), bit);
  }
  static LS_LANES256_ALWAYS uint32_t bits_of(__m256i v) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(v)));
  }
  // 8 uint16 at p as 32-bit lanes; only the first `valid` of them lie in the array.
  static LS_LANES256_ALWAYS __m256i load8(const uint16_t* p, int64_t valid) {
    if (valid >= 8) return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    alignas(16) uint16_t copy[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < valid; ++j) copy[j] = p[j];
    return _mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(copy)));
  }

  static LS_LANES256 inline void decode(LaneStream& ls, const LanePiece* p, int64_t n, uint64_t* bits) {
    const Tables& t = tables();
    __m256i x[8];
    for (int k = 0; k < 8; ++k) x[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ls.x + 8 * k));
    const uint8_t* in = ls.in;
    int64_t left = ls.left;
    bool bad = false;
    const __m256i scale = _mm256_set1_epi32(static_cast<int>(kScale)), low15 = _mm256_set1_epi32(kScale - 1);
    const __m256i zero_v = _mm256_setzero_si256();
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t u = p[i].u;
      const __m256i u_half[2] = {_mm256_set1_epi32(static_cast<int>(u)), _mm256_set1_epi32(static_cast<int>(u >> 32))};
      uint64_t v = 0;
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const auto act8 = static_cast<uint32_t>(u >> (8 * k)) & 0xFF;
        if (!act8) continue;
        const __m256i act = lane_bits(u_half[k / 4], k);
        // q = 0 off the active lanes: frequency 2^15, a step to the same state
        const __m256i one = _mm256_and_si256(load8(p[i].q + 8 * k, p[i].count - 8 * k), act);
        const __m256i zero = _mm256_sub_epi32(scale, one);
        const __m256i slot = _mm256_and_si256(x[k], low15);
        const __m256i b = _mm256_cmpgt_epi32(slot, _mm256_sub_epi32(zero, _mm256_set1_epi32(1)));  // slot >= zero
        const __m256i start = _mm256_and_si256(b, zero), freq = _mm256_blendv_epi8(zero, one, b);
        __m256i next = _mm256_sub_epi32(
            _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srli_epi32(x[k], kProbBits)), slot), start);
        const __m256i renorm = _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_srli_epi32(next, 16), zero_v), act);
        const uint32_t rm = bits_of(renorm);
        const int64_t need = _mm_popcnt_u32(rm);
        const __m256i w = load8(reinterpret_cast<const uint16_t*>(in), left);  // past the end: 0
        const __m256i wexp = _mm256_permutevar8x32_epi32(
            w, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.expand[rm])));
        next = _mm256_blendv_epi8(next, _mm256_or_si256(_mm256_slli_epi32(next, 16), wexp), renorm);
        const int64_t took = need < left ? need : left;
        bad |= need > left;
        in += 2 * took;
        left -= took;
        x[k] = next;
        v |= static_cast<uint64_t>(bits_of(b)) << (8 * k);
      }
      bits[i] = v;
    }
    for (int k = 0; k < 8; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(ls.x + 8 * k), x[k]);
    ls.in = in;
    ls.left = left;
    ls.bad |= bad;
  }

  // As Avx512Lanes::divide, with the 12-bit estimate (relative error below
  // 1.5 * 2^-12): the Newton step leaves r below 1 / f by between 2^-19.1 and
  // 2^-18.8 relatively, and the quotient below y / f by under 0.32: the floor
  // or one less, corrected from the remainder. y >= 2^31 converts as y / 2
  // (its last bit is below float's precision there).
  static LS_LANES256_ALWAYS __m256i divide(__m256i y, __m256i f, __m256i* rem) {
    const __m256 ff = _mm256_cvtepi32_ps(f);
    __m256 r = _mm256_rcp_ps(ff);
    r = _mm256_fmadd_ps(r, _mm256_fnmadd_ps(ff, r, _mm256_set1_ps(1.0f - 0x1p-19f)), r);
    const __m256 yf = _mm256_blendv_ps(_mm256_cvtepi32_ps(y),
                                       _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(y, 1)), _mm256_set1_ps(2.0f)),
                                       _mm256_castsi256_ps(y));
    __m256i d = _mm256_cvttps_epi32(_mm256_mul_ps(yf, r));
    const __m256i m = _mm256_sub_epi32(y, _mm256_mullo_epi32(d, f));  // in [0, 2f)
    const __m256i under = _mm256_cmpgt_epi32(m, _mm256_sub_epi32(f, _mm256_set1_epi32(1)));
    d = _mm256_sub_epi32(d, under);
    *rem = _mm256_sub_epi32(m, _mm256_and_si256(under, f));
    return d;
  }

  static LS_LANES256 inline void encode(uint32_t* xs, const LanePiece* p, int64_t n, uint16_t* begin, uint16_t** out,
                                        bool* overflow) {
    const Tables& t = tables();
    __m256i x[8];
    for (int k = 0; k < 8; ++k) x[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + 8 * k));
    uint16_t* o = *out;
    bool over = false;
    const __m256i scale = _mm256_set1_epi32(static_cast<int>(kScale));
    // The low 16 bits of each 32-bit lane, in order, in the low 128 bits.
    const __m256i pick = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9,
                                          12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    for (int64_t i = n - 1; i >= 0; --i) {
      const uint64_t u = p[i].u, m = p[i].m & p[i].u;
      const __m256i u_half[2] = {_mm256_set1_epi32(static_cast<int>(u)), _mm256_set1_epi32(static_cast<int>(u >> 32))};
      const __m256i m_half[2] = {_mm256_set1_epi32(static_cast<int>(m)), _mm256_set1_epi32(static_cast<int>(m >> 32))};
#pragma GCC unroll 8
      for (int k = 7; k >= 0; --k) {  // the decoder reads the lower lanes' words first: they go lowest
        const auto act8 = static_cast<uint32_t>(u >> (8 * k)) & 0xFF;
        if (!act8) continue;
        const __m256i act = lane_bits(u_half[k / 4], k), b = lane_bits(m_half[k / 4], k);
        const __m256i one = _mm256_and_si256(load8(p[i].q + 8 * k, p[i].count - 8 * k), act);
        const __m256i zero = _mm256_sub_epi32(scale, one);  // inactive: 2^15, a step to the same state
        const __m256i start = _mm256_and_si256(b, zero), freq = _mm256_blendv_epi8(zero, one, b);
        // x >= freq << 17 as (x >> 17) >= freq, in signed lanes: both are at most 2^15
        const __m256i renorm = _mm256_andnot_si256(_mm256_cmpgt_epi32(freq, _mm256_srli_epi32(x[k], 17)), act);
        const uint32_t rm = bits_of(renorm);
        const int need = _mm_popcnt_u32(rm);
        // Whether any lane renormalises is a coin flip a step: the whole-vector store (its words at
        // the top, none when need is 0) runs either way rather than after a branch on it.
        if (o - begin >= 8) {
          const __m256i moved = _mm256_permutevar8x32_epi32(
              x[k], _mm256_load_si256(reinterpret_cast<const __m256i*>(t.top[rm])));
          const __m256i packed = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(moved, pick), 0x08);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o - 8), _mm256_castsi256_si128(packed));
          o -= need;
        } else if (o - begin >= need) {
          alignas(32) uint32_t lanes_x[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(lanes_x), x[k]);
          for (int l = 7; l >= 0; --l) {
            if ((rm >> l) & 1) *--o = static_cast<uint16_t>(lanes_x[l]);
          }
        } else {
          over = true;
        }
        const __m256i y = _mm256_blendv_epi8(x[k], _mm256_srli_epi32(x[k], 16), renorm);
        __m256i rem;
        const __m256i d = divide(y, freq, &rem);
        x[k] = _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(d, kProbBits), rem), start);
      }
    }
    for (int k = 0; k < 8; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(xs + 8 * k), x[k]);
    *out = o;
    *overflow |= over;
  }
};

LS_LANES256 inline uint16_t* encode_block_avx2(const Segment* segs, int nsegs, const uint8_t* bits, uint64_t bytes,
                                               uint16_t* begin, uint16_t* end, uint64_t lane_min = kLaneMin,
                                               int64_t lane_words_min = kLaneWordsMin) {
  return encode_block<Avx2Lanes>(segs, nsegs, bits, bytes, begin, end, lane_min, lane_words_min);
}
LS_LANES256 inline bool decode_block_avx2(const Segment* segs, int nsegs, const uint8_t* in, int64_t words,
                                          uint64_t* out) {
  return decode_block<Avx2Lanes>(segs, nsegs, in, words, out);
}

#else

inline bool lanes_avx512_supported() { return false; }
inline bool lanes_avx2_supported() { return false; }

#endif

}  // namespace layersel::maskcode
