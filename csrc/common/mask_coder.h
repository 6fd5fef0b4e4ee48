// Lossless coding of FedPM masks with the server's Bernoulli parameters as the
// prior (the format: layersel_ext/wire_coded.py). No torch here: the torch
// wrapper is cpu/wire_masks.cpp, the unit and fuzz tests csrc/tests/test_mask_coder.cpp.
//
// The model. Each mask element has a prior probability theta of being 1, which
// client and server both hold (the theta the server sent). It is quantized by
// q = floor(theta * 2^15 + 1/2), exactly in double arithmetic (the product by a
// power of two and the sum are exact for theta in [0, 1]), so every machine and
// device gets the same integer in [0, 2^15].
//   - 0 < q < 2^15, q != 2^14 ("uncertain"): the bit is one rANS symbol with
//     P(1) = q / 2^15.
//   - q = 2^14 ("half"): the bit costs exactly one bit under any coder, so it
//     goes as it is, in the block's raw bits, without rANS's work. In FedPM
//     with two clients, every element the clients disagreed on has theta 1/2.
//   - q = 0 or q = 2^15 ("certain"): the bit is expected to be 0 or 1. A bit that
//     contradicts it (an "exception") still codes: the certain elements are
//     modelled as independent with P(exception) = 2^-15, and coded as gaps, the
//     number G of matching certain elements before the next exception, which
//     under that model is geometric. G is coded exactly by the chain rule as
//     continue bits (P = a^(2^15), a = 1 - 2^-15: one per 2^15 matches) and a
//     15-bit remainder whose bits are independent (bit k is 1 with probability
//     a^(2^k) / (1 + a^(2^k))). So a run of certain elements costs one symbol per
//     2^15 elements, and the coder skips them 64 at a time.
// Probabilities are the constants below (computed once, in 60-digit decimal
// arithmetic, rounded to 15 bits): no float function runs while coding.
// The coding loops are always inlined (LS_HD), into callers that are cloned
// per ISA (cpu/wire_masks.cpp).
//
// The stream. The coded layers are concatenated into one sequence, cut into
// blocks of block_elems elements (a multiple of 64; the last block may be
// shorter); each block is an independent stream, so blocks code and decode on
// all threads. A block is rANS with two interleaved states (32-bit, in
// [2^16, 2^32), 16-bit words, scale 2^15) that take the symbols in turn, in the
// decoder's order: the elements' in order, each gap's where the decoder needs
// it. A block's bytes: the encoder's final states (each a uint32 as two
// little-endian uint16 words, low first; first the one the decoder's first
// symbol uses), then the renormalisation words in the order the decoder reads
// them, then the raw bits: the half elements' bits in element order, 16 to a
// little-endian uint16 word from its lowest bit, the last word zero-padded
// (the prior says how many there are). A valid block ends with both decoder
// states back at 2^16, every word read and the padding zero; anything else is
// a corrupt stream.
//
// Lanes. A block may code its uncertain elements apart, in 64 rANS states
// side by side (the "lanes", four SIMD vectors: cpu/mask_lanes_simd.h), and
// only the gaps in the two-state stream. The block's pieces (a segment's
// elements 64 at a time, in order) take their uncertain elements' symbols in
// order, element k of a piece on lane k; so a SIMD step codes up to 16 of a
// piece's elements where they lie, with no gathering and no scattering. The
// lanes share one word stream, in the decoder's order: by piece, in lane
// order within one. The encoder uses lanes when the block has at least
// kLaneMin uncertain elements and the lanes' words are at least 100 times
// their fixed words (their states and count), so that these cost at most 1%
// of the block.
//
// A block's bytes start with a word saying which: 0, none; 1, lanes, and then
// the number of lane words (a uint64 as four little-endian words, low first),
// the lanes' final states (lane 0's first, each as two words, low first) and
// their renormalisation words; then the two-state stream and the raw bits as
// above. A valid lane block also ends with every lane back at 2^16 and every
// lane word read.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fingerprint.h"
#include "macros.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the coded mask format stores little-endian words; this coder reads and writes them natively"
#endif

namespace layersel::maskcode {

constexpr int kProbBits = 15;
constexpr uint32_t kScale = 1u << kProbBits;
constexpr uint32_t kHalf = kScale / 2;  // q of a bit that costs exactly one bit: sent as it is
constexpr uint32_t kLow = 1u << 16;     // the rANS state interval is [kLow, 2^32)
constexpr uint64_t kChunk = 1u << 15;   // matching certain elements per continue bit
constexpr int64_t kBlockMinWords = 5;  // a block's least: the word saying whether it has lanes, two states
constexpr int kLanes = 64;                         // rANS states of a block's lane stream: one a piece's element
constexpr int64_t kLaneFixedWords = 4 + 2 * kLanes;  // a lane stream's count and states
constexpr uint64_t kLaneMin = uint64_t{1} << 16;   // uncertain elements from which the encoder tries lanes
constexpr int64_t kLaneWordsMin = 100 * (1 + kLaneFixedWords);  // and lane words from which it keeps them
constexpr int64_t kLanePieces = 256;               // pieces the lane loops take at a time
constexpr uint32_t kContinueOne = 12054;  // round(2^15 * a^(2^15)), a = 1 - 2^-15
// round(2^15 * a^(2^k) / (1 + a^(2^k))) for remainder bit k.
constexpr uint32_t kRemainderOne[15] = {16384, 16383, 16383, 16382, 16380, 16376, 16368, 16352,
                                        16320, 16256, 16128, 15872, 15361, 14347, 12371};

LS_HD uint64_t low_bits(int k) { return k >= 64 ? ~uint64_t{0} : (uint64_t{1} << k) - 1; }

// Set bits of a word. Written out because the baseline x86-64 build has no
// popcnt instruction, and the builtin then calls a table-driven libgcc loop.
LS_HD int popcount(uint64_t v) {
  v = v - ((v >> 1) & 0x5555555555555555ull);
  v = (v & 0x3333333333333333ull) + ((v >> 2) & 0x3333333333333333ull);
  v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0Full;
  return static_cast<int>((v * 0x0101010101010101ull) >> 56);
}

// The quantized probability of theta in [0, 2^15]: floor(theta * 2^15 + 1/2),
// where truncation is the floor (the value is not negative) and needs no libm call.
inline uint16_t quantize(double theta) {
  return static_cast<uint16_t>(static_cast<int32_t>(theta * static_cast<double>(kScale) + 0.5));
}

// floor(x / f) for any 32-bit x and 2 <= f < 2^15 by one multiplication:
// m = floor((2^64 - 1) / f) + 1 and floor(x / f) = (m * x) >> 64 (Lemire, Kaser
// and Kurz, "Faster remainder by direct computation", 2019). The encoder
// divides by a symbol's frequency once a symbol; a hardware division would
// take most of its time.
struct Reciprocals {
  uint64_t m[kScale];
  Reciprocals() {
    m[0] = m[1] = 0;
    for (uint32_t f = 2; f < kScale; ++f) m[f] = ~uint64_t{0} / f + 1;
  }
};
inline const uint64_t* reciprocals() {
  static const Reciprocals table;
  return table.m;
}
LS_HD uint32_t divide(uint32_t x, uint32_t f, const uint64_t* rcp) {
  if (f == 1) return x;
  return static_cast<uint32_t>((static_cast<unsigned __int128>(rcp[f]) * x) >> 64);
}

// One layer's quantized prior: q per element, and per 64 elements a word of
// "certain" bits (q is 0 or 2^15), of "expected" bits (q is 2^15) and of "half"
// bits (q is 2^14); bits past n are zero.
struct Prior {
  const uint16_t* q;
  const uint64_t* certain;
  const uint64_t* expected;
  const uint64_t* half;
  int64_t n;
};

// Fills words [w0, w1) of a prior from theta (n elements; T = float or double);
// returns false when an element is not a probability. Adds the words' share of
// the fingerprint to *fp. The scalar definition: the torch wrapper runs the
// AVX2 / AVX-512 forms (cpu/mask_prior_simd.h, the same bits) where the CPU
// has them, and this loop for a layer's last partial word.
template <typename T>
bool prepare_prior(const T* theta, int64_t n, int64_t w0, int64_t w1, uint16_t* q, uint64_t* certain,
                   uint64_t* expected, uint64_t* half, uint64_t* fp) {
  uint64_t sum = 0;
  bool ok = true;
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t begin = w * 64, count = n - begin < 64 ? n - begin : 64;
    const T* t = theta + begin;
    uint16_t* qw = q + begin;
    for (int64_t i = 0; i < count; ++i) {
      const double v = static_cast<double>(t[i]);
      const bool good = v >= 0.0 && v <= 1.0;
      ok &= good;
      qw[i] = quantize(good ? v : 0.0);
    }
    uint64_t c = 0, e = 0, h = 0, word_sum = 0;
    for (int64_t i = 0; i < count; ++i) {
      const uint32_t v = qw[i];
      c |= static_cast<uint64_t>(v == 0 || v == kScale) << i;
      e |= static_cast<uint64_t>(v == kScale) << i;
      h |= static_cast<uint64_t>(v == kHalf) << i;
      word_sum += (static_cast<uint64_t>(v) + 1) * fingerprint_weight_lo(static_cast<int>(i));
    }
    certain[w] = c;
    expected[w] = e;
    half[w] = h;
    sum += word_sum * (2 * static_cast<uint64_t>(w) + 1);
  }
  *fp += sum;
  return ok;
}

// The fingerprint of a whole prior from the sum of its words' shares: any
// split of the words into ranges gives the same bits (addition mod 2^64).
inline int64_t finish_fingerprint(uint64_t sum, int64_t n) {
  uint64_t f = sum ^ (static_cast<uint64_t>(n) * 0x9E3779B97F4A7C15ull);
  f ^= f >> 31;
  f *= 0xBF58476D1CE4E5B9ull;
  f ^= f >> 29;
  return static_cast<int64_t>(f);
}

// `count` (1..64) bits of a little-endian bitmap of `bytes` bytes from bit
// `pos`, reading only the bytes that hold them.
LS_HD uint64_t load_bits(const uint8_t* bits, uint64_t bytes, uint64_t pos, int count) {
  const uint64_t first = pos >> 3;
  const int shift = static_cast<int>(pos & 7);
  const uint64_t need = (static_cast<uint64_t>(shift) + count + 7) >> 3;  // 1..9 bytes
  uint64_t lo = 0, hi = 0;
  if (need >= 8 && first + 8 <= bytes) {
    std::memcpy(&lo, bits + first, 8);
    if (need == 9) hi = bits[first + 8];
  } else {
    std::memcpy(&lo, bits + first, need);
  }
  uint64_t v = shift ? (lo >> shift) | (hi << (64 - shift)) : lo;
  return v & low_bits(count);
}

// `count` bits of a word array from bit `pos` (bits past the array read as zero).
LS_HD uint64_t load_word_bits(const uint64_t* words, int64_t nwords, int64_t pos, int count) {
  const int64_t w = pos >> 6;
  if ((pos & 63) == 0) return words[w] & low_bits(count);  // as in a segment from a layer's start (most are)
  const int shift = static_cast<int>(pos & 63);
  uint64_t v = words[w] >> shift;
  if (shift + count > 64 && w + 1 < nwords) v |= words[w + 1] << (64 - shift);
  return v & low_bits(count);
}

inline int64_t prior_words(int64_t n) { return (n + 63) / 64; }

// The certain, expected and half bits of `count` elements of a prior from
// element `elem` (nw: its words).
LS_HD void piece_words(const Prior& p, int64_t nw, int64_t elem, int count, uint64_t* c, uint64_t* e, uint64_t* h) {
  *c = load_word_bits(p.certain, nw, elem, count);
  *e = load_word_bits(p.expected, nw, elem, count);
  *h = load_word_bits(p.half, nw, elem, count);
}

// The bits of v at the set bits of mask, packed from bit 0 (x86's pext), and
// the inverse (pdep): loops over the mask's set bits, since the baseline
// x86-64 build has neither instruction.
LS_HD uint64_t extract_bits(uint64_t v, uint64_t mask) {
  uint64_t r = 0;
  for (int k = 0; mask; mask &= mask - 1, ++k) r |= ((v >> __builtin_ctzll(mask)) & 1) << k;
  return r;
}
LS_HD uint64_t deposit_bits(uint64_t v, uint64_t mask) {
  uint64_t r = 0;
  for (; mask; mask &= mask - 1, v >>= 1) r |= (v & 1) << __builtin_ctzll(mask);
  return r;
}

// A piece of a block: `len` elements of one layer, from element `elem` of its
// prior; on the encoding side its mask bits start at bit `bit_pos` of the
// caller's bitmap.
struct Segment {
  const Prior* prior;
  int64_t elem;
  int64_t len;
  uint64_t bit_pos;
};

// A block's certain and half elements: the set bits of its priors' certain
// and half words, in one pass over them.
struct Counts {
  uint64_t certain = 0, half = 0;
};
LS_HD Counts count_block(const Segment* segs, int nsegs) {
  Counts n;
  for (int s = 0; s < nsegs; ++s) {
    const Prior& p = *segs[s].prior;
    const int64_t nw = prior_words(p.n), elem = segs[s].elem, len = segs[s].len;
    if ((elem & 63) == 0) {  // whole words (one pass the compiler unrolls), then the last one's first bits
      const uint64_t* c = p.certain + (elem >> 6);
      const uint64_t* h = p.half + (elem >> 6);
      const int64_t whole = len / 64;
      for (int64_t j = 0; j < whole; ++j) {
        n.certain += static_cast<uint64_t>(popcount(c[j]));
        n.half += static_cast<uint64_t>(popcount(h[j]));
      }
      if (len % 64) {
        const uint64_t rest = low_bits(static_cast<int>(len % 64));
        n.certain += static_cast<uint64_t>(popcount(c[whole] & rest));
        n.half += static_cast<uint64_t>(popcount(h[whole] & rest));
      }
      continue;
    }
    for (int64_t t = 0; t < len; t += 64) {
      const int count = static_cast<int>(len - t < 64 ? len - t : 64);
      n.certain += static_cast<uint64_t>(popcount(load_word_bits(p.certain, nw, elem + t, count)));
      n.half += static_cast<uint64_t>(popcount(load_word_bits(p.half, nw, elem + t, count)));
    }
  }
  return n;
}

// 16-bit words of a block's raw bits (its half elements' bits, as they are).
LS_HD int64_t raw_words(uint64_t half) { return static_cast<int64_t>((half + 15) / 16); }

// Appends runs of bits to little-endian memory (any alignment): whole 64-bit
// words as they fill, and at flush the 16-bit words that hold the rest, the
// last one zero-padded.
class BitWriter {
 public:
  explicit BitWriter(void* out) : out_(static_cast<uint8_t*>(out)) {}
  // `count` (0..64) bits, those of v above them zero.
  LS_HD void put(uint64_t v, int count) {
    if (count == 0) return;
    acc_ |= v << fill_;
    fill_ += count;
    if (fill_ >= 64) {
      std::memcpy(out_, &acc_, 8);
      out_ += 8;
      fill_ -= 64;
      acc_ = fill_ ? v >> (count - fill_) : 0;
    }
  }
  void flush() {
    for (int k = 0; k < fill_; k += 16) {
      const auto w = static_cast<uint16_t>(acc_ >> k);
      std::memcpy(out_, &w, 2);
      out_ += 2;
    }
  }

 private:
  uint8_t* out_;
  uint64_t acc_ = 0;
  int fill_ = 0;
};

// Reads what BitWriter wrote as a block's raw bits: `words` 16-bit words at `in` (any alignment).
class RawReader {
 public:
  RawReader(const uint8_t* in, int64_t words) : in_(in), left_(words) {}
  // The next `count` (0..64) bits.
  LS_HD uint64_t take(int count) {
    if (count <= avail_) {
      const uint64_t r = buf_ & low_bits(count);
      buf_ = count < 64 ? buf_ >> count : 0;
      avail_ -= count;
      return r;
    }
    const int need = count - avail_;  // 1..64
    const int64_t n = left_ < 4 ? left_ : 4;
    uint64_t fresh = 0;
    std::memcpy(&fresh, in_, static_cast<size_t>(2 * n));
    in_ += 2 * n;
    left_ -= n;
    const int got = static_cast<int>(16 * n);
    if (got < need) {
      bad_ = true;
      buf_ = 0;
      avail_ = 0;
      return 0;
    }
    const uint64_t r = buf_ | (fresh & low_bits(need)) << avail_;
    buf_ = need < 64 ? fresh >> need : 0;
    avail_ = got - need;
    return r;
  }
  // Whether every word was read and the padding bits are zero.
  bool ok() const { return !bad_ && left_ == 0 && avail_ < 16 && buf_ == 0; }

 private:
  const uint8_t* in_;
  int64_t left_;
  uint64_t buf_ = 0;
  int avail_ = 0;
  bool bad_ = false;
};

// ---------------------------------------------------------------- symbols

// A bit's rANS symbol with P(1) = one / 2^15, 0 < one < 2^15: its start and
// frequency. Picked with a mask, not a conditional a compiler may turn into a
// branch: the bits are random, and a mispredicted branch a symbol costs more
// than the whole step.
struct Symbol {
  uint32_t start, freq;
};
LS_HD Symbol symbol(uint32_t b, uint32_t one) {
  const uint32_t zero = kScale - one, pick = 0u - b;
  return {zero & pick, zero ^ ((zero ^ one) & pick)};
}

// Encodes a symbol into state x, first writing its low word below *out (never
// below `begin`: *overflow instead) when x is too large for it; returns the state.
LS_HD uint32_t encode_step(uint32_t x, Symbol sym, const uint64_t* rcp, uint16_t* begin, uint16_t** out,
                           bool* overflow) {
  if (x >= (sym.freq << 17)) {  // renormalise: after it, (x / freq) << 15 < 2^32
    if (*out > begin) {
      *--*out = static_cast<uint16_t>(x);
    } else {
      *overflow = true;
    }
    x >>= 16;
  }
  const uint32_t d = divide(x, sym.freq, rcp);
  return (d << kProbBits) + (x - d * sym.freq) + sym.start;
}

// Decodes a bit with P(1) = one / 2^15 from state x: the bit, and in *next the
// state before renormalisation.
LS_HD uint32_t decode_step(uint32_t x, uint32_t one, uint32_t* next) {
  const uint32_t slot = x & (kScale - 1);
  const uint32_t b = slot >= kScale - one;
  const Symbol sym = symbol(b, one);
  *next = sym.freq * (x >> kProbBits) + slot - sym.start;
  return b;
}

// ---------------------------------------------------------------- pieces

// A piece as the lane loops see it: its `count` elements' probabilities, its
// uncertain elements, and (encoding) its mask bits.
struct LanePiece {
  const uint16_t* q;
  uint64_t u, m;
  int count;
};

// At most 64 elements of a segment: the unit of the block loops, with its
// prior's bit words (u: the uncertain elements).
struct Piece {
  const uint16_t* q;  // its elements' probabilities
  int count;
  uint64_t c, e, h, u;
};

// A block's pieces in order: each segment's from its first element, 64 at a time.
class Pieces {
 public:
  Pieces(const Segment* segs, int nsegs) : segs_(segs), nsegs_(nsegs) {}
  // The next pieces, at most max: how many it wrote to out (0 at the end),
  // and to lanes (unless null) as the lane loops take them.
  LS_HD int64_t run(Piece* out, LanePiece* lanes, int64_t max) {
    int64_t n = 0;
    while (n < max) {
      while (s_ < nsegs_ && t_ >= segs_[s_].len) {
        ++s_;
        t_ = 0;
      }
      if (s_ >= nsegs_) break;
      const Segment& seg = segs_[s_];
      const Prior& pr = *seg.prior;
      const int64_t elem = seg.elem + t_, left = seg.len - t_;
      const int64_t take = (left + 63) / 64 < max - n ? (left + 63) / 64 : max - n;
      const int64_t nw = prior_words(pr.n);
      for (int64_t j = 0; j < take; ++j) {
        const int count = left - 64 * j < 64 ? static_cast<int>(left - 64 * j) : 64;
        Piece& p = out[n + j];
        p.q = pr.q + elem + 64 * j;
        p.count = count;
        piece_words(pr, nw, elem + 64 * j, count, &p.c, &p.e, &p.h);
        p.u = ~(p.c | p.h) & low_bits(count);
        if (lanes) lanes[n + j] = {p.q, p.u, 0, count};
      }
      n += take;
      t_ += 64 * take;
    }
    return n;
  }

 private:
  const Segment* segs_;
  int nsegs_;
  int s_ = 0;
  int64_t t_ = 0;
};

// Whether the encoder tries lanes for a block (see the top).
LS_HD bool tries_lanes(const Segment* segs, int nsegs, uint64_t certain, uint64_t half, uint64_t lane_min) {
  uint64_t elems = 0;
  for (int s = 0; s < nsegs; ++s) elems += static_cast<uint64_t>(segs[s].len);
  const uint64_t uncertain = elems - certain - half;
  return uncertain > 0 && uncertain >= lane_min;
}

// ---------------------------------------------------------------- lanes

// The lanes' decoding side: their states and what is left of their words.
struct LaneStream {
  uint32_t x[kLanes];
  const uint8_t* in;
  int64_t left;
  bool bad;
  bool ok() const {
    bool done = !bad && left == 0;
    for (uint32_t v : x) done &= v == kLow;
    return done;
  }
};

// The lane loops, one element at a time: the definition. cpu/mask_lanes_simd.h
// has them in AVX-512 and AVX2 (the same bytes); a block function takes any of
// them as `Lanes`.
struct ScalarLanes {
  static LS_HD uint64_t extract(uint64_t v, uint64_t mask) { return extract_bits(v, mask); }
  static LS_HD uint64_t deposit(uint64_t v, uint64_t mask) { return deposit_bits(v, mask); }
  // Decodes n pieces' uncertain elements: bits[i], piece i's bits at its u.
  static LS_HD void decode(LaneStream& ls, const LanePiece* p, int64_t n, uint64_t* bits) {
    for (int64_t i = 0; i < n; ++i) {
      uint64_t v = 0;
      for (uint64_t rest = p[i].u; rest; rest &= rest - 1) {
        const int l = __builtin_ctzll(rest);
        uint32_t next;
        v |= static_cast<uint64_t>(decode_step(ls.x[l], p[i].q[l], &next)) << l;
        if (next < kLow) {
          uint16_t w = 0;
          if (ls.left > 0) {
            std::memcpy(&w, ls.in, 2);
            ls.in += 2;
            --ls.left;
          } else {
            ls.bad = true;
          }
          next = (next << 16) | w;
        }
        ls.x[l] = next;
      }
      bits[i] = v;
    }
  }
  // Encodes n pieces' uncertain elements into states x, the last piece's
  // first, writing words below *out (never below `begin`).
  static LS_HD void encode(uint32_t* x, const LanePiece* p, int64_t n, uint16_t* begin, uint16_t** out,
                           bool* overflow) {
    const uint64_t* rcp = reciprocals();
    for (int64_t i = n - 1; i >= 0; --i) {
      for (uint64_t rest = p[i].u; rest;) {  // the decoder reads lane 0's word first
        const int l = 63 - __builtin_clzll(rest);
        rest &= ~(uint64_t{1} << l);
        const uint32_t b = static_cast<uint32_t>(p[i].m >> l) & 1u;
        x[l] = encode_step(x[l], symbol(b, p[i].q[l]), rcp, begin, out, overflow);
      }
    }
  }
};

// ---------------------------------------------------------------- encoding

// Two rANS states share one word stream and take the symbols in turn (the
// decoder's first symbol on its first state, the next on the other, ...), so
// two dependency chains run side by side. Each symbol swaps the states.
class Encoder {
 public:
  // Writes words downwards from `end` and never below `begin`.
  Encoder(uint16_t* begin, uint16_t* end) : begin_(begin), out_(end), rcp_(reciprocals()) {}

  // One bit (0 or 1) with P(1) = one / 2^15, 0 < one < 2^15.
  LS_HD void bit(uint32_t b, uint32_t one) {
    const uint32_t next = encode_step(cur_, symbol(b, one), rcp_, begin_, &out_, &overflow_);
    cur_ = other_;
    other_ = next;
  }
  // A gap: G matching certain elements, then an exception (G < R), or no
  // exception in the R certain elements left (G == R). The decoder reads the
  // continue bits, then the remainder bits from the highest; rANS is last in,
  // first out, so they are put in the reverse order.
  void gap(uint64_t g, uint64_t r) {
    const uint64_t ones = g / kChunk, base = ones * kChunk;
    const bool zero = base + kChunk <= r;
    if (zero || r - base > 0) {
      const uint64_t rem = g - base;
      for (int k = 0; k < 15; ++k) bit(static_cast<uint32_t>(rem >> k) & 1u, kRemainderOne[k]);
    }
    if (zero) bit(0, kContinueOne);
    for (uint64_t j = 0; j < ones; ++j) bit(1, kContinueOne);
  }
  // Flushes the states (the one that took the last symbol, which the decoder
  // reads first, in front); returns the block's first word (its bytes run to
  // `end`), or nullptr when the words did not fit.
  uint16_t* finish() {
    if (out_ - begin_ < 4 || overflow_) return nullptr;
    for (uint32_t x : {cur_, other_}) {
      *--out_ = static_cast<uint16_t>(x >> 16);
      *--out_ = static_cast<uint16_t>(x);
    }
    return out_;
  }

 private:
  uint16_t* begin_;
  uint16_t* out_;
  const uint64_t* rcp_;
  uint32_t cur_ = kLow, other_ = kLow;  // the state for the next symbol, and the other
  bool overflow_ = false;
};

// A lane stream as the encoder writes it, below `top` in a scratch buffer
// (the two-state stream being written at the same time): its pieces go to
// the lane loops a run at a time, the last piece first.
template <class Lanes>
class LaneSink {
 public:
  LaneSink(uint16_t* begin, uint16_t* top) : begin_(begin), top_(top), out_(top) {
    for (uint32_t& v : x_) v = kLow;
  }
  // The piece before the last one added.
  LS_HD void add(const uint16_t* q, uint64_t u, uint64_t m, int count) {
    lp_[kLanePieces - 1 - n_] = {q, u, m, count};
    if (++n_ == kLanePieces) flush();
  }
  LS_HD void flush() {
    Lanes::encode(x_, lp_ + (kLanePieces - n_), n_, begin_, &out_, &overflow_);
    n_ = 0;
  }
  // After flush(): the lane words (below top) and the final states.
  const uint16_t* words() const { return out_; }
  int64_t size() const { return top_ - out_; }
  bool overflow() const { return overflow_; }
  const uint32_t* states() const { return x_; }

 private:
  LanePiece lp_[kLanePieces];
  uint32_t x_[kLanes];
  uint16_t* begin_;
  uint16_t* top_;
  uint16_t* out_;
  int64_t n_ = 0;
  bool overflow_ = false;
};

// A block's two-state stream, below `end`: every gap, and its uncertain
// elements unless a lane sink takes them. Returns its first word, or nullptr.
template <class Lanes>
LS_HD uint16_t* encode_states(const Segment* segs, int nsegs, const uint8_t* bits, uint64_t bytes, uint16_t* begin,
                              uint16_t* end, LaneSink<Lanes>* lanes) {
  Encoder enc(begin, end);
  uint64_t cnt = 0, after = 0;  // matches before the next exception / certain elements after this point
  for (int s = nsegs - 1; s >= 0; --s) {
    const Segment& seg = segs[s];
    const Prior& p = *seg.prior;
    const int64_t nw = prior_words(p.n);
    for (int64_t t = (seg.len - 1) / 64 * 64; t >= 0; t -= 64) {
      const int count = static_cast<int>(seg.len - t < 64 ? seg.len - t : 64);
      const uint64_t m = load_bits(bits, bytes, seg.bit_pos + static_cast<uint64_t>(t), count);
      uint64_t c, e, h;
      piece_words(p, nw, seg.elem + t, count, &c, &e, &h);
      const uint64_t all = low_bits(count), x = (m ^ e) & c, matches = c & ~x;
      const uint16_t* q = p.q + seg.elem + t;
      uint64_t u = ~(c | h) & all;
      if (lanes) {
        if (u) lanes->add(q, u, m, count);
        u = 0;
      }
      if ((u | x) == 0) {  // no exception, and no uncertain element for this stream
        const uint64_t k = c == all ? static_cast<uint64_t>(count) : static_cast<uint64_t>(popcount(c));
        cnt += k;
        after += k;
        continue;
      }
      if (x == 0) {  // no exception: the certain elements only add to the counts, in any order
        const uint64_t k = static_cast<uint64_t>(popcount(matches));
        cnt += k;
        after += k;
        for (uint64_t rest = u; rest;) {
          const int b = 63 - __builtin_clzll(rest);
          rest &= ~(uint64_t{1} << b);
          enc.bit(static_cast<uint32_t>(m >> b) & 1u, q[b]);
        }
        continue;
      }
      uint64_t events = u | x;
      int hi = 64;
      while (events) {
        const int b = 63 - __builtin_clzll(events);
        events &= ~(uint64_t{1} << b);
        const uint64_t k = static_cast<uint64_t>(popcount(matches & low_bits(hi) & ~low_bits(b + 1)));
        cnt += k;
        after += k;
        if ((u >> b) & 1) {
          enc.bit(static_cast<uint32_t>(m >> b) & 1u, q[b]);
        } else {
          enc.gap(cnt, after);
          cnt = 0;
          after += 1;
        }
        hi = b;
      }
      const uint64_t k = static_cast<uint64_t>(popcount(matches & low_bits(hi)));
      cnt += k;
      after += k;
    }
  }
  enc.gap(cnt, after);
  if (lanes) lanes->flush();
  return enc.finish();
}

// The words a lane stream may take: scratch of each thread's own, reused.
inline uint16_t* lane_scratch(int64_t words) {
  static thread_local std::vector<uint16_t> scratch;
  if (static_cast<int64_t>(scratch.size()) < words) scratch.resize(static_cast<size_t>(words));
  return scratch.data();
}

// Codes one block (its segments, in order) from a bitmap of `bytes` bytes.
// Returns the block's first word (its bytes run to `end`), or nullptr when the
// block takes more than the words in [begin, end). lane_min and
// lane_words_min: the constants but in tests.
template <class Lanes = ScalarLanes>
LS_HD uint16_t* encode_block(const Segment* segs, int nsegs, const uint8_t* bits, uint64_t bytes, uint16_t* begin,
                              uint16_t* end, uint64_t lane_min = kLaneMin, int64_t lane_words_min = kLaneWordsMin) {
  const Counts counts = count_block(segs, nsegs);
  const uint64_t half = counts.half;
  const int64_t raw = raw_words(half);
  if (end - begin < raw + kBlockMinWords) return nullptr;
  if (raw) {  // the half elements' bits, as they are, after the rANS words
    BitWriter w(end - raw);
    for (int s = 0; s < nsegs; ++s) {
      const Segment& seg = segs[s];
      const int64_t nw = prior_words(seg.prior->n);
      for (int64_t t = 0; t < seg.len; t += 64) {
        const int count = static_cast<int>(seg.len - t < 64 ? seg.len - t : 64);
        const uint64_t h = load_word_bits(seg.prior->half, nw, seg.elem + t, count);
        if (h) w.put(Lanes::extract(load_bits(bits, bytes, seg.bit_pos + static_cast<uint64_t>(t), count), h), popcount(h));
      }
    }
    w.flush();
  }
  if (tries_lanes(segs, nsegs, counts.certain, half, lane_min)) {
    const int64_t room = end - raw - begin;
    uint16_t* scratch = lane_scratch(room);
    LaneSink<Lanes> sink(scratch, scratch + room);
    uint16_t* head = encode_states(segs, nsegs, bits, bytes, begin, end - raw, &sink);
    const int64_t lane_words = sink.size();
    if (head && !sink.overflow() && lane_words >= lane_words_min && head - begin >= lane_words + kLaneFixedWords + 1) {
      uint16_t* first = head - lane_words;
      std::memmove(first, sink.words(), static_cast<size_t>(2 * lane_words));
      for (int l = kLanes - 1; l >= 0; --l) {
        *--first = static_cast<uint16_t>(sink.states()[l] >> 16);
        *--first = static_cast<uint16_t>(sink.states()[l]);
      }
      const auto n = static_cast<uint64_t>(lane_words + 2 * kLanes);
      for (int k = 3; k >= 0; --k) *--first = static_cast<uint16_t>(n >> (16 * k));
      *--first = 1;
      return first;
    }
  }
  uint16_t* head = encode_states<Lanes>(segs, nsegs, bits, bytes, begin, end - raw, nullptr);
  if (head == nullptr || head == begin) return nullptr;
  *--head = 0;
  return head;
}

// ---------------------------------------------------------------- decoding

class Decoder {
 public:
  // A block of `words` 16-bit words at `in` (any alignment).
  Decoder(const uint8_t* in, int64_t words) : in_(in), left_(words) {
    if (left_ < 4) {
      bad_ = true;
      return;
    }
    cur_ = word();
    cur_ |= word() << 16;
    other_ = word();
    other_ |= word() << 16;
    if (cur_ < kLow || other_ < kLow) bad_ = true;
  }

  LS_HD uint32_t bit(uint32_t one) {
    uint32_t next;
    const uint32_t b = decode_step(cur_, one, &next);
    if (next < kLow) next = (next << 16) | word();
    cur_ = other_;
    other_ = next;
    return b;
  }
  // The gap the encoder put with r certain elements left (see Encoder::gap).
  uint64_t gap(uint64_t r) {
    uint64_t base = 0;
    bool zero = false;
    while (base + kChunk <= r) {
      if (!bit(kContinueOne)) {
        zero = true;
        break;
      }
      base += kChunk;
    }
    if (!zero && r - base == 0) return base;
    uint64_t rem = 0;
    for (int k = 14; k >= 0; --k) rem |= static_cast<uint64_t>(bit(kRemainderOne[k])) << k;
    if (!zero && rem > r - base) {
      bad_ = true;
      rem = r - base;
    }
    return base + rem;
  }
  // Whether the block was read exactly: every word, both states back to the start.
  bool ok() const { return !bad_ && left_ == 0 && cur_ == kLow && other_ == kLow; }

 private:
  LS_HD uint32_t word() {
    if (left_ <= 0) {
      bad_ = true;
      return 0;
    }
    uint16_t w;
    std::memcpy(&w, in_, 2);
    in_ += 2;
    --left_;
    return w;
  }

  const uint8_t* in_;
  int64_t left_;
  uint32_t cur_ = kLow, other_ = kLow;
  bool bad_ = false;
};

// An integer from `count` (at most 4) little-endian 16-bit words at `in`.
LS_HD uint64_t load_words(const uint8_t* in, int count) {
  uint64_t v = 0;
  for (int k = 0; k < count; ++k) {
    uint16_t w;
    std::memcpy(&w, in + 2 * k, 2);
    v |= static_cast<uint64_t>(w) << (16 * k);
  }
  return v;
}

// Decodes one block into `out` (the block's bits, from a word boundary);
// false when the block is not exactly a valid stream for these segments.
template <class Lanes = ScalarLanes>
LS_HD bool decode_block(const Segment* segs, int nsegs, const uint8_t* in, int64_t words, uint64_t* out) {
  const Counts counts = count_block(segs, nsegs);
  const uint64_t half = counts.half;
  uint64_t left = counts.certain;
  const int64_t raw_len = raw_words(half);
  const int64_t body = words - raw_len;  // the rANS words
  if (body < kBlockMinWords) return false;
  const uint64_t which = load_words(in, 1);
  if (which > 1) return false;
  const bool lanes = which == 1;
  LaneStream ls{};
  int64_t lane_words = 1;  // with the word saying which, and the count
  if (lanes) {
    if (body < 1 + kLaneFixedWords + 4) return false;
    const uint64_t n = load_words(in + 2, 4);
    if (n < 2 * kLanes || n > static_cast<uint64_t>(body - 9)) return false;
    lane_words = 5 + static_cast<int64_t>(n);
    for (int l = 0; l < kLanes; ++l) {
      ls.x[l] = static_cast<uint32_t>(load_words(in + 10 + 4 * l, 2));
      ls.bad |= ls.x[l] < kLow;
    }
    ls.in = in + 10 + 4 * kLanes;
    ls.left = static_cast<int64_t>(n) - 2 * kLanes;
  }
  Decoder dec(in + 2 * lane_words, body - lane_words);
  RawReader raw(in + 2 * body, raw_len);
  BitWriter w(out);
  Piece chunk[kLanePieces];  // the pieces, a run at a time: with lanes, the lane loops' run
  LanePiece lp[kLanePieces];
  uint64_t lane_bits[kLanePieces];
  Pieces pieces(segs, nsegs);
  uint64_t run = dec.gap(left);  // matching certain elements before the next exception
  for (;;) {
    const int64_t n = pieces.run(chunk, lanes ? lp : nullptr, kLanePieces);
    if (n == 0) break;
    if (lanes) Lanes::decode(ls, lp, n, lane_bits);
    for (int64_t i = 0; i < n; ++i) {
      const Piece& p = chunk[i];
      const int count = p.count;
      const uint64_t c = p.c, e = p.e, h = p.h, u = p.u;
      const uint64_t nc = static_cast<uint64_t>(popcount(c));
      const uint16_t* qp = p.q;
      const uint64_t hv = h ? Lanes::deposit(raw.take(popcount(h)), h) : 0;
      const uint64_t lv = lanes ? lane_bits[i] : 0;  // with lanes, the uncertain elements' bits
      uint64_t v = e | hv | lv;
      if (run >= nc) {  // no exception in this word
        if (!lanes) {
          for (uint64_t rest = u; rest; rest &= rest - 1) {
            const int b = __builtin_ctzll(rest);
            v |= static_cast<uint64_t>(dec.bit(qp[b])) << b;
          }
        }
        run -= nc;
        left -= nc;
      } else {
        v = hv | lv;
        for (int b = 0; b < count; ++b) {
          if ((u >> b) & 1) {
            if (!lanes) v |= static_cast<uint64_t>(dec.bit(qp[b])) << b;
          } else if (!((c >> b) & 1)) {
            continue;  // a half element: its bit came with the raw bits
          } else if (run > 0) {
            v |= ((e >> b) & 1) << b;
            --run;
            --left;
          } else {
            v |= (((e >> b) & 1) ^ 1) << b;
            --left;
            run = dec.gap(left);
          }
        }
      }
      w.put(v, count);
    }
  }
  w.flush();
  return dec.ok() && raw.ok() && (!lanes || ls.ok());
}

}  // namespace layersel::maskcode
