// CPU: fl4health's sparse COO selection without a sort. The k-th largest score
// comes from a sample select on large models (a sample brackets it, one pass
// collects the bracket; sampled_kth_largest_key), else (or when the bracket
// misses) from a radix select whose first pass histograms the top 16 key bits
// (per-thread tables); the few keys under the chosen digit are then collected
// and selected in memory (when that digit is crowded, as in a constant model,
// further full passes with 11-bit digits instead). Scores are computed on the
// fly from the model tensors. The extraction marks the kept elements (a bit
// each) and counts them per chunk, then writes values and row-major indices at
// each chunk's offset (the order torch.nonzero gives) from the marks.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../common/op_checks.h"
#include "../common/radix.h"
#include "../common/radix_values.h"
#include "cpu_kernel_utils.h"

namespace layersel {
namespace {

template <typename P>
constexpr int key_bits() {
  return static_cast<int>(sizeof(P) * 8);
}

// The k-th largest key in (at most) two passes over the model:
//  1. a histogram of the top 16 key bits (one 64K-bin table per thread);
//  2. the keys that share the chosen top digit are few when the digit is
//     narrow (16 bits of a float32 key: sign, exponent, 7 mantissa bits), so
//     their low bits are collected and the rest of the select runs on them in
//     memory. When that bin is too crowded (a constant-initialised model), the
//     next digits come from further full passes instead: memory stays bounded.
constexpr int kTopBits = 16;
// At most 4M candidates (32 MiB); LAYERSEL_SPARSE_MAX_CANDIDATES lowers it (the
// tests force the full-pass path with 0).
inline int64_t max_candidates() {
  static const int64_t limit = [] {
    const char* env = std::getenv("LAYERSEL_SPARSE_MAX_CANDIDATES");
    return env ? std::strtoll(env, nullptr, 10) : (int64_t{1} << 22);
  }();
  return limit;
}

// Two interleaved tables: neighbouring scores often share a digit, and one
// table would serialise on that counter. uint32 counts (half the cache
// footprint) unless a thread could see 2^32 elements.
template <int64_t Kind, typename T, typename P, typename C>
void top_histogram_chunk(const T* x, const T* y, int64_t n, C* hist0, C* hist1) {
  constexpr int shift = key_bits<P>() - kTopBits;
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    ++hist0[order_key<P>(static_cast<P>(sparse_score<T>(Kind, x[i], y[i]))) >> shift];
    ++hist1[order_key<P>(static_cast<P>(sparse_score<T>(Kind, x[i + 1], y[i + 1]))) >> shift];
  }
  if (i < n) ++hist0[order_key<P>(static_cast<P>(sparse_score<T>(Kind, x[i], y[i]))) >> shift];
}

template <int64_t Kind, typename T, typename P>
void collect_chunk(const T* x, const T* y, int64_t n, uint64_t top, std::vector<uint64_t>& out) {
  constexpr int shift = key_bits<P>() - kTopBits;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t key = order_key<P>(static_cast<P>(sparse_score<T>(Kind, x[i], y[i])));
    if ((key >> shift) == top) out.push_back(key);
  }
}

// Picks, from counts of digits 0..bins-1, the digit holding the `remaining`-th
// largest, and lowers `remaining` by the counts above it.
inline uint64_t pick_digit(const int64_t* counts, int64_t bins, int64_t& remaining) {
  for (int64_t b = bins - 1; b >= 0; --b) {
    if (remaining <= counts[b]) return static_cast<uint64_t>(b);
    remaining -= counts[b];
  }
  return 0;
}

// Where a chunk is: its tensor, its id, its offset in the tensor, its global
// index (the tensor's base + offset).
struct ChunkAt {
  int32_t tensor;
  int64_t chunk, offset, global;
};

// Every chunk of the table, in parallel: body(kind constant, x, y, len, T* tag, ChunkAt).
template <typename Body>
void each_score_chunk(const WorkTable& table, int64_t kind, Body body) {
  for_each_chunk(table, kCpuChunk, [&](const TensorEntry& e, int32_t t, int64_t c, int64_t off, int64_t len) {
    LS_SWITCH_DTYPE(e.dtype, T, {
      const T* x = static_cast<const T*>(e.x) + off;
      const T* y = e.y ? static_cast<const T*>(e.y) + off : x;
      const ChunkAt at{t, c, off, e.base + off};
      with_score_kind(kind, [&](auto kc) { body(kc, x, y, len, static_cast<T*>(nullptr), at); });
    });
  });
}

// The kept elements of an extraction: one bit per element (64 to a word; a
// chunk's words start at first_word[c]) and how many are set per chunk.
struct Marks {
  std::vector<int64_t> first_word;  // chunks + 1
  at::Tensor storage;  // the words, from the output block cache: mapped pages on every call after the first
  uint64_t* bits = nullptr;
  std::vector<int64_t> counts;  // per chunk
  bool complete = false;  // set by the pass that wrote every word and count for the final threshold
};

// ceil(len / 64) words per chunk, at a prefix offset (a chunk of a small tensor
// is short); left uninitialised: the marking passes write every word they own.
Marks allocate_marks(const WorkTable& table) {
  Marks m;
  m.counts.assign(static_cast<size_t>(table.total_chunks()), 0);
  m.first_word.assign(m.counts.size() + 1, 0);
  for (size_t t = 0; t < table.entries.size(); ++t) {
    const int64_t numel = table.entries[t].numel;
    for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) {
      const int64_t len = std::min(kCpuChunk, numel - (c - table.first_chunk[t]) * kCpuChunk);
      m.first_word[c + 1] = m.first_word[c] + (len + 63) / 64;
    }
  }
  m.storage = empty_cpu_output(m.first_word.back() + 1, at::kLong);
  m.bits = reinterpret_cast<uint64_t*>(m.storage.data_ptr<int64_t>());
  return m;
}

// Sample select: the keys of a sample spread over the model bracket the k-th
// largest; ONE pass then counts the keys above the bracket and collects those
// inside it, and when the k-th largest is inside (almost always) it is selected
// among them in memory. One pass over the model instead of the two below (at
// 1% of bert_like on 2 cores here: 147 -> ~100 ms; the pass itself takes ~70 ms
// against a 40 ms read, computing and keying every score). The answer is exact either way: a
// bracket that misses (an unrepresentative sample) or overflows only costs
// that pass, and the two-pass select runs as before.
constexpr int64_t kSampleBlocks = 4096;  // 16 consecutive elements each: one cache line of float32
constexpr int64_t kSampleBlock = 16;
constexpr int64_t kSample = kSampleBlocks * kSampleBlock;

// Models of at least 4M elements (LAYERSEL_SPARSE_SAMPLE_MIN changes it: the
// tests force the sample select on small models with 0).
inline int64_t sample_select_min_numel() {
  static const int64_t limit = [] {
    const char* env = std::getenv("LAYERSEL_SPARSE_SAMPLE_MIN");
    return env ? std::strtoll(env, nullptr, 10) : 64 * kSample;
  }();
  return limit;
}

inline uint64_t mix64(uint64_t z) {  // splitmix64's finaliser: block jitter
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The keys of m <= kKeyBlock elements into `keys`; adds those above `hi` to
// `above` and returns how many are in [lo, hi]. Branch-free, so that it
// vectorises: most blocks hold no key of the bracket and are not read again.
constexpr int64_t kKeyBlock = 64;
static_assert(kKeyBlock == 64, "a block's flags are one word (pack_flags64)");
template <typename P>
using BlockKey = std::conditional_t<sizeof(P) <= 4, uint32_t, uint64_t>;  // 32-bit lanes where they suffice
template <typename K>
inline bool in_bracket(K key, K lo, K hi) {  // lo <= key <= hi, one unsigned comparison
  return static_cast<K>(key - lo) <= static_cast<K>(hi - lo);
}
// The largest key of an ordered (non-NaN) score: every NaN key is above it.
template <typename P>
uint64_t max_ordered_key() {
  if constexpr (std::is_integral<P>::value) {
    return ~uint64_t{0};
  } else {
    return order_key<P>(std::numeric_limits<P>::infinity());
  }
}

// Bit j of the result: element j's key is inside the bracket [lo, hi], so that
// the caller visits those elements only (about one in 120 at 1% of bert_like,
// but in four blocks of ten: an element-by-element walk of every such block
// took a fifth of the pass). MARK: also bit j of *word = element j's key is
// above the bracket, ordered (not NaN) and its value non-zero: kept whatever
// the k-th largest inside the bracket turns out to be (sparse_select_cpu);
// `marked` counts those.
template <int64_t Kind, bool MARK, typename T, typename P>
LS_CPU_CLONES uint64_t bracket_block(const T* x, const T* y, int64_t m, BlockKey<P> lo, BlockKey<P> hi,
                                     BlockKey<P>* keys, int64_t& above, uint64_t* word, int64_t& marked,
                                     BlockKey<P> max_ordered) {
  using K = BlockKey<P>;
  int32_t a = 0;  // m <= kKeyBlock
  uint8_t inside[kKeyBlock], keep[kKeyBlock];  // 0/1 per element, packed into bits below
  if (m < kKeyBlock) {
    std::memset(inside, 0, sizeof(inside));
    if (MARK) std::memset(keep, 0, sizeof(keep));
  }
  for (int64_t j = 0; j < m; ++j) {
    const K key = static_cast<K>(order_key<P>(static_cast<P>(sparse_score<T>(Kind, x[j], y[j]))));
    keys[j] = key;
    a += key > hi;
    inside[j] = in_bracket(key, lo, hi);
    if constexpr (MARK) keep[j] = (key > hi) & (key <= max_ordered) & is_nonzero(x[j]);
  }
  above += a;
  if constexpr (MARK) {
    *word = pack_flags64(keep);
    marked += __builtin_popcountll(*word);
  }
  return pack_flags64(inside);
}

// The (model dtype, score dtype) pairs sparse_select_cpu accepts, the only
// ones whose marking pass is compiled (a third of the instantiations).
template <typename T, typename P>
constexpr bool kMarkable = std::is_same_v<T, P> || (std::is_same_v<P, float> && std::is_integral_v<T>);

// Keys that one thread collected.
struct KeySpan {
  const uint64_t* keys;
  int64_t size;
};

// The r-th largest (1-based) of the keys collected per thread (one span per
// thread), all within [lo, hi]: a histogram of the top 16 bits of key - lo,
// then a selection among the few keys of the chosen bin. Serves the sample
// select's bracket and the exact select's candidates. One histogram per thread
// where the keys outnumber the tables' bins (bert_like at 1%: ~0.9M keys; before,
// they were copied together and selected by nth_element on one thread, ~3 ms),
// else one: zeroing and merging a table per thread would cost more than the
// count (many threads, few keys).
uint64_t rth_largest_collected(const std::vector<KeySpan>& spans, uint64_t lo, uint64_t hi, int64_t r) {
  const uint64_t span = hi - lo;
  if (span == 0) return lo;
  const int bits = 64 - __builtin_clzll(span);
  const int shift = bits > kTopBits ? bits - kTopBits : 0;
  const int64_t bins = (span >> shift) + 1;
  int64_t keys = 0;
  for (const KeySpan& s : spans) keys += s.size;
  const int64_t tables = keys >= static_cast<int64_t>(spans.size()) * bins ? static_cast<int64_t>(spans.size()) : 1;
  std::vector<int64_t> hist(static_cast<size_t>(tables * bins), 0);
  auto count = [&](int64_t t, int64_t* h) {
    const KeySpan& s = spans[static_cast<size_t>(t)];
    for (int64_t j = 0; j < s.size; ++j) ++h[(s.keys[j] - lo) >> shift];
  };
  if (tables == 1) {
    for (size_t t = 0; t < spans.size(); ++t) count(static_cast<int64_t>(t), hist.data());
  } else {
    at::parallel_for(0, tables, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) count(t, hist.data() + t * bins);
    });
  }
  for (int64_t t = 1; t < tables; ++t)
    for (int64_t b = 0; b < bins; ++b) hist[static_cast<size_t>(b)] += hist[static_cast<size_t>(t * bins + b)];
  int64_t remaining = r;
  const uint64_t digit = pick_digit(hist.data(), bins, remaining);
  if (shift == 0) return lo + digit;
  std::vector<uint64_t> bin;
  bin.reserve(static_cast<size_t>(hist[digit]));
  for (const KeySpan& s : spans)
    for (int64_t j = 0; j < s.size; ++j)
      if (((s.keys[j] - lo) >> shift) == digit) bin.push_back(s.keys[j]);
  // r beyond the keys (the weights changed between the pass that counted them and the one that
  // collected them): a stale answer, never a read past the bin.
  if (bin.empty()) return lo + (digit << shift);
  remaining = std::min(remaining, static_cast<int64_t>(bin.size()));
  std::nth_element(bin.begin(), bin.begin() + (remaining - 1), bin.end(), std::greater<uint64_t>());
  return bin[static_cast<size_t>(remaining - 1)];
}

// With `marks` (sparse_select_cpu), the pass also marks the elements above the
// bracket (bracket_block) and notes where the bracket's non-zero elements are;
// once the k-th largest is known, those at or above it are marked too, and
// `marks` then holds exactly what sparse_extract would keep with the k-th
// largest as every tensor's threshold (marks->complete). That needs the
// threshold to be neither 0 (-0.0 passes ">= 0.0" from below the bracket) nor
// NaN: then the k-th largest is still returned, with the marks incomplete.
template <typename P>
bool sampled_kth_largest_key(const WorkTable& table, int64_t kind, int64_t k, uint64_t& result,
                             Marks* marks = nullptr) {
  const int64_t n = table.total_numel;
  if (n < sample_select_min_numel() || n < 2 * kSample) return false;  // small models: the passes below are cheap
  // Bracket half-width in sample ranks: 8 standard deviations of the k-th's
  // sample rank (as if independent: blocks make it less so, hence the margin),
  // and at least 64.
  const double p = static_cast<double>(k) / static_cast<double>(n);
  const int64_t margin = 64 + static_cast<int64_t>(8.0 * std::sqrt(static_cast<double>(kSample) * p * (1.0 - p)));
  const int64_t expected = static_cast<int64_t>(static_cast<double>(n) * (2 * margin + 1) / kSample);
  const int threads = at::get_num_threads();
  const int64_t cap = max_candidates();
  // Would hold too many keys (the per-thread bounds below stop a pass that does): the passes below
  // bound memory. bert_like at 10% expects 2.3M keys against the 4M bound: sampled.
  if (3 * expected > 2 * cap) return false;
  // The sample: block j starts at a jittered position in the j-th stretch of the model.
  std::vector<uint64_t> sample(static_cast<size_t>(kSample));
  const int64_t stretch = n / kSampleBlocks;
  at::parallel_for(0, kSampleBlocks, 64, [&](int64_t begin, int64_t end) {
    size_t t = 0;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t start = j * stretch + static_cast<int64_t>(mix64(static_cast<uint64_t>(j)) %
                                                                static_cast<uint64_t>(stretch - kSampleBlock));
      for (int64_t q = 0; q < kSampleBlock; ++q) {
        const int64_t g = start + q;
        while (table.entries[t].base + table.entries[t].numel <= g) ++t;
        const TensorEntry& e = table.entries[t];
        const int64_t i = g - e.base;
        LS_SWITCH_DTYPE(e.dtype, T, {
          const T* x = static_cast<const T*>(e.x);
          const T* y = e.y ? static_cast<const T*>(e.y) : x;
          sample[j * kSampleBlock + q] = order_key<P>(static_cast<P>(sparse_score<T>(kind, x[i], y[i])));
        });
      }
    }
  });
  // The bracket's ends: the keys of sample ranks r - margin and r + margin (descending), two
  // selections instead of a sort of the whole sample (a fixed ~3 ms here, a seventh of resnet_like's call).
  const int64_t r = static_cast<int64_t>(p * static_cast<double>(kSample));  // the k-th's expected sample rank
  auto rank = [&](int64_t from, int64_t i) {  // sample[i] as in the sorted sample, given [0, from) is ranked before
    std::nth_element(sample.begin() + from, sample.begin() + i, sample.end(), std::greater<uint64_t>());
    return sample[static_cast<size_t>(i)];
  };
  const uint64_t hi = r - margin < 0 ? ~uint64_t{0} : rank(0, r - margin);
  const uint64_t lo = r + margin >= kSample ? uint64_t{0} : rank(std::max<int64_t>(r - margin + 1, 0), r + margin);
  // The pass: keys above the bracket counted, keys inside it collected (per
  // thread, each thread bounded so that a bad bracket cannot exhaust memory).
  struct alignas(64) Counter {
    int64_t above = 0;
    bool overflow = false;
  };
  std::vector<Counter> counters(static_cast<size_t>(threads));
  // Per thread, the keys inside the bracket and (with marks) where each is: (chunk << 16 | index in
  // the chunk), or -1 when never kept. Fixed regions of one scratch block from the output block
  // cache (pages mapped on every call after the first; growing vectors faulted ~14 MB of fresh
  // pages per call on bert_like at 1%): a thread stops past per_thread_cap after a chunk, so its
  // region holds per_thread_cap + one chunk.
  const int64_t per_thread_cap = cap / threads + 1, stride = per_thread_cap + kCpuChunk;
  const at::Tensor scratch = empty_cpu_output(threads * stride * (marks ? 2 : 1), at::kLong);
  uint64_t* const key_base = reinterpret_cast<uint64_t*>(scratch.data_ptr<int64_t>());
  int64_t* const where_base = marks ? scratch.data_ptr<int64_t>() + threads * stride : nullptr;
  std::vector<int64_t> collected(static_cast<size_t>(threads), 0);
  const uint64_t max_ordered = max_ordered_key<P>();
  each_score_chunk(table, kind, [&](auto kc, const auto* x, const auto* y, int64_t len, auto* tag, ChunkAt at) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const size_t me = static_cast<size_t>(at::get_thread_num());
    Counter& mine = counters[me];
    if (mine.overflow) return;
    uint64_t* const keys = key_base + static_cast<int64_t>(me) * stride;
    int64_t* const where = marks ? where_base + static_cast<int64_t>(me) * stride : nullptr;
    int64_t size = collected[me];
    using K = BlockKey<P>;
    K block[kKeyBlock];
    const K klo = static_cast<K>(lo), khi = static_cast<K>(hi), kmax = static_cast<K>(max_ordered);
    if constexpr (!kMarkable<T, P>) {
      TORCH_INTERNAL_ASSERT(marks == nullptr, "sparse_select: no marking pass for this dtype pair");
    }
    uint64_t* words = marks ? marks->bits + marks->first_word[at.chunk] : nullptr;
    int64_t marked = 0;
    for (int64_t i = 0; i < len; i += kKeyBlock) {
      const int64_t m = std::min(kKeyBlock, len - i);
      uint64_t in = 0;
      if constexpr (kMarkable<T, P>) {
        if (marks) {
          in = bracket_block<decltype(kc)::value, true, T, P>(x + i, y + i, m, klo, khi, block, mine.above,
                                                              words + i / kKeyBlock, marked, kmax);
        }
      }
      if (!marks) {
        in = bracket_block<decltype(kc)::value, false, T, P>(x + i, y + i, m, klo, khi, block, mine.above, nullptr,
                                                             marked, kmax);
      }
      for (; in != 0; in &= in - 1) {
        const int64_t j = __builtin_ctzll(in);
        keys[size] = block[j];
        // -1: never kept (a zero value, or a NaN score, which no threshold passes).
        if (marks) where[size] = is_nonzero(x[i + j]) && block[j] <= kmax ? (at.chunk << 16 | (i + j)) : -1;
        ++size;
      }
    }
    if (marks) marks->counts[at.chunk] = marked;
    collected[me] = size;
    if (size > per_thread_cap) mine.overflow = true;
  });
  int64_t above = 0, count = 0;
  for (size_t t = 0; t < counters.size(); ++t) {
    if (counters[t].overflow) return false;
    above += counters[t].above;
    count += collected[t];
  }
  if (!(above < k && k <= above + count)) return false;  // the k-th largest is outside the bracket
  // hi clamped to the largest key of P (an open-top bracket is ~0: one bin for every key otherwise).
  const uint64_t top_key = key_bits<P>() == 64 ? ~uint64_t{0} : (uint64_t{1} << key_bits<P>()) - 1;
  std::vector<KeySpan> spans;
  for (size_t t = 0; t < collected.size(); ++t) spans.push_back({key_base + t * stride, collected[t]});
  result = rth_largest_collected(spans, lo, std::min(hi, top_key), k - above);
  if (marks == nullptr) return true;
  const double v = key_value<P>(result);
  if (v == 0.0 || v != v) return true;  // the marks stay incomplete
  // The bracket's elements at or above the k-th largest (keys order them exactly
  // apart from -0.0 / +0.0, which a non-zero threshold does not separate).
  // Each thread marks what it collected: its chunks' words are its own.
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint64_t* ks = key_base + t * stride;
      const int64_t* ws = where_base + t * stride;
      for (int64_t j = 0; j < collected[static_cast<size_t>(t)]; ++j) {
        if (ks[j] < result || ws[j] < 0) continue;
        const int64_t c = ws[j] >> 16, i = ws[j] & 0xFFFF;
        marks->bits[static_cast<size_t>(marks->first_word[c] + i / 64)] |= uint64_t{1} << (i % 64);
        ++marks->counts[c];
      }
    }
  });
  marks->complete = true;
  return true;
}

// try_sample: the sample select first (false: it already ran and missed).
template <typename P>
uint64_t kth_largest_key(const WorkTable& table, int64_t kind, int64_t k, bool try_sample = true) {
  constexpr int bits = key_bits<P>();
  constexpr int64_t bins = int64_t{1} << kTopBits;
  const int threads = at::get_num_threads();
  if constexpr (bits > kTopBits) {
    uint64_t sampled = 0;
    if (try_sample && sampled_kth_largest_key<P>(table, kind, k, sampled)) return sampled;
  }
  auto each_chunk = [&](auto body) { each_score_chunk(table, kind, body); };
  // Pass 1: the top digit.
  std::vector<int64_t> hist(static_cast<size_t>(bins), 0);
  auto top_pass = [&](auto counter_tag) {
    using C = decltype(counter_tag);
    std::vector<C> tables(static_cast<size_t>(threads) * 2 * bins, 0);
    each_chunk([&](auto kc, const auto* x, const auto* y, int64_t len, auto* tag, ChunkAt) {
      using T = std::remove_pointer_t<decltype(tag)>;
      C* mine = tables.data() + static_cast<size_t>(at::get_thread_num()) * 2 * bins;
      top_histogram_chunk<decltype(kc)::value, T, P, C>(x, y, len, mine, mine + bins);
    });
    for (size_t t = 0; t < static_cast<size_t>(threads) * 2; ++t)
      for (int64_t b = 0; b < bins; ++b) hist[b] += static_cast<int64_t>(tables[t * bins + b]);
  };
  if (table.total_numel < (int64_t{1} << 32)) {
    top_pass(uint32_t{});
  } else {
    top_pass(uint64_t{});
  }
  int64_t remaining = k;
  const uint64_t top = pick_digit(hist.data(), bins, remaining);
  if (bits == kTopBits) return top;
  // Pass 2: the keys under that digit, when few enough to hold.
  if (hist[top] <= max_candidates()) {
    std::vector<std::vector<uint64_t>> per_thread(static_cast<size_t>(threads));
    each_chunk([&](auto kc, const auto* x, const auto* y, int64_t len, auto* tag, ChunkAt) {
      using T = std::remove_pointer_t<decltype(tag)>;
      collect_chunk<decltype(kc)::value, T, P>(x, y, len, top, per_thread[at::get_thread_num()]);
    });
    // The select on the candidates in memory: every key under the top digit.
    std::vector<KeySpan> spans;
    for (const auto& v : per_thread) spans.push_back({v.data(), static_cast<int64_t>(v.size())});
    const int low = bits - kTopBits;
    const uint64_t lo = top << low;
    return rth_largest_collected(spans, lo, lo | ((uint64_t{1} << low) - 1), remaining);
  }
  // Crowded digit: 11-bit digits by full passes (csrc/common/radix.h), below the top digit.
  std::vector<int64_t> h11(static_cast<size_t>(threads) * kDigitBins);
  uint64_t prefix = top;
  int low_bits = bits - kTopBits;
  while (low_bits > 0) {
    const int width = low_bits < kDigitBits ? low_bits : kDigitBits;
    const int shift = low_bits - width;
    std::fill(h11.begin(), h11.end(), 0);
    each_chunk([&](auto kc, const auto* x, const auto* y, int64_t len, auto* tag, ChunkAt) {
      using T = std::remove_pointer_t<decltype(tag)>;
      int64_t* h = h11.data() + at::get_thread_num() * kDigitBins;
      for (int64_t i = 0; i < len; ++i) {
        const uint64_t key = order_key<P>(static_cast<P>(sparse_score<T>(decltype(kc)::value, x[i], y[i])));
        if ((key >> (shift + width)) == prefix) ++h[(key >> shift) & ((uint64_t{1} << width) - 1)];
      }
    });
    for (int t = 1; t < threads; ++t)
      for (int b = 0; b < kDigitBins; ++b) h11[b] += h11[t * kDigitBins + b];
    prefix = (prefix << width) | pick_digit(h11.data(), int64_t{1} << width, remaining);
    low_bits = shift;
  }
  return prefix;
}

at::Tensor kth_largest_score_cpu(at::TensorList model, at::TensorList initial, int64_t kind, int64_t k,
                                 at::ScalarType score_dtype) {
  check_sparse_kind(kind, "kth_largest_score");
  const WorkTable table =
      build_work_table(model, initial, score_kind_uses_initial(kind), kCpuChunk, "kth_largest_score");
  check_rank(k, table.total_numel);
  return kth_value_for_dtype(score_dtype, [&](auto tag) {
    using P = decltype(tag);
    return kth_largest_key<P>(table, kind, k);
  });
}

// The extraction reads the model once: a marking pass computes every score
// and keeps one bit per element (64 to a word, vectorised), counting them; the
// outputs are then allocated exactly and a writing pass walks the set bits
// only, reading the kept values and writing their row-major indices (the order
// torch.nonzero gives). Before, a counting pass and a writing pass each
// computed every score again. The bits take about n/8 bytes; the values written are
// those read in the writing pass (another thread updating the weights in
// place between the passes gives a stale answer, never a memory error).
template <int64_t Kind, typename T>
LS_CPU_CLONES int64_t mark_chunk(const T* x, const T* y, int64_t n, double threshold, uint64_t* words) {
  int64_t count = 0;
  for (int64_t w = 0; w * 64 < n; ++w) {
    const int64_t begin = w * 64, m = std::min<int64_t>(64, n - begin);
    uint64_t word = 0;
    for (int64_t b = 0; b < m; ++b) {
      const int64_t i = begin + b;
      const bool keep = passes_threshold(sparse_score<T>(Kind, x[i], y[i]), threshold) && is_nonzero(x[i]);
      word |= static_cast<uint64_t>(keep) << b;
    }
    words[w] = word;
    count += __builtin_popcountll(word);
  }
  return count;
}

// Row-major coordinates of the kept elements only; the common 1-D and 2-D
// cases without a 64-bit division loop.
template <typename T>
void write_chunk(const T* x, int64_t off, int64_t n, const uint64_t* words, T* values, int64_t* indices,
                 const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  const size_t ndim = sizes.size();
  const bool small = off + n <= int64_t{UINT32_MAX};
  int64_t w = 0;
  for (int64_t k = 0; k * 64 < n; ++k) {
    for (uint64_t word = words[k]; word != 0; word &= word - 1) {
      const int64_t i = k * 64 + __builtin_ctzll(word);
      values[w] = x[i];
      const int64_t flat = off + i;
      int64_t* out = indices + w * static_cast<int64_t>(ndim);
      if (ndim == 1) {
        out[0] = flat;
      } else if (ndim == 2 && small) {
        const uint32_t row = static_cast<uint32_t>(flat) / static_cast<uint32_t>(sizes[1]);
        out[0] = row;
        out[1] = flat - static_cast<int64_t>(row) * sizes[1];
      } else {
        for (size_t dim = 0; dim < ndim; ++dim) out[dim] = (flat / strides[dim]) % sizes[dim];
      }
      ++w;
    }
  }
}

// The marking pass of an extraction: every score against its tensor's threshold.
void mark_above_thresholds(const WorkTable& table, int64_t kind, at::ArrayRef<double> thresholds, Marks& marks) {
  each_score_chunk(table, kind, [&](auto kc, const auto* x, const auto* y, int64_t len, auto* tag, ChunkAt at) {
    using T = std::remove_pointer_t<decltype(tag)>;
    marks.counts[at.chunk] = mark_chunk<decltype(kc)::value, T>(x, y, len, thresholds[at.tensor],
                                                                marks.bits + marks.first_word[at.chunk]);
  });
}

// The writing pass: values and row-major indices of the marked elements, per
// tensor, each chunk's at its offset among its tensor's (torch.nonzero's order).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> write_marked(const WorkTable& table,
                                                                          at::TensorList model, const Marks& marks) {
  const size_t n = table.entries.size();
  std::vector<at::Tensor> values(n), indices(n);
  std::vector<int64_t> chunk_offset(marks.counts.size());
  std::vector<std::vector<int64_t>> sizes(n), strides(n);
  for (size_t t = 0; t < n; ++t) {
    int64_t total = 0;
    for (int64_t c = table.first_chunk[t]; c < table.first_chunk[t + 1]; ++c) {
      chunk_offset[c] = total;
      total += marks.counts[c];
    }
    const at::Tensor& x = model[t];
    sizes[t] = x.sizes().vec();
    strides[t].assign(sizes[t].size(), 1);
    for (int64_t dim = static_cast<int64_t>(sizes[t].size()) - 2; dim >= 0; --dim)
      strides[t][dim] = strides[t][dim + 1] * sizes[t][dim + 1];
    values[t] = empty_cpu_output(total, x.scalar_type());
    indices[t] = empty_cpu_output(total * x.dim(), at::kLong).view({total, x.dim()});
  }
  for_each_chunk(table, kCpuChunk, [&](const TensorEntry& e, int32_t t, int64_t c, int64_t off, int64_t len) {
    if (marks.counts[c] == 0) return;
    LS_SWITCH_DTYPE(e.dtype, T, {
      T* v = values[t].data_ptr<T>() + chunk_offset[c];
      int64_t* ix = indices[t].data_ptr<int64_t>() + chunk_offset[c] * static_cast<int64_t>(sizes[t].size());
      write_chunk<T>(static_cast<const T*>(e.x) + off, off, len, marks.bits + marks.first_word[c], v, ix,
                     sizes[t], strides[t]);
    });
  });
  return {values, indices};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sparse_extract_cpu(at::TensorList model,
                                                                                at::TensorList initial, int64_t kind,
                                                                                at::ArrayRef<double> thresholds) {
  check_sparse_kind(kind, "sparse_extract");
  check_threshold_count(thresholds.size(), model.size());
  const WorkTable table = build_work_table(model, initial, score_kind_uses_initial(kind), kCpuChunk, "sparse_extract");
  Marks marks = allocate_marks(table);
  mark_above_thresholds(table, kind, thresholds, marks);
  return write_marked(table, model, marks);
}

// sparse_extract(model, initial, kind, thresholds) with every threshold the
// k-th largest score v = kth_largest_score(model, initial, kind, k, score_dtype),
// where each tensor's dtype is score_dtype (floating) or, with float32 scores,
// an integer dtype (a float32 model's int64 buffers: sparse_coo compares those
// with float32(v) = v in float32, the key's own order). On large models the
// sample select's pass marks as it brackets (one read of the model instead of
// two); else the k-th largest as kth_largest_score finds it (the sample select's
// answer, when only the marks could not be completed) and the marking pass.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sparse_select_cpu(at::TensorList model,
                                                                               at::TensorList initial, int64_t kind,
                                                                               int64_t k, at::ScalarType score_dtype) {
  check_sparse_kind(kind, "sparse_select");
  const WorkTable table = build_work_table(model, initial, score_kind_uses_initial(kind), kCpuChunk, "sparse_select");
  check_rank(k, table.total_numel);
  check_sparse_select_dtypes(model, score_dtype);
  Marks marks = allocate_marks(table);
  LS_SWITCH_FLOAT_DTYPE(code_of_scalar_type(score_dtype), P, {
    uint64_t kth = 0;
    if (!sampled_kth_largest_key<P>(table, kind, k, kth, &marks)) kth = kth_largest_key<P>(table, kind, k, false);
    if (!marks.complete) {  // a threshold of 0 or NaN, a small model, a missed bracket: the marking pass
      const std::vector<double> thresholds(model.size(), key_value<P>(kth));
      mark_above_thresholds(table, kind, thresholds, marks);
    }
  });
  return write_marked(table, model, marks);
}

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CPU, m) {
  m.impl("kth_largest_score", &layersel::kth_largest_score_cpu);
  m.impl("sparse_extract", &layersel::sparse_extract_cpu);
  m.impl("sparse_select", &layersel::sparse_select_cpu);
}
