// The position codec of the compact sparse-COO wire format (the stream and its
// codes: layersel_ext/wire_coo.py, whose numpy codec is this one's twin and
// writes the same bytes). A tensor's selected entries travel as flat row-major
// offsets in one of seven encodings; encoding reads fl4health's int64
// [nnz, ndim] indices, decoding writes them.
//
// Both directions run in two passes over fixed ranges (kRange entries, or
// kRange payload bytes for the varint and bitmap codes): the first checks and
// counts, a serial scan gives every range its start, the second writes. Ranges
// depend only on the sizes, so the bytes never depend on the thread count. No
// torch here: csrc/cpu/wire_coo.cpp runs the ranges on at::parallel_for, and
// csrc/tests/test_coo_codec.cpp runs them on one thread under ASan/UBSan.
//
// Decoding trusts nothing in the payload: every length, offset, gap and padding
// bit is checked in the first pass, and the second pass only runs on a payload
// the first one accepted (and only reads and writes where the first one looked).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "chunks.h"
#include "macros.h"

namespace layersel::coo {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the wire format is little-endian, as is this host");

enum Code : int { kU32 = 1, kU64 = 2, kGap8 = 3, kGap16 = 4, kGap32 = 5, kVarint = 6, kBitmap = 7 };
constexpr int kMaxNdim = 64;
constexpr int64_t kRange = int64_t{1} << 16;
constexpr uint64_t kNone = ~uint64_t{0};
// Sums of (gap + 1) saturate here: every gap is below 2**62 once checked, so
// adding one to a sum below 2**63 never wraps.
constexpr uint64_t kSaturated = uint64_t{1} << 63;

inline uint64_t gap_width(int64_t code) { return code == kGap8 ? 1 : code == kGap16 ? 2 : 4; }
inline uint64_t varint_length(uint64_t v) { return (70 - static_cast<uint64_t>(__builtin_clzll(v | 1))) / 7; }
inline uint64_t saturating_add(uint64_t sum, uint64_t x) { return std::min(sum + std::min(x, kSaturated), kSaturated); }

// A shape (sizes already checked by the caller: ndim <= kMaxNdim, numel < 2**62).
struct Dims {
  int ndim = 0;
  int64_t d[kMaxNdim] = {};
  uint64_t numel = 1;
};

// The hot loops are instantiated for 1 and 2 dimensions (biases, weights: the
// common cases, fully unrolled) and for any number (ND == 0).
template <int ND>
inline int ndim_of(const Dims& s) {
  return ND > 0 ? ND : s.ndim;
}

// Calls f(std::integral_constant<int, ND>) with the instantiation for s.
template <class F>
inline void with_ndim(const Dims& s, F&& f) {
  if (s.ndim == 1) {
    f(std::integral_constant<int, 1>());
  } else if (s.ndim == 2) {
    f(std::integral_constant<int, 2>());
  } else {
    f(std::integral_constant<int, 0>());
  }
}

// Row-major offset of one index row; `inside` turns false when an index is
// outside the shape (the offset is then meaningless). No branch per index.
template <int ND>
inline uint64_t flat_offset(const int64_t* row, const Dims& s, bool& inside) {
  uint64_t off = 0;
  for (int k = 0; k < ndim_of<ND>(s); ++k) {
    const uint64_t x = static_cast<uint64_t>(row[k]), size = static_cast<uint64_t>(s.d[k]);
    inside &= x < size;  // a negative index is a huge unsigned one
    off = off * size + x;
  }
  return off;
}

// The index row of an offset (< numel); moving forward within the last
// dimension costs no division, so increasing offsets unravel cheaply.
template <int ND>
struct Unravel {
  const Dims& s;
  int64_t idx[ND > 0 ? ND : kMaxNdim] = {};
  uint64_t at = kNone;

  explicit Unravel(const Dims& dims) : s(dims) {}
  void move_to(uint64_t off) {
    const int last = ndim_of<ND>(s) - 1;
    if (last >= 0 && at != kNone && off > at && off - at < static_cast<uint64_t>(s.d[last] - idx[last])) {
      idx[last] += static_cast<int64_t>(off - at);
    } else {
      uint64_t rest = off;
      for (int k = last; k >= 0; --k) {
        idx[k] = static_cast<int64_t>(rest % static_cast<uint64_t>(s.d[k]));
        rest /= static_cast<uint64_t>(s.d[k]);
      }
    }
    at = off;
  }
  void write(int64_t* row) const {
    for (int k = 0; k < ndim_of<ND>(s); ++k) row[k] = idx[k];
  }
};

template <class T>
inline T load_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <class T>
inline void store_le(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

// Ranges of several tensors as one flat list: tensor t's items[t] items cut
// into ranges of `per` (the last one shorter); its ranges are [first[t], first[t + 1]).
struct Ranges {
  std::vector<int64_t> items, first;  // first: n + 1 entries
  int64_t per;
  explicit Ranges(std::vector<int64_t> counts, int64_t per_range = kRange)
      : items(std::move(counts)), first(items.size() + 1, 0), per(per_range) {
    for (size_t t = 0; t < items.size(); ++t) first[t + 1] = first[t] + num_chunks(items[t], per);
  }
  int64_t total() const { return first.back(); }
  // body(tensor, range, begin, end) for every range, spread by ParallelFor(n, f)
  // (f(begin, end) over a split of [0, n), possibly concurrently).
  template <class ParallelFor, class Body>
  void each(ParallelFor&& parallel_for, Body&& body) const {
    parallel_for(total(), [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; ++r) {
        const int32_t t = tensor_of_chunk(first.data(), static_cast<int32_t>(items.size()), r);
        const int64_t begin = (r - first[t]) * per;
        body(t, r, begin, std::min(begin + per, items[t]));
      }
    });
  }
};

// ------------------------------------------------------------------ encoding

struct EncodeTensor {
  const int64_t* indices = nullptr;  // [nnz, ndim], row-major, contiguous
  int64_t nnz = 0;
  Dims dims;
};

struct EncodeStats {
  bool in_range = true, increasing = true;
  uint64_t max_gap = 0, varint_bytes = 0;
};

// Entries [begin, end) of t: all inside the shape? offsets increasing (from the
// entry before begin)? and the gaps' largest value and varint bytes (only
// meaningful when increasing). Branch-free per entry.
template <int ND, bool GAPS>
inline EncodeStats encode_stats_nd(const EncodeTensor& t, int64_t begin, int64_t end) {
  EncodeStats st;
  const int nd = ndim_of<ND>(t.dims);
  bool inside = true, increasing = true, ignored = true;
  // The smallest offset the next entry may have (the entry before begin: in
  // range or reported by its own range).
  uint64_t next = begin == 0 ? 0 : flat_offset<ND>(t.indices + (begin - 1) * nd, t.dims, ignored) + 1;
  uint64_t max_gap = 0, varint_bytes = 0;
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t off = flat_offset<ND>(t.indices + i * nd, t.dims, inside);
    increasing &= off >= next;
    if constexpr (GAPS) {
      const uint64_t gap = off - next;
      max_gap = std::max(max_gap, gap);
      varint_bytes += varint_length(gap);
    }
    next = off + 1;
  }
  st.in_range = inside;
  st.increasing = increasing;
  st.max_gap = max_gap;
  st.varint_bytes = varint_bytes;
  return st;
}

// Bytes of a bitmap over numel elements.
inline uint64_t bitmap_bytes(uint64_t numel) { return (numel + 7) / 8; }

// A bitmap is smaller than one byte per entry: increasing offsets then take
// it whatever their gaps (every other code takes >= nnz bytes), and the gaps
// need not be measured.
inline bool bitmap_wins(uint64_t nnz, uint64_t numel) { return bitmap_bytes(numel) < nnz; }
inline bool bitmap_wins(const EncodeTensor& t) { return bitmap_wins(static_cast<uint64_t>(t.nnz), t.dims.numel); }

// encode_stats_nd<1, true> for flat offsets (what the compact client sends),
// written with each entry compared to the one before it in memory rather than
// to a carried value: no dependency from one iteration to the next, so the loop
// vectorises in the ISA clones of csrc/cpu/wire_coo.cpp. An entry at 2**64 - 1
// (-1) differs from encode_stats_nd in `increasing` only: it is outside the
// shape, which the caller reports first either way.
LS_HD EncodeStats encode_stats_flat(const int64_t* x, uint64_t numel, int64_t begin, int64_t end) {
  EncodeStats st;
  if (begin == end) return st;
  const uint64_t first = static_cast<uint64_t>(x[begin]);
  const uint64_t next = begin == 0 ? 0 : static_cast<uint64_t>(x[begin - 1]) + 1;
  uint64_t outside = first >= numel, unordered = first < next, max_gap = first - next;
  uint64_t varint_bytes = varint_length(first - next);
  for (int64_t i = begin + 1; i < end; ++i) {
    const uint64_t off = static_cast<uint64_t>(x[i]), gap = off - static_cast<uint64_t>(x[i - 1]) - 1;
    outside |= off >= numel;
    unordered |= off <= static_cast<uint64_t>(x[i - 1]);
    max_gap = max_gap > gap ? max_gap : gap;
    uint64_t length = 1;  // varint_length without a count of leading zeros (AVX2 has none)
    for (int k = 7; k < 64; k += 7) length += (gap >> k) != 0;
    varint_bytes += length;
  }
  st.in_range = !outside;
  st.increasing = !unordered;
  st.max_gap = max_gap;
  st.varint_bytes = varint_bytes;
  return st;
}

LS_HD EncodeStats encode_stats(const EncodeTensor& t, int64_t begin, int64_t end) {
  EncodeStats st;
  if (t.dims.ndim == 1 && !bitmap_wins(t)) return encode_stats_flat(t.indices, t.dims.numel, begin, end);
  with_ndim(t.dims, [&](auto nd) {
    constexpr int ND = decltype(nd)::value;
    st = bitmap_wins(t) ? encode_stats_nd<ND, false>(t, begin, end) : encode_stats_nd<ND, true>(t, begin, end);
  });
  return st;
}

// The smallest encoding (ties: the smaller code), as wire_coo._encode_positions.
inline int choose_code(uint64_t nnz, uint64_t numel, const EncodeStats& st, uint64_t* bytes) {
  if (st.increasing && bitmap_wins(nnz, numel)) {
    *bytes = bitmap_bytes(numel);
    return kBitmap;
  }
  int code = numel < (uint64_t{1} << 32) ? kU32 : kU64;
  uint64_t size = (code == kU32 ? 4 : 8) * nnz;
  auto consider = [&](int c, uint64_t s) {
    if (s < size || (s == size && c < code)) code = c, size = s;
  };
  if (st.increasing) {
    if (st.max_gap <= 0xFF) {
      consider(kGap8, nnz);
    } else if (st.max_gap <= 0xFFFF) {
      consider(kGap16, 2 * nnz);
    } else if (st.max_gap <= 0xFFFFFFFFu) {
      consider(kGap32, 4 * nnz);
    }
    consider(kVarint, st.varint_bytes);
    consider(kBitmap, bitmap_bytes(numel));
  }
  *bytes = size;
  return code;
}

// Entries [begin, end) of t into its payload `out` (varint_at: where this
// range's first varint starts), in one loop per (dimensions, code); bitmaps:
// encode_bitmap_nd.
template <int ND, int CODE>
inline void encode_write_nd(const EncodeTensor& t, int64_t begin, int64_t end, uint8_t* out, uint64_t varint_at) {
  const int nd = ndim_of<ND>(t.dims);
  bool inside = true;  // checked by the plan
  uint64_t next = begin == 0 ? 0 : flat_offset<ND>(t.indices + (begin - 1) * nd, t.dims, inside) + 1;
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t off = flat_offset<ND>(t.indices + i * nd, t.dims, inside);
    const uint64_t gap = off - next;
    next = off + 1;
    if constexpr (CODE == kU32) {
      store_le(out + 4 * i, static_cast<uint32_t>(off));
    } else if constexpr (CODE == kU64) {
      store_le(out + 8 * i, off);
    } else if constexpr (CODE == kGap8) {
      out[i] = static_cast<uint8_t>(gap);
    } else if constexpr (CODE == kGap16) {
      store_le(out + 2 * i, static_cast<uint16_t>(gap));
    } else if constexpr (CODE == kGap32) {
      store_le(out + 4 * i, static_cast<uint32_t>(gap));
    } else if constexpr (CODE == kVarint) {
      uint64_t v = gap;
      if (v < (1u << 14) && i + 1 < end) {  // one or two bytes, without a branch on which
        const unsigned two = v >= 0x80;
        out[varint_at] = static_cast<uint8_t>((v & 0x7F) | (two << 7));
        out[varint_at + 1] = static_cast<uint8_t>(v >> 7);  // a one-byte varint's: the next one overwrites it
        varint_at += 1 + two;
        continue;
      }
      while (v >= 0x80) {
        out[varint_at++] = static_cast<uint8_t>(v | 0x80);
        v >>= 7;
      }
      out[varint_at++] = static_cast<uint8_t>(v);
    }
  }
}

// Entries [begin, end) of t into its bitmap (`bytes` long, zeroed beforehand),
// a 64-bit word at a time. Only the words holding the range's first and last
// entries (and a last word cut short by the payload's end) can hold another
// range's bits: those are OR-ed in byte by byte, atomically; every word in
// between is this range's alone and stored whole. Returns whether every entry
// was inside the shape and after the one before (a tensor written as a bitmap
// without a plan pass checks here; an entry outside is not written).
template <int ND>
inline bool encode_bitmap_nd(const EncodeTensor& t, int64_t begin, int64_t end, uint8_t* out, uint64_t bytes) {
  const int nd = ndim_of<ND>(t.dims);
  bool ignored = true, valid = true;
  const uint64_t first_word = flat_offset<ND>(t.indices + begin * nd, t.dims, ignored) >> 6;
  const uint64_t last_word = flat_offset<ND>(t.indices + (end - 1) * nd, t.dims, ignored) >> 6;
  uint64_t next = begin == 0 ? 0 : flat_offset<ND>(t.indices + (begin - 1) * nd, t.dims, ignored) + 1;
  auto flush = [&](uint64_t w, uint64_t bits) {
    // Stored whole only strictly between the edge words (entries out of order,
    // which make the write invalid, can land anywhere: atomically too).
    if (w <= first_word || w >= last_word || 8 * w + 8 > bytes) {
      for (uint64_t k = 0; k < 8 && 8 * w + k < bytes; ++k) {
        const uint8_t b = static_cast<uint8_t>(bits >> (8 * k));
        if (b) __atomic_fetch_or(&out[8 * w + k], b, __ATOMIC_RELAXED);
      }
    } else {
      store_le(out + 8 * w, bits);
    }
  };
  uint64_t word = first_word, bits = 0;
  for (int64_t i = begin; i < end; ++i) {
    bool inside = true;
    const uint64_t off = flat_offset<ND>(t.indices + i * nd, t.dims, inside);
    valid &= inside && off >= next;
    next = off + 1;
    if (!inside) continue;
    if ((off >> 6) != word) {
      flush(word, bits);
      word = off >> 6, bits = 0;
    }
    bits |= uint64_t{1} << (off & 63);
  }
  flush(word, bits);
  return valid;
}

// Returns false when a bitmap's entries were not all inside and increasing.
inline bool encode_write(const EncodeTensor& t, int code, int64_t begin, int64_t end, uint8_t* out,
                         uint64_t varint_at, uint64_t bytes) {
  bool valid = true;
  with_ndim(t.dims, [&](auto nd) {
    constexpr int ND = decltype(nd)::value;
    switch (code) {
      case kU32: return encode_write_nd<ND, kU32>(t, begin, end, out, varint_at);
      case kU64: return encode_write_nd<ND, kU64>(t, begin, end, out, varint_at);
      case kGap8: return encode_write_nd<ND, kGap8>(t, begin, end, out, varint_at);
      case kGap16: return encode_write_nd<ND, kGap16>(t, begin, end, out, varint_at);
      case kGap32: return encode_write_nd<ND, kGap32>(t, begin, end, out, varint_at);
      case kVarint: return encode_write_nd<ND, kVarint>(t, begin, end, out, varint_at);
      default: valid = encode_bitmap_nd<ND>(t, begin, end, out, bytes);
    }
  });
  return valid;
}

struct EncodePlan {
  int64_t out_of_range = -1;  // the first tensor with an index outside its shape (then nothing else is set)
  bool speculative = false;   // bitmap_wins tensors planned as bitmaps unchecked: write_encoding checks them
  std::vector<int> code;
  std::vector<uint64_t> bytes, start;  // per tensor: payload bytes and where it starts
  uint64_t total = 0;
  std::vector<uint64_t> varint_at;  // per range
};

// ParallelFor(n, f) calls f(begin, end) over a split of [0, n), possibly concurrently.
// speculative: a tensor where bitmap_wins is planned as a bitmap without this
// pass (its entries are read once, by the write, which checks them); when
// write_encoding then reports a bad one, plan again without speculation.
// stats: encode_stats, or a caller's copy of it compiled for its CPU.
template <class ParallelFor, class Stats = EncodeStats (*)(const EncodeTensor&, int64_t, int64_t)>
EncodePlan plan_encoding(const std::vector<EncodeTensor>& ts, const Ranges& ranges, ParallelFor&& parallel_for,
                         bool speculative = true, Stats stats = encode_stats) {
  std::vector<EncodeStats> st(static_cast<size_t>(ranges.total()));
  ranges.each(parallel_for, [&](int32_t t, int64_t r, int64_t begin, int64_t end) {
    if (speculative && bitmap_wins(ts[t])) return;  // stats left as "inside, increasing"
    st[r] = stats(ts[t], begin, end);
  });
  EncodePlan plan;
  plan.speculative = speculative;
  plan.varint_at.resize(st.size());
  for (size_t t = 0; t < ts.size(); ++t) {
    EncodeStats all;
    for (int64_t r = ranges.first[t]; r < ranges.first[t + 1]; ++r) {
      plan.varint_at[r] = all.varint_bytes;
      all.in_range &= st[r].in_range;
      all.increasing &= st[r].increasing;
      all.max_gap = std::max(all.max_gap, st[r].max_gap);
      all.varint_bytes += st[r].varint_bytes;
    }
    if (!all.in_range) {
      plan.out_of_range = static_cast<int64_t>(t);
      return plan;
    }
    uint64_t bytes = 0;
    plan.code.push_back(choose_code(static_cast<uint64_t>(ts[t].nnz), ts[t].dims.numel, all, &bytes));
    plan.bytes.push_back(bytes);
    plan.start.push_back(plan.total);
    plan.total += bytes;
  }
  return plan;
}

// Every tensor's payload into out[plan.total]. False when a speculatively
// planned bitmap held an entry outside its shape or out of order: the bytes
// are then meaningless, and the caller plans again with speculative = false.
template <class ParallelFor>
bool write_encoding(const std::vector<EncodeTensor>& ts, const Ranges& ranges, const EncodePlan& plan, uint8_t* out,
                    ParallelFor&& parallel_for) {
  for (size_t t = 0; t < ts.size(); ++t) {
    if (plan.code[t] == kBitmap && plan.bytes[t]) std::memset(out + plan.start[t], 0, plan.bytes[t]);
  }
  std::vector<char> valid(static_cast<size_t>(ranges.total()), 1);
  ranges.each(parallel_for, [&](int32_t t, int64_t r, int64_t begin, int64_t end) {
    valid[r] = encode_write(ts[t], plan.code[t], begin, end, out + plan.start[t], plan.varint_at[r], plan.bytes[t]);
  });
  return std::all_of(valid.begin(), valid.end(), [](char v) { return v != 0; });
}

// ------------------------------------------------------------------ decoding

// a + b, or kSaturated when the sum reaches it (or wraps).
inline uint64_t capped_sum(uint64_t a, uint64_t b) {
  uint64_t s = 0;
  return __builtin_add_overflow(a, b, &s) || s > kSaturated ? kSaturated : s;
}

// The bytes a decoder allocates for one tensor (wire_coo.decoded_bytes is the
// Python twin): its int64 [nnz, ndim] indices and its value bytes rounded up to
// a multiple of 64, at most kSaturated: a hostile meta cannot wrap the sum, so
// the caller can compare it with its limit before it allocates anything.
inline uint64_t decoded_bytes(uint64_t nnz, uint64_t ndim, uint64_t value_bytes) {
  uint64_t indices = 0;
  if (__builtin_mul_overflow(nnz, ndim * 8, &indices)) return kSaturated;
  const uint64_t values = value_bytes >= kSaturated ? kSaturated : (value_bytes + 63) / 64 * 64;
  return capped_sum(indices, values);
}

struct DecodeTensor {
  int64_t code = 0;  // as the meta says: anything
  const uint8_t* payload = nullptr;
  uint64_t size = 0;  // payload bytes
  int64_t nnz = 0;    // as the meta says (<= numel, checked by the caller)
  Dims dims;
  int64_t* indices = nullptr;  // [nnz, ndim] output, written by write_decoding only
};

// The items a tensor's ranges cover: entries, or payload bytes for varints and bitmaps.
inline int64_t decode_items(const DecodeTensor& t) {
  return t.code == kVarint || t.code == kBitmap ? static_cast<int64_t>(t.size) : t.nnz;
}

// What the first pass finds in one range.
struct DecodeStats {
  uint64_t count = 0;  // entries starting in the range
  uint64_t sum = 0;    // gap codes: sum of (gap + 1), saturating
  bool offset_past = false, gap_past = false, long_varint = false, huge_varint = false;
};

// One varint at p (its last byte, < 0x80, is before the payload's end: checked).
// Gaps of one or two bytes (almost all) take no unpredictable branch.
inline uint64_t read_varint(const uint8_t* p, uint64_t* length, bool* huge) {
  const unsigned two = p[0] >> 7;  // p[1] exists when p[0] says more bytes follow
  const uint8_t second = p[two];   // p[0] again for a one-byte varint
  if (second < 0x80) {
    *length = 1 + two;
    return (p[0] & 0x7Fu) | ((static_cast<uint64_t>(second & 0x7F) << 7) & (0 - static_cast<uint64_t>(two)));
  }
  uint64_t v = 0;
  uint64_t j = 0;
  for (;; ++j) {
    const uint8_t b = p[j];
    if (j < 10) v |= static_cast<uint64_t>(b & 0x7F) << (7 * j);
    if (j == 9 && b > 1) *huge = true;
    if (b < 0x80) break;
  }
  *length = j + 1;
  return v;
}

// The first varint that starts in [begin, end): the payload's varints are
// found from any byte by skipping to just after a terminator (< 0x80).
inline int64_t first_varint_at(const uint8_t* payload, int64_t begin, int64_t end) {
  int64_t p = begin;
  while (p > 0 && p < end && payload[p - 1] >= 0x80) ++p;
  return p;
}

// Adds the varints starting in [begin, end) to *st (begin: a varint's first
// byte) and returns where the byte after the last one is, when none of them is
// longer than two bytes (almost all: gaps below 2**14), without the general
// loop's branch per varint: each byte below 0x80 ends a varint, whose value
// comes from it and the byte before, so the loop vectorises (in the ISA clones
// of csrc/cpu/wire_coo.cpp). Returns -1, *st untouched, when one is longer.
LS_HD int64_t add_short_varints(const uint8_t* x, uint64_t numel, int64_t begin, int64_t end, DecodeStats* st) {
  if (begin >= end) return begin;
  // The last varint starting before `end` ends at `stop` - 1: the payload's
  // last byte ends a varint (precheck), so x[end] exists when x[end - 1] continues.
  const int64_t stop = end + (x[end - 1] >> 7);
  uint32_t longer = 0, count = x[begin] < 0x80, max_gap = x[begin] < 0x80 ? x[begin] : 0;
  uint64_t sum = count ? x[begin] + 1u : 0;
  for (int64_t p = begin + 1; p < stop; ++p) {
    const uint32_t prev = x[p - 1], cur = x[p], ends = cur < 0x80, second = prev >> 7;
    longer |= second & (cur >> 7);  // a third byte at least
    const uint32_t gap = second ? (prev & 0x7Fu) | (cur << 7) : cur;
    count += ends;
    sum += ends ? gap + 1 : 0;
    max_gap = ends && gap > max_gap ? gap : max_gap;
  }
  if (longer) return -1;
  st->count += count;
  // The piece's own sum is below 2**30; the range's may already be saturated by
  // a long varint before it, and must stay as the general loop leaves it.
  st->sum = saturating_add(st->sum, sum);
  st->gap_past |= max_gap >= numel;
  return stop;
}

// The fixed-width gaps [begin, end) into *st. A range's sum of (gap + 1) is
// below kRange * 2**32 = 2**48, so it needs no saturation, and the loop
// carries only a sum and a maximum: it vectorises.
template <class G>
LS_HD void add_gaps(const uint8_t* payload, uint64_t numel, int64_t begin, int64_t end, DecodeStats* st) {
  static_assert(kRange <= (int64_t{1} << 16) && sizeof(G) <= 4, "a range's sum must stay far below kSaturated");
  uint64_t sum = 0;
  G max_gap = 0;
  for (int64_t i = begin; i < end; ++i) {
    const G gap = load_le<G>(payload + sizeof(G) * i);
    sum += gap;
    max_gap = gap > max_gap ? gap : max_gap;
  }
  st->count = static_cast<uint64_t>(end - begin);
  st->sum = sum + st->count;
  st->gap_past = end > begin && max_gap >= numel;
}

// One varint at p, the general way, into *st; returns the byte after it.
inline int64_t add_varint(const uint8_t* x, uint64_t numel, int64_t p, DecodeStats* st) {
  uint64_t length = 0;
  const uint64_t gap = read_varint(x + p, &length, &st->huge_varint);
  st->long_varint |= length > 10;
  st->gap_past |= gap >= numel;
  st->sum = saturating_add(st->sum, gap + 1);
  ++st->count;
  return p + static_cast<int64_t>(length);
}

LS_HD DecodeStats decode_stats(const DecodeTensor& t, int64_t begin, int64_t end) {
  DecodeStats st;
  const uint64_t numel = t.dims.numel;
  switch (t.code) {
    case kU32:
    case kU64:
      for (int64_t i = begin; i < end; ++i) {
        const uint64_t off = t.code == kU32 ? load_le<uint32_t>(t.payload + 4 * i) : load_le<uint64_t>(t.payload + 8 * i);
        st.offset_past |= off >= numel;
      }
      st.count = static_cast<uint64_t>(end - begin);
      break;
    case kGap8:
      add_gaps<uint8_t>(t.payload, numel, begin, end, &st);
      break;
    case kGap16:
      add_gaps<uint16_t>(t.payload, numel, begin, end, &st);
      break;
    case kGap32:
      add_gaps<uint32_t>(t.payload, numel, begin, end, &st);
      break;
    case kVarint:
      // The varints starting here, 256 bytes at a time: a piece with a long
      // varint goes one varint at a time, up to the first that starts after it.
      for (int64_t p = first_varint_at(t.payload, begin, end); p < end;) {
        const int64_t piece_end = std::min<int64_t>(p + 256, end);
        const int64_t next = add_short_varints(t.payload, numel, p, piece_end, &st);
        if (next >= 0) {
          p = next;
          continue;
        }
        while (p < piece_end) p = add_varint(t.payload, numel, p, &st);
      }
      break;
    default:  // kBitmap
      for (int64_t p = begin; p < end; ++p) st.count += static_cast<uint64_t>(__builtin_popcount(t.payload[p]));
  }
  return st;
}

struct DecodeError {
  int64_t tensor = -1;  // -1: none
  std::string why;
};

struct DecodePlan {
  DecodeError error;
  Ranges ranges{{}};  // over decode_items of every tensor (when there is no error)
  std::vector<uint64_t> entry_at, sum_at;  // per range: its first entry, the sum of (gap + 1) before it
};

// The checks wire_coo._decode_positions makes before the first pass, in its order.
inline std::string precheck(const DecodeTensor& t) {
  const uint64_t nnz = static_cast<uint64_t>(t.nnz);
  switch (t.code) {
    case kU32:
    case kU64: {
      const uint64_t w = t.code == kU32 ? 4 : 8;
      if (t.size != w * nnz) {
        return std::to_string(nnz) + " offsets need " + std::to_string(w * nnz) + " bytes, got " + std::to_string(t.size);
      }
      return {};
    }
    case kBitmap: {
      const uint64_t need = bitmap_bytes(t.dims.numel), tail = t.dims.numel % 8;
      if (t.size != need || (tail && (t.payload[t.size - 1] >> tail))) {
        return "a bitmap of " + std::to_string(t.dims.numel) + " elements needs " + std::to_string(need) +
               " bytes and zero padding";
      }
      return {};
    }
    case kGap8:
    case kGap16:
    case kGap32:
      if (t.size != gap_width(t.code) * nnz) {
        return std::to_string(nnz) + " gaps need " + std::to_string(gap_width(t.code) * nnz) + " bytes, got " +
               std::to_string(t.size);
      }
      return {};
    case kVarint:
      if (t.size && t.payload[t.size - 1] >= 0x80) {
        return std::to_string(t.size) + " varint bytes do not hold " + std::to_string(nnz) + " gaps";
      }
      return {};
    default:
      return "unknown position code " + std::to_string(t.code);
  }
}

// The checks after the first pass (merged over the tensor's ranges), in wire_coo's order.
inline std::string postcheck(const DecodeTensor& t, const DecodeStats& all) {
  const std::string numel = std::to_string(t.dims.numel);
  const uint64_t nnz = static_cast<uint64_t>(t.nnz);
  if (t.code == kU32 || t.code == kU64) {
    return all.offset_past ? "an offset is past the tensor's " + numel + " elements" : std::string();
  }
  if (t.code == kBitmap) {
    return all.count != nnz ? "the bitmap marks " + std::to_string(all.count) + " elements, the meta says " +
                                  std::to_string(nnz)
                            : std::string();
  }
  if (t.code == kVarint) {
    if (all.count != nnz) return std::to_string(t.size) + " varint bytes do not hold " + std::to_string(nnz) + " gaps";
    if (nnz == 0) return {};
    if (all.long_varint) return "a varint longer than 10 bytes";
    if (all.huge_varint) return "a varint above 2**64 - 1";
  }
  if (nnz == 0) return {};
  if (all.gap_past) return "a gap is past the tensor's " + numel + " elements";
  if (all.sum > t.dims.numel) return "the gaps run past the tensor's " + numel + " elements";
  return {};
}

// First pass: checks every tensor in order and stops at the first bad one.
// stats: decode_stats, or a caller's copy of it compiled for its CPU.
template <class ParallelFor, class Stats = DecodeStats (*)(const DecodeTensor&, int64_t, int64_t)>
DecodePlan plan_decoding(const std::vector<DecodeTensor>& ts, ParallelFor&& parallel_for,
                         Stats stats = decode_stats) {
  DecodePlan plan;
  size_t good = 0;  // tensors before the first that fails its precheck
  std::string first_why;
  for (; good < ts.size(); ++good) {
    first_why = precheck(ts[good]);
    if (!first_why.empty()) break;
  }
  std::vector<int64_t> items(good);
  for (size_t t = 0; t < good; ++t) items[t] = decode_items(ts[t]);
  plan.ranges = Ranges(std::move(items));
  const Ranges& ranges = plan.ranges;
  std::vector<DecodeStats> st(static_cast<size_t>(ranges.total()));
  ranges.each(parallel_for, [&](int32_t t, int64_t r, int64_t begin, int64_t end) {
    st[r] = stats(ts[t], begin, end);
  });
  plan.entry_at.resize(st.size());
  plan.sum_at.resize(st.size());
  for (size_t t = 0; t < good; ++t) {
    DecodeStats all;
    for (int64_t r = ranges.first[t]; r < ranges.first[t + 1]; ++r) {
      plan.entry_at[r] = all.count;
      plan.sum_at[r] = all.sum;
      all.count += st[r].count;
      all.sum = saturating_add(all.sum, st[r].sum);
      all.offset_past |= st[r].offset_past;
      all.gap_past |= st[r].gap_past;
      all.long_varint |= st[r].long_varint;
      all.huge_varint |= st[r].huge_varint;
    }
    std::string why = postcheck(ts[t], all);
    if (!why.empty()) {
      plan.error = {static_cast<int64_t>(t), why};
      return plan;
    }
  }
  if (good < ts.size()) plan.error = {static_cast<int64_t>(good), first_why};
  return plan;
}

// Entries of range [begin, end) (items as decode_items counts them) into
// t.indices, in one loop per (dimensions, code family).
template <int ND>
inline void decode_write_nd(const DecodeTensor& t, int64_t begin, int64_t end, uint64_t entry, uint64_t sum) {
  const int nd = ndim_of<ND>(t.dims);
  Unravel<ND> u(t.dims);
  auto gaps = [&](auto width) {
    using G = decltype(width);
    for (int64_t i = begin; i < end; ++i) {
      sum += static_cast<uint64_t>(load_le<G>(t.payload + sizeof(G) * i)) + 1;
      u.move_to(sum - 1);
      u.write(t.indices + i * nd);
    }
  };
  auto offsets = [&](auto width) {
    using O = decltype(width);
    for (int64_t i = begin; i < end; ++i) {
      u.at = kNone;  // offsets in any order: unravel each from scratch
      u.move_to(load_le<O>(t.payload + sizeof(O) * i));
      u.write(t.indices + i * nd);
    }
  };
  switch (t.code) {
    case kU32: return offsets(uint32_t());
    case kU64: return offsets(uint64_t());
    case kGap8: return gaps(uint8_t());
    case kGap16: return gaps(uint16_t());
    case kGap32: return gaps(uint32_t());
    case kVarint:
      for (int64_t p = first_varint_at(t.payload, begin, end); p < end;) {
        uint64_t length = 0;
        bool huge = false;
        sum += read_varint(t.payload + p, &length, &huge) + 1;
        p += static_cast<int64_t>(length);
        u.move_to(sum - 1);
        u.write(t.indices + static_cast<int64_t>(entry++) * nd);
      }
      return;
    default:  // kBitmap, 8 bytes (64 elements) at a time
      for (int64_t p = begin; p < end; p += 8) {
        const int64_t n = std::min<int64_t>(8, end - p);
        uint64_t word = 0;
        std::memcpy(&word, t.payload + p, static_cast<size_t>(n));
        if (!word) continue;
        const uint64_t base = static_cast<uint64_t>(p) * 8;
        const int last = nd - 1;
        const int64_t lowest = __builtin_ctzll(word);
        u.move_to(base + static_cast<uint64_t>(lowest));
        // first: the last-dimension index of element `base` when it is in the
        // same run as the word's lowest set bit.
        const int64_t first = last >= 0 ? u.idx[last] - lowest : -1;
        if (first >= 0 && first + 64 <= t.dims.d[last]) {
          // All 64 elements lie in one run of the last dimension: only its
          // index changes (the common case: rows of 64 elements or more).
          for (; word; word &= word - 1) {
            u.idx[last] = first + __builtin_ctzll(word);
            u.write(t.indices + static_cast<int64_t>(entry++) * nd);
          }
          u.at = base + static_cast<uint64_t>(u.idx[last] - first);
          continue;
        }
        for (; word; word &= word - 1) {
          u.move_to(base + static_cast<uint64_t>(__builtin_ctzll(word)));
          u.write(t.indices + static_cast<int64_t>(entry++) * nd);
        }
      }
  }
}

inline void decode_write(const DecodeTensor& t, int64_t begin, int64_t end, uint64_t entry, uint64_t sum) {
  with_ndim(t.dims, [&](auto nd) { decode_write_nd<decltype(nd)::value>(t, begin, end, entry, sum); });
}

// Second pass, on tensors plan_decoding accepted (plan.error.tensor == -1).
template <class ParallelFor>
void write_decoding(const std::vector<DecodeTensor>& ts, const DecodePlan& plan, ParallelFor&& parallel_for) {
  plan.ranges.each(parallel_for, [&](int32_t t, int64_t r, int64_t begin, int64_t end) {
    decode_write(ts[t], begin, end, plan.entry_at[r], plan.sum_at[r]);
  });
}

}  // namespace layersel::coo
