// CPU: the k-th largest score without a sort. It comes from a sample select on
// large models (sparse_select_sample.cpp), else (or when the bracket misses)
// from a radix select whose first pass histograms the top 16 key bits
// (per-thread tables); the few keys under the chosen digit are then collected
// and selected in memory (when that digit is crowded, as in a constant model,
// further full passes with 11-bit digits instead). Scores are computed on the
// fly from the model tensors. What is specialised per kind and dtype:
// sparse_select.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <type_traits>
#include <vector>

#include "../common/op_checks.h"
#include "../common/radix.h"
#include "../common/radix_values.h"
#include "sparse_select.h"

namespace layersel {
namespace {

// The k-th largest key in (at most) two passes over the model:
//  1. a histogram of the top 16 key bits (one 64K-bin table per thread);
//  2. the keys that share the chosen top digit are few when the digit is
//     narrow (16 bits of a float32 key: sign, exponent, 7 mantissa bits), so
//     their low bits are collected and the rest of the select runs on them in
//     memory. When that bin is too crowded (a constant-initialised model), the
//     next digits come from further full passes instead: memory stays bounded.

// Two interleaved tables: neighbouring scores often share a digit, and one
// table would serialise on that counter. uint32 counts (half the cache
// footprint) unless a thread could see 2^32 elements. (`kind`: read when Kind
// is kRuntimeKind, as in every pass below.)
template <int64_t Kind, typename T, typename P, typename C>
void top_histogram_chunk(const T* x, const T* y, int64_t n, C* hist0, C* hist1, int64_t kind) {
  constexpr int shift = key_bits<P>() - kTopBits;
  const int64_t kd = loop_kind<Kind>(kind);
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    ++hist0[order_key<P>(static_cast<P>(sparse_score<T>(kd, x[i], y[i]))) >> shift];
    ++hist1[order_key<P>(static_cast<P>(sparse_score<T>(kd, x[i + 1], y[i + 1]))) >> shift];
  }
  if (i < n) ++hist0[order_key<P>(static_cast<P>(sparse_score<T>(kd, x[i], y[i]))) >> shift];
}

template <int64_t Kind, typename T, typename P>
void collect_chunk(const T* x, const T* y, int64_t n, uint64_t top, std::vector<uint64_t>& out, int64_t kind) {
  constexpr int shift = key_bits<P>() - kTopBits;
  const int64_t kd = loop_kind<Kind>(kind);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t key = order_key<P>(static_cast<P>(sparse_score<T>(kd, x[i], y[i])));
    if ((key >> shift) == top) out.push_back(key);
  }
}

}  // namespace

// The r-th largest (1-based) of the keys collected per thread (one span per
// thread), all within [lo, hi]: a histogram of the top 16 bits of key - lo,
// then a selection among the few keys of the chosen bin. Serves the sample
// select's bracket and the exact select's candidates. One histogram per thread
// where the keys outnumber the tables' bins (bert_like at 1%: ~0.9M keys, too
// many for one thread's nth_element over them all), else one: zeroing and
// merging a table per thread would cost more than the count (many threads, few
// keys).
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


// try_sample: the sample select first (false: it already ran and missed).
template <typename P>
uint64_t kth_largest_key(const WorkTable& table, int64_t kind, int64_t k, bool try_sample) {
  constexpr int bits = key_bits<P>();
  constexpr int64_t bins = int64_t{1} << kTopBits;
  const int threads = at::get_num_threads();
  if constexpr (bits > kTopBits) {
    uint64_t sampled = 0;
    if (try_sample && sampled_kth_largest_key<P>(table, kind, k, sampled)) return sampled;
  }
  auto each_chunk = [&](auto body) { each_score_chunk<P>(table, kind, body); };
  auto each_chunk_any_kind = [&](auto body) { each_score_chunk<P, /*PerKind=*/false>(table, kind, body); };
  // Pass 1: the top digit.
  std::vector<int64_t> hist(static_cast<size_t>(bins), 0);
  // Compiled per kind with uint32 counts only: a model of 2^32 elements or more
  // reaches this pass only when the sample select's bracket missed.
  auto top_pass = [&](auto counter_tag, auto each) {
    using C = decltype(counter_tag);
    std::vector<C> tables(static_cast<size_t>(threads) * 2 * bins, 0);
    each([&](auto kc, const auto* x, const auto* y, int64_t len, auto* tag, ChunkAt) {
      using T = std::remove_pointer_t<decltype(tag)>;
      C* mine = tables.data() + static_cast<size_t>(at::get_thread_num()) * 2 * bins;
      top_histogram_chunk<decltype(kc)::value, T, P, C>(x, y, len, mine, mine + bins, kind);
    });
    for (size_t t = 0; t < static_cast<size_t>(threads) * 2; ++t)
      for (int64_t b = 0; b < bins; ++b) hist[b] += static_cast<int64_t>(tables[t * bins + b]);
  };
  if (table.total_numel < (int64_t{1} << 32)) {
    top_pass(uint32_t{}, each_chunk);
  } else {
    top_pass(uint64_t{}, each_chunk_any_kind);
  }
  int64_t remaining = k;
  const uint64_t top = pick_digit(hist.data(), bins, remaining);
  if (bits == kTopBits) return top;
  // Pass 2: the keys under that digit, when few enough to hold.
  if (hist[top] <= max_candidates()) {
    std::vector<std::vector<uint64_t>> per_thread(static_cast<size_t>(threads));
    each_chunk([&](auto kc, const auto* x, const auto* y, int64_t len, auto* tag, ChunkAt) {
      using T = std::remove_pointer_t<decltype(tag)>;
      collect_chunk<decltype(kc)::value, T, P>(x, y, len, top, per_thread[at::get_thread_num()], kind);
    });
    // The select on the candidates in memory: every key under the top digit.
    std::vector<KeySpan> spans;
    for (const auto& v : per_thread) spans.push_back({v.data(), static_cast<int64_t>(v.size())});
    const int low = bits - kTopBits;
    const uint64_t lo = top << low;
    return rth_largest_collected(spans, lo, lo | ((uint64_t{1} << low) - 1), remaining);
  }
  // Crowded digit: 11-bit digits by full passes (csrc/common/radix.h), below the top digit; rare
  // (a constant model, the k-th largest among many equal scores), so not compiled per kind.
  std::vector<int64_t> h11(static_cast<size_t>(threads) * kDigitBins);
  uint64_t prefix = top;
  int low_bits = bits - kTopBits;
  while (low_bits > 0) {
    const int width = low_bits < kDigitBits ? low_bits : kDigitBits;
    const int shift = low_bits - width;
    std::fill(h11.begin(), h11.end(), 0);
    each_chunk_any_kind([&](auto kc, const auto* x, const auto* y, int64_t len, auto* tag, ChunkAt) {
      using T = std::remove_pointer_t<decltype(tag)>;
      int64_t* h = h11.data() + at::get_thread_num() * kDigitBins;
      const int64_t kd = loop_kind<decltype(kc)::value>(kind);
      for (int64_t i = 0; i < len; ++i) {
        const uint64_t key = order_key<P>(static_cast<P>(sparse_score<T>(kd, x[i], y[i])));
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

template uint64_t kth_largest_key<float>(const WorkTable&, int64_t, int64_t, bool);
template uint64_t kth_largest_key<double>(const WorkTable&, int64_t, int64_t, bool);
template uint64_t kth_largest_key<c10::Half>(const WorkTable&, int64_t, int64_t, bool);
template uint64_t kth_largest_key<c10::BFloat16>(const WorkTable&, int64_t, int64_t, bool);
template uint64_t kth_largest_key<int64_t>(const WorkTable&, int64_t, int64_t, bool);

namespace {

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

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CPU, m) { m.impl("kth_largest_score", &layersel::kth_largest_score_cpu); }
