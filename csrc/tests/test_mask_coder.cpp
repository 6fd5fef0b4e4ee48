// The coded mask coder (common/mask_coder.h), without torch:
//   1. round trips of random layers (empty, 1, 63, 64, 65 elements and larger,
//      at odd bit offsets), priors mixing certain and uncertain elements, masks
//      drawn from them with exceptions, blocks of several sizes;
//      with and without lanes (the lane threshold lowered so that small blocks
//      use them), the AVX-512 lane loops (cpu/mask_lanes_simd.h) writing the
//      scalar loops' bytes and decoding either's streams;
//   2. the size: every coded message within 1% of the ideal sum of -log2 q(bit)
//      under the coder's model, plus 14 bytes a block (the word saying whether
//      it has lanes, the two states, the last renormalisation word, the raw
//      bits' padding) and 136 more a lane block (the lanes' states and word
//      count), which blocks the format's threshold chooses do not need;
//   3. a seeded mutation fuzz of valid blocks (flipped bits, truncations, extra
//      words, random bytes), with and without lanes: decoding never reads or
//      writes out of bounds (run under ASan + UBSan by the _sanitized target)
//      and never loops, and every lane loop gives the same verdict and bits;
//   4. the SIMD lane loops' runs at their bounds checks (see lane_runs_at_their_bounds);
//   5. the SIMD priors (cpu/mask_prior_simd.h) at every level this CPU runs
//      equal the scalar prepare_prior bit for bit (q, the three bit words, the
//      fingerprint, the verdict): float and double theta with NaN, infinities,
//      negatives, -0.0, subnormals, values above 1, exactly 0, 1/2 and 1 and the
//      quantization's ties, layers of 0 to several blocks' elements, split at
//      odd words as the threads split them; and float32 bit patterns from 0 to
//      1 (every one near a quantization step or tie, a stride of the rest).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "common/mask_coder.h"
#include "cpu/mask_lanes_simd.h"
#include "cpu/mask_prior_simd.h"

namespace mc = layersel::maskcode;

namespace {

struct Layer {
  std::vector<uint16_t> q;
  std::vector<uint64_t> certain, expected, half;
  mc::Prior prior() const {
    return {q.data(), certain.data(), expected.data(), half.data(), static_cast<int64_t>(q.size())};
  }
};

Layer layer_of(const std::vector<double>& theta) {
  const int64_t n = static_cast<int64_t>(theta.size()), nw = mc::prior_words(n);
  Layer l;
  l.q.resize(n);
  l.certain.assign(nw, 0);
  l.expected.assign(nw, 0);
  l.half.assign(nw, 0);
  uint64_t fp = 0;
  LS_CHECK(mc::prepare_prior(theta.data(), n, 0, nw, l.q.data(), l.certain.data(), l.expected.data(), l.half.data(),
                             &fp));
  return l;
}

Layer make_layer(std::mt19937_64& rng, int64_t n, double p_certain, double p_half) {
  std::vector<double> theta(n);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (auto& t : theta) {
    const double r = u(rng);
    t = r < p_certain ? (u(rng) < 0.5 ? 0.0 : 1.0) : r < p_certain + p_half ? 0.5 : u(rng);
  }
  return layer_of(theta);
}

struct Message {
  std::vector<Layer> layers;
  std::vector<uint64_t> offsets;  // bit offset of each layer in `bits`
  std::vector<uint8_t> bits;
  int64_t total = 0;
};

// Masks drawn from the prior; a certain element contradicts it with probability `flip`.
Message make_message(std::mt19937_64& rng, double flip) {
  Message m;
  std::uniform_int_distribution<int> nl(1, 5);
  const int64_t sizes[] = {0, 1, 63, 64, 65, 127, 1000, 5000, 70000};
  const int layers = nl(rng);
  uint64_t pos = rng() % 13;
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int i = 0; i < layers; ++i) {
    const int64_t n = sizes[rng() % 9] + static_cast<int64_t>(rng() % 3);
    m.layers.push_back(make_layer(rng, n, u(rng), u(rng) * 0.3));
    m.offsets.push_back(pos);
    pos += static_cast<uint64_t>(n) + rng() % 5;
    m.total += n;
  }
  m.bits.assign((pos + 7) / 8, 0);
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const Layer& l = m.layers[i];
    for (size_t k = 0; k < l.q.size(); ++k) {
      const uint32_t q = l.q[k];
      bool b;
      if (q == 0 || q == mc::kScale) {
        b = (q == mc::kScale) != (u(rng) < flip);
      } else {
        b = u(rng) * mc::kScale < q;
      }
      const uint64_t at = m.offsets[i] + k;
      m.bits[at >> 3] |= static_cast<uint8_t>(b) << (at & 7);
    }
  }
  return m;
}

struct Coded {
  std::vector<std::vector<mc::Segment>> blocks;
  std::vector<int64_t> elems;
  std::vector<std::vector<uint8_t>> bytes;
};

std::vector<std::vector<mc::Segment>> cut(const std::vector<mc::Prior>& priors, const std::vector<uint64_t>& offsets,
                                          int64_t total, int64_t block, std::vector<int64_t>* elems) {
  std::vector<std::vector<mc::Segment>> out;
  size_t layer = 0;
  int64_t elem = 0;
  for (int64_t b = 0; b * block < total; ++b) {
    out.emplace_back();
    const int64_t want = std::min(block, total - b * block);
    elems->push_back(want);
    for (int64_t left = want; left > 0;) {
      while (elem == priors[layer].n) {
        ++layer;
        elem = 0;
      }
      const int64_t len = std::min(left, priors[layer].n - elem);
      out.back().push_back({&priors[layer], elem, len, offsets[layer] + static_cast<uint64_t>(elem)});
      elem += len;
      left -= len;
    }
  }
  return out;
}

bool bit_at(const std::vector<uint8_t>& bits, uint64_t at) { return (bits[at >> 3] >> (at & 7)) & 1; }
bool word_bit(const std::vector<uint64_t>& w, int64_t at) { return (w[at >> 6] >> (at & 63)) & 1; }

// The lane loops a test runs: 0 the scalar ones, 1 AVX-512 and 2 AVX2 where this CPU has them.
int lane_impls() { return 3; }
bool runs(int impl) {
  return impl == 0 || (impl == 1 && mc::lanes_avx512_supported()) || (impl == 2 && mc::lanes_avx2_supported());
}

// lane_min: as encode_block's; below the format's, lanes however few their words.
uint16_t* encode_with(int impl, const std::vector<mc::Segment>& segs, const Message& m, uint16_t* begin, uint16_t* end,
                      uint64_t lane_min) {
  const int n = static_cast<int>(segs.size());
  const int64_t words_min = lane_min < mc::kLaneMin ? 0 : mc::kLaneWordsMin;
#ifdef LS_HAVE_LANES_SIMD
  if (impl == 1) {
    return mc::encode_block_avx512(segs.data(), n, m.bits.data(), m.bits.size(), begin, end, lane_min, words_min);
  }
  if (impl == 2) {
    return mc::encode_block_avx2(segs.data(), n, m.bits.data(), m.bits.size(), begin, end, lane_min, words_min);
  }
#endif
  return mc::encode_block(segs.data(), n, m.bits.data(), m.bits.size(), begin, end, lane_min, words_min);
}

bool decode_with(int impl, const std::vector<mc::Segment>& segs, const uint8_t* in, int64_t words, uint64_t* out) {
  const int n = static_cast<int>(segs.size());
#ifdef LS_HAVE_LANES_SIMD
  if (impl == 1) return mc::decode_block_avx512(segs.data(), n, in, words, out);
  if (impl == 2) return mc::decode_block_avx2(segs.data(), n, in, words, out);
#endif
  return mc::decode_block(segs.data(), n, in, words, out);
}

double ideal_bits(const Message& m) {
  double sum = 0;
  const double eps = 1.0 / mc::kScale;
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const Layer& l = m.layers[i];
    for (size_t k = 0; k < l.q.size(); ++k) {
      const bool b = bit_at(m.bits, m.offsets[i] + k);
      const uint32_t q = l.q[k];
      if (q == 0 || q == mc::kScale) {
        sum -= std::log2(b == (q == mc::kScale) ? 1.0 - eps : eps);
      } else {
        sum -= std::log2((b ? q : mc::kScale - q) / static_cast<double>(mc::kScale));
      }
    }
  }
  return sum;
}

void round_trips() {
  std::mt19937_64 rng(1);
  int messages = 0, lane_blocks = 0;
  for (uint64_t lane_min : {mc::kLaneMin, uint64_t{1}, uint64_t{300}}) {
    for (double flip : {0.0, 1e-4, 0.01, 0.5}) {
      for (int64_t block : {int64_t{64}, int64_t{128}, int64_t{4096}, int64_t{1} << 20}) {
        for (int rep = 0; rep < 25; ++rep) {
          const Message m = make_message(rng, flip);
          std::vector<mc::Prior> priors;
          for (const Layer& l : m.layers) priors.push_back(l.prior());
          std::vector<int64_t> elems;
          const auto blocks = cut(priors, m.offsets, m.total, block, &elems);
          size_t coded = 0;
          double allowance = 0;
          std::vector<std::vector<uint64_t>> outs(lane_impls(), std::vector<uint64_t>(mc::prior_words(m.total) + 1, 0));
          for (size_t b = 0; b < blocks.size(); ++b) {
            const auto& segs = blocks[b];
            // Room for 3 bytes an element: a flip rate of one half exceeds the bitmap.
            std::vector<uint16_t> ref;
            for (int impl = 0; impl < lane_impls(); ++impl) {
              if (!runs(impl)) continue;
              std::vector<uint16_t> buf(static_cast<size_t>(elems[b]) * 2 + 64);
              uint16_t* head = encode_with(impl, segs, m, buf.data(), buf.data() + buf.size(), lane_min);
              LS_CHECK(head != nullptr);
              if (!head) continue;
              const std::vector<uint16_t> bytes(head, buf.data() + buf.size());
              if (impl == 0) {
                ref = bytes;
                coded += 2 * bytes.size();
                lane_blocks += bytes[0] == 1;  // the word saying whether the block has lanes
                allowance += bytes[0] == 1 ? 14.0 + 2 * mc::kLaneFixedWords : 14.0;
              } else {
                LS_CHECK(bytes == ref);  // the AVX-512 lanes write the scalar ones' bytes
              }
              for (int dimpl = 0; dimpl < lane_impls(); ++dimpl) {  // and each decodes the others'
                if (runs(dimpl)) LS_CHECK(decode_with(dimpl, segs, reinterpret_cast<const uint8_t*>(bytes.data()),
                                     static_cast<int64_t>(bytes.size()), outs[dimpl].data() + b * (block / 64)));
              }
            }
          }
          for (int impl = 0; impl < lane_impls(); ++impl) {
            if (!runs(impl)) continue;
            const auto& out = outs[impl];
            int64_t at = 0;
            bool same = true;
            for (size_t i = 0; i < m.layers.size(); ++i) {
              for (size_t k = 0; k < m.layers[i].q.size(); ++k, ++at) {
                same &= word_bit(out, at) == bit_at(m.bits, m.offsets[i] + k);
              }
            }
            LS_CHECK(same);
          }
          const double ideal = ideal_bits(m) / 8;
          const bool small = coded <= 1.01 * ideal + allowance;
          if (!small) std::fprintf(stderr, "coded %zu bytes, ideal %.1f, %zu blocks\n", coded, ideal, blocks.size());
          LS_CHECK(small);
          ++messages;
        }
      }
    }
  }
  std::printf("round trips: %d messages, %d lane blocks, lane loops: scalar%s%s\n", messages, lane_blocks,
              runs(1) ? ", AVX-512" : "", runs(2) ? ", AVX2" : "");
  LS_CHECK(lane_blocks > 500);
}

// Blocks about the lane thresholds, as the wire codes them: lanes over
// several runs of the lane loops where they pay, and the same bytes from both lane loops.
void lane_blocks_at_the_threshold() {
  std::mt19937_64 rng(4);
  // Uncertain elements: about 900k, 430k, 190k (too few words for lanes), 48k (too few elements).
  for (double p_certain : {0.0, 0.5, 0.75, 0.9}) {
    Message m;
    const int64_t n = (int64_t{1} << 20) - 1000;
    m.layers.push_back(make_layer(rng, n, p_certain, 0.05));
    m.offsets.push_back(5);
    m.total = n;
    m.bits.assign(static_cast<size_t>((n + 5 + 7) / 8), 0);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    for (int64_t k = 0; k < n; ++k) {
      const uint32_t q = m.layers[0].q[k];
      const bool b = q == 0 || q == mc::kScale ? (q == mc::kScale) != (u(rng) < 1e-3) : u(rng) * mc::kScale < q;
      m.bits[(k + 5) >> 3] |= static_cast<uint8_t>(b) << ((k + 5) & 7);
    }
    std::vector<mc::Prior> priors{m.layers[0].prior()};
    std::vector<int64_t> elems;
    const auto blocks = cut(priors, m.offsets, n, int64_t{1} << 30, &elems);
    std::vector<uint16_t> ref;
    for (int impl = 0; impl < lane_impls(); ++impl) {
      if (!runs(impl)) continue;
      std::vector<uint16_t> buf(static_cast<size_t>(n / 16 + 64));
      uint16_t* head = encode_with(impl, blocks[0], m, buf.data(), buf.data() + buf.size(), mc::kLaneMin);
      LS_CHECK(head != nullptr);
      if (!head) continue;
      const std::vector<uint16_t> bytes(head, buf.data() + buf.size());
      if (impl == 0) ref = bytes;
      LS_CHECK(bytes == ref);
      LS_CHECK((bytes[0] == 1) == (p_certain < 0.75));  // lanes where they pay
      LS_CHECK(2 * bytes.size() <= 1.01 * ideal_bits(m) / 8 + 14);
      for (int dimpl = 0; dimpl < lane_impls(); ++dimpl) {
        if (!runs(dimpl)) continue;
        std::vector<uint64_t> out(static_cast<size_t>(mc::prior_words(n)), 0);
        LS_CHECK(decode_with(dimpl, blocks[0], reinterpret_cast<const uint8_t*>(bytes.data()),
                             static_cast<int64_t>(bytes.size()), out.data()));
        bool same = true;
        for (int64_t k = 0; k < n; ++k) same &= word_bit(out, k) == bit_at(m.bits, 5 + static_cast<uint64_t>(k));
        LS_CHECK(same);
      }
    }
  }
}

#ifdef LS_HAVE_LANES_SIMD
// The SIMD encoders' division (float, then corrected) against the exact
// one for every frequency, at every multiple-of-f boundary it can meet near
// the ends of its range and a stride of the rest, and at random states.
LS_LANES512 void divide16_avx512(const uint32_t* ys, const uint32_t* fs, uint32_t* ds, uint32_t* rs) {
  __m512i rem;
  _mm512_storeu_si512(ds, mc::Avx512Lanes::divide(_mm512_loadu_si512(ys), _mm512_loadu_si512(fs), &rem));
  _mm512_storeu_si512(rs, rem);
}
LS_LANES256 void divide16_avx2(const uint32_t* ys, const uint32_t* fs, uint32_t* ds, uint32_t* rs) {
  for (int h = 0; h < 16; h += 8) {
    __m256i rem;
    const __m256i d = mc::Avx2Lanes::divide(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ys + h)),
                                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(fs + h)), &rem);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ds + h), d);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(rs + h), rem);
  }
}

void lane_division_is_exact(int impl) {
  auto divide16 = impl == 1 ? divide16_avx512 : divide16_avx2;
  std::mt19937_64 rng(5);
  int64_t compared = 0, wrong = 0;
  uint32_t ys[16], fs[16], ds[16], rs[16];
  int fill = 0;
  auto check = [&] {
    divide16(ys, fs, ds, rs);
    for (int k = 0; k < fill; ++k) wrong += ds[k] != ys[k] / fs[k] || rs[k] != ys[k] % fs[k];
    compared += fill;
    fill = 0;
  };
  auto add = [&](uint64_t y, uint32_t f) {
    ys[fill] = static_cast<uint32_t>(y);
    fs[fill] = f;
    if (++fill == 16) check();
  };
  for (uint32_t f = 1; f <= mc::kScale; ++f) {  // 2^15: an inactive lane's
    const uint64_t top = std::min(uint64_t{f} << 17, uint64_t{1} << 32);  // states below it only reach the division
    for (uint64_t k : {uint64_t{0}, uint64_t{1}, uint64_t{2}, uint64_t{1} << 16, (uint64_t{1} << 17) - 2,
                       (uint64_t{1} << 17) - 1}) {
      for (int64_t dy : {-1, 0, 1}) {
        const int64_t y = static_cast<int64_t>(k * f) + dy;
        if (y >= 0 && static_cast<uint64_t>(y) < top) add(static_cast<uint64_t>(y), f);
      }
    }
    for (int j = 0; j < 8; ++j) add(rng() % top, f);
    add(top - 1, f);
  }
  for (; fill < 16 && fill > 0;) add(0, 1);
  std::printf("lane division (%s): %lld quotients, %lld wrong\n", impl == 1 ? "AVX-512" : "AVX2",
              static_cast<long long>(compared),
              static_cast<long long>(wrong));
  LS_CHECK(wrong == 0 && compared > 32768 * 20);
}
#endif

// A whole-run check the round trips above cannot make with small layers: a
// million certain elements and a few exceptions cost a few bytes, not a bitmap.
#ifdef LS_HAVE_LANES_SIMD
// The SIMD lane loops check their word stream's bounds once a run of pieces
// (64 words a piece decoding, 64 words of room encoding), not once a step.
// Runs of pieces in buffers of exactly the words a run may take (and one word
// fewer, the checked twin's case), on the heap, so that ASan (the _sanitized
// target) sees a read or write past either end; every loop must agree with
// the scalar one. Random pieces, states and words; and the worst case, where
// every lane renormalises at every step: decoding, states and words all zero
// (as a hostile stream may have them); encoding, every bit the rarest symbol
// (q = 1) from the largest states.
template <class Lanes>
void lane_run(std::mt19937_64& rng, int64_t n, int64_t spare, const std::vector<mc::LanePiece>& pieces,
              const uint32_t* decode_states, const uint32_t* encode_states, bool zero_words) {
  std::vector<uint16_t> words(static_cast<size_t>(mc::kLanes * n + spare));
  for (auto& w : words) w = zero_words ? 0 : static_cast<uint16_t>(rng());
  mc::LaneStream simd{}, scalar{};
  for (int l = 0; l < mc::kLanes; ++l) simd.x[l] = scalar.x[l] = decode_states[l];
  simd.in = scalar.in = reinterpret_cast<const uint8_t*>(words.data());
  simd.left = scalar.left = static_cast<int64_t>(words.size());
  std::vector<uint64_t> got(static_cast<size_t>(n)), want(static_cast<size_t>(n));
  Lanes::decode(simd, pieces.data(), n, got.data());
  mc::ScalarLanes::decode(scalar, pieces.data(), n, want.data());
  LS_CHECK(got == want && simd.left == scalar.left && simd.bad == scalar.bad);
  for (int l = 0; l < mc::kLanes; ++l) LS_CHECK(simd.x[l] == scalar.x[l]);

  std::vector<uint16_t> room(words.size()), room_scalar(words.size());
  uint32_t xs[mc::kLanes], xs_scalar[mc::kLanes];
  for (int l = 0; l < mc::kLanes; ++l) xs[l] = xs_scalar[l] = encode_states[l];
  uint16_t* out = room.data() + room.size();
  uint16_t* out_scalar = room_scalar.data() + room_scalar.size();
  bool over = false, over_scalar = false;
  Lanes::encode(xs, pieces.data(), n, room.data(), &out, &over);
  mc::ScalarLanes::encode(xs_scalar, pieces.data(), n, room_scalar.data(), &out_scalar, &over_scalar);
  LS_CHECK(over == over_scalar);
  if (!over) {
    LS_CHECK(out - room.data() == out_scalar - room_scalar.data());
    LS_CHECK(std::equal(out, room.data() + room.size(), out_scalar));
    for (int l = 0; l < mc::kLanes; ++l) LS_CHECK(xs[l] == xs_scalar[l]);
  }
}

void lane_runs_at_their_bounds(int impl) {
  std::mt19937_64 rng(29 + impl);
  std::uniform_int_distribution<int> qd(1, mc::kScale - 1);
  for (int trial = 0; trial < 300; ++trial) {
    const bool worst = trial % 3 == 0;
    const int64_t n = 1 + static_cast<int64_t>(rng() % 8);
    std::vector<uint16_t> q(static_cast<size_t>(64 * n));
    for (auto& v : q) v = static_cast<uint16_t>(worst ? 1 : qd(rng));
    std::vector<mc::LanePiece> pieces(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t u = worst || trial % 2 ? ~uint64_t{0} : rng() | rng();
      pieces[static_cast<size_t>(i)] = {q.data() + 64 * i, u, worst ? u : rng() & u, 64};
    }
    uint32_t decode_states[mc::kLanes], encode_states[mc::kLanes];
    for (int l = 0; l < mc::kLanes; ++l) {
      decode_states[l] = worst ? 0 : static_cast<uint32_t>(rng());
      encode_states[l] = worst ? ~uint32_t{0} : static_cast<uint32_t>(rng()) | mc::kLow;
    }
    for (int64_t spare : {0, -1}) {
      if (impl == 1) lane_run<mc::Avx512Lanes>(rng, n, spare, pieces, decode_states, encode_states, worst);
      if (impl == 2) lane_run<mc::Avx2Lanes>(rng, n, spare, pieces, decode_states, encode_states, worst);
    }
  }
}
#endif

void long_certain_runs() {
  std::mt19937_64 rng(2);
  const int64_t n = 1 << 20;
  std::vector<double> theta(n, 1.0);
  for (int64_t i = 0; i < n; i += 3) theta[i] = 0.0;
  const Layer l = layer_of(theta);
  Message m;
  m.layers.push_back(l);
  m.offsets.push_back(0);
  m.total = n;
  m.bits.assign(n / 8, 0);
  for (int64_t i = 0; i < n; ++i) {
    bool b = theta[i] == 1.0;
    if (i == 5 || i == 777777 || i == n - 1) b = !b;
    m.bits[i >> 3] |= static_cast<uint8_t>(b) << (i & 7);
  }
  std::vector<mc::Prior> priors{m.layers[0].prior()};
  std::vector<int64_t> elems;
  const auto blocks = cut(priors, m.offsets, n, n, &elems);
  std::vector<uint16_t> buf(n / 16 + 2);
  uint16_t* head = mc::encode_block(blocks[0].data(), 1, m.bits.data(), m.bits.size(), buf.data(), buf.data() + buf.size());
  LS_CHECK(head != nullptr);
  const int64_t words = buf.data() + buf.size() - head;
  std::printf("1M certain elements, 3 exceptions: %lld bytes (ideal %.1f)\n", static_cast<long long>(2 * words),
              ideal_bits(m) / 8);
  LS_CHECK(2 * words <= 1.01 * ideal_bits(m) / 8 + 12);
  std::vector<uint64_t> out(n / 64, 0);
  LS_CHECK(mc::decode_block(blocks[0].data(), 1, reinterpret_cast<const uint8_t*>(head), words, out.data()));
  LS_CHECK(std::memcmp(out.data(), m.bits.data(), n / 8) == 0);
}

// theta = 1/2 everywhere: the bits go as they are, after the two states, and
// a set padding bit or a missing word is a corrupt block.
void all_half() {
  std::mt19937_64 rng(3);
  for (int64_t n : {int64_t{1}, int64_t{16}, int64_t{17}, int64_t{64}, int64_t{1000003}}) {
    const Layer l = layer_of(std::vector<double>(static_cast<size_t>(n), 0.5));
    const mc::Prior prior = l.prior();
    const mc::Segment seg{&prior, 0, n, 3};
    std::vector<uint8_t> bits(static_cast<size_t>((n + 3 + 7) / 8));
    for (auto& b : bits) b = static_cast<uint8_t>(rng());
    std::vector<uint16_t> buf(static_cast<size_t>(n / 16 + 8));
    uint16_t* head = mc::encode_block(&seg, 1, bits.data(), bits.size(), buf.data(), buf.data() + buf.size());
    LS_CHECK(head != nullptr);
    if (!head) continue;
    const int64_t words = buf.data() + buf.size() - head;
    LS_CHECK(words == 5 + (n + 15) / 16);
    std::vector<uint64_t> out(static_cast<size_t>(mc::prior_words(n)), 0);
    LS_CHECK(mc::decode_block(&seg, 1, reinterpret_cast<const uint8_t*>(head), words, out.data()));
    bool same = true;
    for (int64_t k = 0; k < n; ++k) same &= word_bit(out, k) == bit_at(bits, 3 + static_cast<uint64_t>(k));
    LS_CHECK(same);
    LS_CHECK(!mc::decode_block(&seg, 1, reinterpret_cast<const uint8_t*>(head), words - 1, out.data()));
    if (n % 16) {
      buf.back() = static_cast<uint16_t>(buf.back() | 0x8000);  // a padding bit
      LS_CHECK(!mc::decode_block(&seg, 1, reinterpret_cast<const uint8_t*>(head), words, out.data()));
    }
  }
}

void fuzz() {
  std::mt19937_64 rng(3);
  int streams = 0, accepted = 0, lane_streams = 0;
  while (streams < 12000) {
    const Message m = make_message(rng, (rng() % 3) * 0.01);
    const uint64_t lane_min = rng() % 2 ? mc::kLaneMin : 1 + rng() % 200;
    std::vector<mc::Prior> priors;
    for (const Layer& l : m.layers) priors.push_back(l.prior());
    std::vector<int64_t> elems;
    const auto blocks = cut(priors, m.offsets, m.total, 4096, &elems);
    for (size_t b = 0; b < blocks.size(); ++b) {
      const auto& segs = blocks[b];
      std::vector<uint16_t> buf(static_cast<size_t>(elems[b]) * 2 + 64);
      uint16_t* head = encode_with(0, segs, m, buf.data(), buf.data() + buf.size(), lane_min);
      if (!head) continue;
      std::vector<uint8_t> bytes(reinterpret_cast<uint8_t*>(head), reinterpret_cast<uint8_t*>(buf.data() + buf.size()));
      const bool lanes = bytes[0] == 1;
      for (int k = 0; k < 4; ++k) {
        std::vector<uint8_t> bad = bytes;
        switch (rng() % 4) {
          case 0: bad[rng() % bad.size()] ^= static_cast<uint8_t>(1u << (rng() % 8)); break;
          case 1: bad.resize(bad.size() - 2 * (1 + rng() % (bad.size() / 2))); break;
          case 2: bad.insert(bad.end(), {static_cast<uint8_t>(rng()), static_cast<uint8_t>(rng())}); break;
          default:
            for (auto& v : bad) v = static_cast<uint8_t>(rng());
        }
        // An exact-size copy, so ASan sees any read past the block.
        std::vector<uint8_t> exact(bad);
        std::vector<std::vector<uint64_t>> outs(lane_impls(), std::vector<uint64_t>(mc::prior_words(elems[b]), 0));
        bool verdict[3] = {false, false, false};
        for (int impl = 0; impl < lane_impls(); ++impl) {
          if (!runs(impl)) continue;
          verdict[impl] = decode_with(impl, segs, exact.data(), static_cast<int64_t>(exact.size() / 2),
                                      outs[impl].data());
          LS_CHECK(verdict[impl] == verdict[0] && outs[impl] == outs[0]);
        }
        accepted += verdict[0];
        lane_streams += lanes;
        ++streams;
      }
    }
  }
  std::printf("fuzz: %d mutated blocks decoded (%d with lanes), %d of them read as valid streams\n", streams,
              lane_streams, accepted);
  LS_CHECK(streams >= 10000);
  LS_CHECK(lane_streams >= 3000);
}

// A prior's outputs, the words [w0, w1) filled by one call.
struct PriorOut {
  std::vector<uint16_t> q;
  std::vector<uint64_t> words;  // certain, expected, half
  uint64_t fp = 0;
  bool ok = true;
  bool operator==(const PriorOut& o) const { return q == o.q && words == o.words && fp == o.fp && ok == o.ok; }
};

// The prior of theta at `level` (-1: the scalar prepare_prior), its words in the given ranges.
template <typename T>
PriorOut prior_at(int level, const std::vector<T>& theta, const std::vector<int64_t>& cuts) {
  const int64_t n = static_cast<int64_t>(theta.size()), nw = mc::prior_words(n);
  PriorOut o;
  o.q.assign(n, 0xDEAD);
  o.words.assign(3 * nw, 0x5555);
  for (size_t k = 0; k + 1 < cuts.size(); ++k) {
    uint16_t* q = o.q.data();
    uint64_t *c = o.words.data(), *e = c + nw, *h = c + 2 * nw;
    const bool good = level < 0 ? mc::prepare_prior(theta.data(), n, cuts[k], cuts[k + 1], q, c, e, h, &o.fp)
                                : mc::prepare_prior_at(level, theta.data(), n, cuts[k], cuts[k + 1], q, c, e, h, &o.fp);
    o.ok = o.ok && good;
  }
  return o;
}

template <typename T>
std::vector<T> special_values() {
  using L = std::numeric_limits<T>;
  std::vector<T> v = {L::quiet_NaN(), -L::quiet_NaN(), L::infinity(), -L::infinity(), T(-1), T(-0.0), T(0), T(0.5),
                      T(1), T(1.5), T(2), L::max(), -L::max(), L::min(), L::denorm_min(), -L::denorm_min(),
                      L::min() / 4, std::nextafter(T(1), T(2)), std::nextafter(T(1), T(0)),
                      std::nextafter(T(0.5), T(0)), std::nextafter(T(0.5), T(1)), std::nextafter(T(0), T(-1))};
  for (int k : {0, 1, 2, 16383, 16384, 16385, 32766, 32767}) {  // ties of the quantization and their neighbours
    const T tie = static_cast<T>((k + 0.5) / mc::kScale);
    v.insert(v.end(), {tie, std::nextafter(tie, T(0)), std::nextafter(tie, T(1))});
  }
  return v;
}

template <typename T>
void simd_priors_equal_the_scalar_one(int level) {
  std::mt19937_64 rng(11 + level);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const std::vector<T> special = special_values<T>();
  const int64_t sizes[] = {0, 1, 2, 63, 64, 65, 127, 128, 1000, 64 * mc::kSimdBlockWords - 1,
                           64 * mc::kSimdBlockWords, 64 * mc::kSimdBlockWords + 1, 3 * 64 * mc::kSimdBlockWords + 17};
  int compared = 0;
  for (const int64_t n : sizes) {
    for (int mix = 0; mix < 3; ++mix) {  // probabilities only, a few specials, mostly specials
      std::vector<T> theta(n);
      for (auto& t : theta) {
        const double r = u(rng);
        const double p_special = mix == 0 ? 0.0 : mix == 1 ? 0.02 : 0.7;
        const double tie = (static_cast<double>(rng() % mc::kScale) + 0.5) / mc::kScale;
        t = r < p_special          ? special[rng() % special.size()]
            : r < p_special + 0.2  ? T(0)
            : r < p_special + 0.35 ? T(1)
            : r < p_special + 0.45 ? T(0.5)
            : r < p_special + 0.5  ? static_cast<T>(tie)
                                   : static_cast<T>(u(rng));
      }
      const int64_t nw = mc::prior_words(n);
      const PriorOut ref = prior_at(-1, theta, {0, nw});
      LS_CHECK(ref.ok == std::all_of(theta.begin(), theta.end(), [](T t) { return t >= T(0) && t <= T(1); }));
      for (const std::vector<int64_t>& cuts :
           {std::vector<int64_t>{0, nw}, {0, nw / 3, std::min(nw, nw / 3 + 1), nw}, {0, nw / 2, nw}}) {
        LS_CHECK(prior_at(level, theta, cuts) == ref);
        ++compared;
      }
    }
  }
  LS_CHECK(compared == 3 * 3 * static_cast<int>(sizeof(sizes) / sizeof(sizes[0])));
}

// Float32 bit patterns in [0, 1] (0 .. 0x3F800000): every one within `near`
// ulps of a multiple of 2^-16 (the quantization's steps and ties) and every
// `stride`-th of the rest, compared a run of patterns at a time.
void float32_patterns_equal_the_scalar_prior(int level, uint32_t near, uint32_t stride) {
  constexpr uint32_t kOne = 0x3F800000u;
  std::vector<float> run;
  int64_t compared = 0;
  bool same = true;
  auto flush = [&] {
    const int64_t nw = mc::prior_words(static_cast<int64_t>(run.size()));
    same = same && prior_at(level, run, {0, nw}) == prior_at(-1, run, {0, nw});
    compared += static_cast<int64_t>(run.size());
    run.clear();
  };
  auto add = [&](uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    run.push_back(f);
    if (run.size() == 1u << 16) flush();
  };
  for (uint32_t bits = 0; bits <= kOne; bits += stride) add(bits);
  for (uint32_t k = 1; k <= 1u << 16; ++k) {
    const float step = static_cast<float>(k) / 65536.0f;  // exact
    uint32_t b;
    std::memcpy(&b, &step, 4);
    for (uint32_t d = b - near; d <= b + near && d <= kOne; ++d) add(d);
  }
  flush();
  LS_CHECK(same);
  LS_CHECK(compared > (int64_t{1} << 16) * (2 * near + 1) - near);
}

void simd_priors() {
  const int best = layersel::cpu_simd_support();
  std::printf("simd priors: levels 1 .. %d run here\n", best);
#if defined(__SANITIZE_ADDRESS__)
  const uint32_t near = 2, stride = 65521;  // a prime: about 16k patterns spread over [0, 1]
#else
  const uint32_t near = 64, stride = 251;
#endif
  for (int level = mc::kPriorAvx2; level <= best; ++level) {
    simd_priors_equal_the_scalar_one<float>(level);
    simd_priors_equal_the_scalar_one<double>(level);
    float32_patterns_equal_the_scalar_prior(level, near, stride);
  }
}

}  // namespace

int main() {
  round_trips();
#ifdef LS_HAVE_LANES_SIMD
  for (int impl : {1, 2}) {
    if (runs(impl)) {
      lane_division_is_exact(impl);
      lane_runs_at_their_bounds(impl);
    }
  }
#endif
  lane_blocks_at_the_threshold();
  long_certain_runs();
  all_half();
  fuzz();
  simd_priors();
  return report("mask_coder");
}
