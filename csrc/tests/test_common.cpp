// ctest: the shared host/device math (csrc/common/) on the host, no torch.
// The CUDA kernels run these very functions, so these checks cover both.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <limits>

#include "common/bernoulli.h"
#include "common/chunks.h"
#include "common/fingerprint.h"
#include "common/philox.h"
#include "common/radix.h"
#include "common/scores.h"
#include "tests/check.h"


using namespace layersel;

// Random123 kat_vectors, the three philox4x32 10 lines: counter[4] key[2] -> output[4].
static void test_philox_known_answers() {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0u, 0u, 0u, 0u}, {0u, 0u}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    const Philox4x32Out r = philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) LS_CHECK(r.v[i] == k.out[i]);
  }
  // The stream: block b of seed s is counter (b_lo, b_hi, 0, 0) under key (s_lo, s_hi).
  const PhiloxStream s(0x299f31d0a4093822ull);
  const Philox4x32Out a = s.block(0x85a308d3243f6a88ull);
  const Philox4x32Out b = philox4x32_10(0x243f6a88u, 0x85a308d3u, 0u, 0u, 0xa4093822u, 0x299f31d0u);
  for (int i = 0; i < 4; ++i) LS_CHECK(a.v[i] == b.v[i]);
  // The batched (vectorisable) form gives the same words as one block at a time.
  uint32_t words[4 * 16];
  const uint64_t first = 0xfffffffcull;  // crosses the 32-bit boundary of the counter
  philox_blocks<16>(s, first, words);
  for (int j = 0; j < 16; ++j) {
    const Philox4x32Out r = s.block(first + j);
    for (int l = 0; l < 4; ++l) LS_CHECK(words[4 * j + l] == r.v[l]);
  }
}

static void test_bernoulli_math() {
  // exp against libm: relative error well under 1e-6 over the clamped range.
  double worst = 0.0;
  for (float x = -87.0f; x <= 87.0f; x += 0.0137f) {
    const double rel = std::fabs(portable_exp(x) / std::exp(static_cast<double>(x)) - 1.0);
    if (rel > worst) worst = rel;
  }
  LS_CHECK(worst < 1e-6);
  // sigmoid: exact edge cases and the NaN policy.
  LS_CHECK(bernoulli_probability(0.0f) == 0.5f);
  LS_CHECK(bernoulli_probability(std::numeric_limits<float>::infinity()) == 1.0f);
  LS_CHECK(bernoulli_probability(-std::numeric_limits<float>::infinity()) < 1e-37f);
  LS_CHECK(bernoulli_probability(std::nanf("")) < 1e-37f);
  for (float s = -20.0f; s <= 20.0f; s += 0.25f) {
    const double p = 1.0 / (1.0 + std::exp(-static_cast<double>(s)));
    LS_CHECK(std::fabs(bernoulli_probability(s) - p) < 1e-6 * (p > 1e-3 ? 1.0 : 1e-3));
  }
  // Uniforms are strictly inside (0, 1): p == 1 always samples 1, p ~ 0 never does.
  LS_CHECK(word_to_uniform(0u) > 0.0f);
  LS_CHECK(word_to_uniform(0xffffffffu) < 1.0f);
  LS_CHECK(bernoulli_sample(std::numeric_limits<float>::infinity(), 0xffffffffu));
  LS_CHECK(!bernoulli_sample(-std::numeric_limits<float>::infinity(), 0u));
  LS_CHECK(!bernoulli_sample(std::nanf(""), 0u));
  // Empirical frequency over a Philox stream.
  const PhiloxStream st(42);
  int ones = 0;
  const int n = 400000;
  for (int b = 0; b < n / 4; ++b) {
    const Philox4x32Out r = st.block(b);
    for (int l = 0; l < 4; ++l) ones += bernoulli_sample(1.0f, r.v[l]);
  }
  const double p = 1.0 / (1.0 + std::exp(-1.0)), sd = std::sqrt(p * (1 - p) / n);
  LS_CHECK(std::fabs(static_cast<double>(ones) / n - p) < 5 * sd);
}

static void test_chunk_table() {
  // Tensors of 0, 1, chunk-1, chunk, chunk+1, 0 and 3*chunk elements.
  const int64_t c = kCpuChunk;
  const int64_t sizes[] = {0, 1, c - 1, c, c + 1, 0, 3 * c};
  const int32_t n = 7;
  int64_t first[n + 1] = {0};
  for (int i = 0; i < n; ++i) first[i + 1] = first[i] + num_chunks(sizes[i], c);
  LS_CHECK(first[n] == 0 + 1 + 1 + 1 + 2 + 0 + 3);
  int64_t covered[n] = {0};
  for (int64_t id = 0; id < first[n]; ++id) {
    const int32_t t = tensor_of_chunk(first, n, id);
    LS_CHECK(first[t] <= id && id < first[t + 1]);
    const int64_t off = (id - first[t]) * c;
    covered[t] += (sizes[t] - off < c ? sizes[t] - off : c);
  }
  for (int i = 0; i < n; ++i) LS_CHECK(covered[i] == sizes[i]);
  // By element (CUDA's tail bits): the tensor holding element g is the last whose first element is
  // at or below g, past the empty tensors that share its first element.
  const int64_t elements[] = {0, 3, 0, 0, 1, 5, 0};
  const int32_t m = 7;
  int64_t base[m] = {0};
  for (int i = 1; i < m; ++i) base[i] = base[i - 1] + elements[i - 1];
  for (int64_t g = 0; g < base[m - 1] + elements[m - 1]; ++g) {
    const int32_t t = last_at_or_below(m, g, [&](int32_t i) { return base[i]; });
    LS_CHECK(elements[t] > 0 && base[t] <= g && g < base[t] + elements[t]);
  }
  LS_CHECK(last_at_or_below(1, 0, [&](int32_t i) { return base[i]; }) == 0);
}

static void test_scores() {
  constexpr int64_t kAbs = KindConstant<ScoreKind::kLargestFinalMagnitude>::value;             //  |x|
  constexpr int64_t kNegAbs = KindConstant<ScoreKind::kSmallestFinalMagnitude>::value;         // -|x|
  constexpr int64_t kChange = KindConstant<ScoreKind::kLargestMagnitudeChange>::value;         //  |x - y|
  constexpr int64_t kNegChange = KindConstant<ScoreKind::kSmallestMagnitudeChange>::value;     // -|x - y|
  constexpr int64_t kIncrease = KindConstant<ScoreKind::kLargestIncreaseInMagnitude>::value;   //  |x| - |y|
  constexpr int64_t kDecrease = KindConstant<ScoreKind::kSmallestIncreaseInMagnitude>::value;  // -(|x| - |y|)
  // torch semantics: abs(-0.0) = +0.0, abs(INT_MIN) = INT_MIN, uint8 wraps.
  LS_CHECK(!std::signbit(score_value<float>(kAbs, -0.0f, 0.0f)));
  LS_CHECK(std::signbit(score_value<float>(kNegAbs, 0.0f, 0.0f)));
  LS_CHECK(score_value<int8_t>(kAbs, -128, 0) == -128);
  LS_CHECK(score_value<int64_t>(kAbs, std::numeric_limits<int64_t>::min(), 0) == std::numeric_limits<int64_t>::min());
  LS_CHECK(score_value<uint8_t>(kNegAbs, 3, 0) == 253);
  LS_CHECK(score_value<uint8_t>(kChange, 3, 5) == 254);  // |3 - 5| in uint8: 254
  LS_CHECK(score_value<int32_t>(kIncrease, -7, 3) == 4);
  LS_CHECK(score_value<int32_t>(kDecrease, -7, 3) == -4);
  LS_CHECK(score_value<double>(kNegChange, 1.5, 4.0) == -2.5);
  LS_CHECK(drift_term<uint8_t>(3, 5) == 254.0f);
  LS_CHECK(drift_term<int64_t>(10, 3) == 7.0f);
  const double one_plus = 1.0 + 1e-12;  // the double difference, then rounded once to float
  LS_CHECK(drift_term<double>(1.0, one_plus) == static_cast<float>(1.0 - one_plus));
  // The CUDA kernel's int8 form equals the definition on every pair (bit-equal doubles).
  int i8_mismatches = 0;
  for (int a = 0; a < 256; ++a)
    for (int b = 0; b < 256; ++b)
      i8_mismatches += drift_square_i8_bits(static_cast<uint8_t>(a), static_cast<uint8_t>(b)) !=
                       drift_square(static_cast<int8_t>(a), static_cast<int8_t>(b));
  LS_CHECK(i8_mismatches == 0);
  LS_CHECK(drift_square_i8_bits(0x80, 0x7f) == 1.0);  // -128 - 127 wraps to 1
}

static void test_radix_keys() {
  // Keys order as torch.sort orders values; every NaN ranks above +inf.
  const float inf = std::numeric_limits<float>::infinity();
  const float ordered[] = {-inf, -3.5f, -1e-40f, -0.0f, 0.0f, 1e-45f, 1e-40f, 2.0f, inf, std::nanf("")};
  for (size_t i = 0; i + 1 < sizeof(ordered) / sizeof(float); ++i)
    LS_CHECK(order_key<float>(ordered[i]) < order_key<float>(ordered[i + 1]));
  LS_CHECK(order_key<float>(-std::nanf("")) == order_key<float>(std::nanf("")));
  LS_CHECK(order_key<double>(-1.0) < order_key<double>(0.5));
  LS_CHECK(order_key<int64_t>(std::numeric_limits<int64_t>::min()) == 0);
  LS_CHECK(order_key<int64_t>(-1) < order_key<int64_t>(0));
  // Digits: 32-bit keys take passes of 11, 11 and 10 bits that tile the key.
  LS_CHECK(num_digits(32) == 3 && num_digits(64) == 6 && num_digits(16) == 2);
  LS_CHECK(digit_shift(32, 0) == 21 && digit_width(32, 0) == 11);
  LS_CHECK(digit_shift(32, 2) == 0 && digit_width(32, 2) == 10);
  const uint64_t key = 0xDEADBEEFull;
  uint64_t prefix = 0;
  for (int d = 0; d < num_digits(32); ++d) {
    const int32_t digit = key_digit(key, 32, d, prefix);
    LS_CHECK(digit >= 0);
    prefix = (prefix << digit_width(32, d)) | static_cast<uint64_t>(digit);
  }
  LS_CHECK(prefix == key);
  LS_CHECK(key_digit(key, 32, 1, (key >> 21) + 1) == -1);  // another prefix: not counted
  // The threshold test: integer scores compare in float32, as torch does.
  LS_CHECK(passes_threshold<int64_t>(16777217, 16777216.0));  // rounds down to 2^24, which passes
  LS_CHECK(!passes_threshold<float>(std::nanf(""), -inf));
  LS_CHECK(!is_nonzero<float>(-0.0f) && is_nonzero<float>(std::nanf("")));
}

// The fingerprint of FedPM's unseeded masks: one changed element always changes
// it (a difference d * odd * odd with 0 < |d| < 2^32), and the key mix is a
// bijection in each argument.
static void test_fingerprint() {
  const uint32_t values[] = {0u, 1u, 0x3F800000u, 0x80000000u, 0xFFFFFFFFu, 0x7FC00000u};
  for (uint64_t g : {0ull, 1ull, 63ull, 64ull, 12345ull, (1ull << 40) + 7}) {
    const int lane = static_cast<int>(g % kFingerprintLanes);
    for (uint32_t a : values)
      for (uint32_t b : values) {
        const uint64_t fa = fingerprint_term(a, lane) * fingerprint_block_weight(g);
        const uint64_t fb = fingerprint_term(b, lane) * fingerprint_block_weight(g);
        LS_CHECK((fa == fb) == (a == b));
      }
  }
  for (int l = 0; l < kFingerprintLanes; ++l)
    LS_CHECK((fingerprint_weight_lo(l) & 1u) == 1u && (fingerprint_weight_hi(l) & 1u) == 1u);
  LS_CHECK(key_from_scores(5, 1, 10) != key_from_scores(5, 2, 10));
  LS_CHECK(key_from_scores(5, 1, 10) != key_from_scores(6, 1, 10));
  LS_CHECK(mix64(0) == 0 && mix64(1) != 1);
  float f = 1.5f;
  LS_CHECK(raw_bits(f) == 0x3FC00000ull);
  double d = -2.0;
  LS_CHECK(raw_bits(d) == 0xC000000000000000ull);
}

int main() {
  test_fingerprint();
  test_radix_keys();
  test_philox_known_answers();
  test_bernoulli_math();
  test_chunk_table();
  test_scores();
  return report("common math");
}
