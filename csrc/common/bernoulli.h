// mask = u < sigmoid(score), computed with the same bits on CPU and GPU.
//
// Only correctly rounded IEEE float operations (+, -, *, /, rint, bit casts)
// are used, none contracted into FMA, so host and device agree exactly; no
// libm call (whose last bit differs between glibc and CUDA) is involved.
#pragma once
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace layersel {

LS_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// Round to nearest, ties to even, for |x| < 2^22: adding and subtracting
// 1.5 * 2^23 leaves no fraction bits. Two exact IEEE additions, so it is the
// same on every target and vectorises (no libm rintf call on baseline x86-64).
LS_HD float round_to_int(float x) {
  constexpr float kMagic = 12582912.0f;
  return LS_FSUB(LS_FADD(x, kMagic), kMagic);
}

// exp(x) for x in [-87, 87]: Cody-Waite range reduction and a degree-7
// Taylor polynomial; relative error below 1e-7, plenty for a 2^-23 uniform.
LS_HD float portable_exp(float x) {
  const float k = round_to_int(LS_FMUL(x, 1.44269504f));
  // ln2 split so that k * kLn2Hi is exact for |k| <= 128.
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float r = LS_FSUB(LS_FSUB(x, LS_FMUL(k, kLn2Hi)), LS_FMUL(k, kLn2Lo));
  float p = 1.0f / 5040.0f;
  p = LS_FADD(LS_FMUL(p, r), 1.0f / 720.0f);
  p = LS_FADD(LS_FMUL(p, r), 1.0f / 120.0f);
  p = LS_FADD(LS_FMUL(p, r), 1.0f / 24.0f);
  p = LS_FADD(LS_FMUL(p, r), 1.0f / 6.0f);
  p = LS_FADD(LS_FMUL(p, r), 0.5f);
  p = LS_FADD(LS_FMUL(p, r), 1.0f);
  p = LS_FADD(LS_FMUL(p, r), 1.0f);
  const int32_t e = static_cast<int32_t>(k) + 127;  // in [1, 253]: 2^k is a normal float
  return LS_FMUL(p, bits_to_float(static_cast<uint32_t>(e) << 23));
}

// Probability sigmoid(score), branch-free so that loops over it vectorise.
// +inf gives 1, -inf about 1.6e-38; NaN is mapped to that same ~0 (never
// sampled, as no uniform is below 2^-24).
LS_HD float bernoulli_probability(float score) {
  float x = score == score ? -score : 87.0f;
  x = x < -87.0f ? -87.0f : x;
  x = x > 87.0f ? 87.0f : x;
  return LS_FDIV(1.0f, LS_FADD(1.0f, portable_exp(x)));
}

// Uniform in (0, 1) from a 32-bit word: odd multiples of 2^-24, exact in float,
// never 0 or 1, so p == 1 always samples 1 and p < 2^-24 never does.
LS_HD float word_to_uniform(uint32_t word) {
  return static_cast<float>(((word >> 9) << 1) | 1u) * (1.0f / 16777216.0f);
}

LS_HD bool bernoulli_sample(float score, uint32_t word) {
  return word_to_uniform(word) < bernoulli_probability(score);
}

}  // namespace layersel
