// CPU: the sample select of the k-th largest score. The keys of a sample
// spread over the model bracket the k-th largest; ONE pass then counts the keys
// above the bracket and collects those inside it (and, for sparse_select,
// marks the elements above it), and when the k-th largest is inside (almost
// always) it is selected among them in memory: one pass over the model instead
// of the radix select's two (sparse_select_kth.cpp). What is specialised per
// kind, dtype and ISA: sparse_select.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/radix.h"
#include "sparse_select.h"

namespace layersel {
namespace {

// The answer is exact either way: a bracket that misses (an unrepresentative
// sample) or overflows only costs that pass, and the radix select runs.
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
// would cost a fifth of the pass). MARK: also bit j of *word = element j's key is
// above the bracket, ordered (not NaN) and its value non-zero: kept whatever
// the k-th largest inside the bracket turns out to be (sparse_select_cpu);
// `marked` counts those.
template <int64_t Kind, bool MARK, typename T, typename P>
LS_CPU_INLINE uint64_t bracket_block_body(const T* x, const T* y, int64_t m, BlockKey<P> lo, BlockKey<P> hi,
                                          BlockKey<P>* keys, int64_t& above, uint64_t* word, int64_t& marked,
                                          BlockKey<P> max_ordered, int64_t kind) {
  using K = BlockKey<P>;
  const int64_t kd = loop_kind<Kind>(kind);
  int32_t a = 0;  // m <= kKeyBlock
  uint8_t inside[kKeyBlock], keep[kKeyBlock];  // 0/1 per element, packed into bits below
  if (m < kKeyBlock) {
    std::memset(inside, 0, sizeof(inside));
    if (MARK) std::memset(keep, 0, sizeof(keep));
  }
  for (int64_t j = 0; j < m; ++j) {
    const K key = static_cast<K>(order_key<P>(static_cast<P>(sparse_score<T>(kd, x[j], y[j]))));
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

// bracket_block_body, per ISA for one kind of a hot pair (kHotPair), plainly
// for the others (RuntimeKind).
template <int64_t Kind, bool MARK, typename T, typename P>
LS_CPU_CLONES uint64_t bracket_block_cloned(const T* x, const T* y, int64_t m, BlockKey<P> lo, BlockKey<P> hi,
                                            BlockKey<P>* keys, int64_t& above, uint64_t* word, int64_t& marked,
                                            BlockKey<P> max_ordered) {
  return bracket_block_body<Kind, MARK, T, P>(x, y, m, lo, hi, keys, above, word, marked, max_ordered, Kind);
}
template <int64_t Kind, bool MARK, typename T, typename P>
inline uint64_t bracket_block(const T* x, const T* y, int64_t m, BlockKey<P> lo, BlockKey<P> hi, BlockKey<P>* keys,
                              int64_t& above, uint64_t* word, int64_t& marked, BlockKey<P> max_ordered,
                              int64_t kind) {
  if constexpr (Kind == kRuntimeKind) {
    return bracket_block_body<Kind, MARK, T, P>(x, y, m, lo, hi, keys, above, word, marked, max_ordered, kind);
  } else {
    return bracket_block_cloned<Kind, MARK, T, P>(x, y, m, lo, hi, keys, above, word, marked, max_ordered);
  }
}

// The (model dtype, score dtype) pairs sparse_select_cpu accepts, the only
// ones whose marking pass is compiled.
template <typename T, typename P>
constexpr bool kMarkable =
    (std::is_same_v<T, P> && !std::is_integral_v<P>) || (std::is_same_v<P, float> && std::is_integral_v<T>);

}  // namespace

// With `marks` (sparse_select_cpu), the pass also marks the elements above the
// bracket (bracket_block) and notes where the bracket's non-zero elements are;
// once the k-th largest is known, those at or above it are marked too, and
// `marks` then holds exactly what sparse_extract would keep with the k-th
// largest as every tensor's threshold (marks->complete). That needs the
// threshold to be neither 0 (-0.0 passes ">= 0.0" from below the bracket) nor
// NaN: then the k-th largest is still returned, with the marks incomplete.
template <typename P>
bool sampled_kth_largest_key(const WorkTable& table, int64_t kind, int64_t k, uint64_t& result, Marks* marks) {
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
  // selections instead of a sort of the whole sample (a fixed cost of every call, large beside a small model's pass).
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
  // cache (pages mapped on every call after the first, where growing vectors would fault fresh
  // pages on every call): a thread stops past per_thread_cap after a chunk, so its region holds
  // per_thread_cap + one chunk.
  const int64_t per_thread_cap = cap / threads + 1, stride = per_thread_cap + kCpuChunk;
  const at::Tensor scratch = empty_cpu_output(threads * stride * (marks ? 2 : 1), at::kLong);
  uint64_t* const key_base = reinterpret_cast<uint64_t*>(scratch.data_ptr<int64_t>());
  int64_t* const where_base = marks ? scratch.data_ptr<int64_t>() + threads * stride : nullptr;
  std::vector<int64_t> collected(static_cast<size_t>(threads), 0);
  const uint64_t max_ordered = max_ordered_key<P>();
  each_score_chunk<P>(table, kind, [&](auto kc, const auto* x, const auto* y, int64_t len, auto* tag, ChunkAt at) {
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
                                                              words + i / kKeyBlock, marked, kmax, kind);
        }
      }
      if (!marks) {
        in = bracket_block<decltype(kc)::value, false, T, P>(x + i, y + i, m, klo, khi, block, mine.above, nullptr,
                                                             marked, kmax, kind);
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

template bool sampled_kth_largest_key<float>(const WorkTable&, int64_t, int64_t, uint64_t&, Marks*);
template bool sampled_kth_largest_key<double>(const WorkTable&, int64_t, int64_t, uint64_t&, Marks*);
template bool sampled_kth_largest_key<c10::Half>(const WorkTable&, int64_t, int64_t, uint64_t&, Marks*);
template bool sampled_kth_largest_key<c10::BFloat16>(const WorkTable&, int64_t, int64_t, uint64_t&, Marks*);
template bool sampled_kth_largest_key<int64_t>(const WorkTable&, int64_t, int64_t, uint64_t&, Marks*);

}  // namespace layersel
