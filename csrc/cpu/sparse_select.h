// CPU: fl4health's sparse COO selection without a sort, in two translation
// units that compile in parallel: sparse_select_kth.cpp (the k-th largest
// score: the sample select and the radix select) and sparse_select_extract.cpp
// (the extraction, and sparse_select, which marks during the sample select's
// pass). What they share is here.
//
// What is compiled per score kind and per ISA clone: only the per-element
// passes over the model (histogram, collect, bracket, mark) of the pairs that
// carry the bytes, a floating model dtype with scores of the same dtype. The
// other (model dtype, score dtype) pairs (integer buffers beside float32
// weights, integer models, float models of mixed dtypes) run one generic
// instantiation each, with the kind an argument: the same formula
// (sparse_score), so the same bits, without seven copies of every loop.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "../common/radix.h"
#include "../common/scores.h"
#include "cpu_kernel_utils.h"

namespace layersel {

// The Kind of a pass instantiated for no one kind: it reads the kind from its
// `kind` argument (loop_kind).
constexpr int64_t kRuntimeKind = -1;
using RuntimeKind = std::integral_constant<int64_t, kRuntimeKind>;

// The kind a pass computes: its compile-time Kind, else the run-time one.
template <int64_t Kind>
inline int64_t loop_kind(int64_t kind) {
  return Kind == kRuntimeKind ? kind : Kind;
}

// Whether model dtype T with score dtype P gets a pass per kind (and the ISA
// clones): T floating and P = T. P = void: any floating T (the extraction
// compares in the tensor's own dtype).
template <typename T, typename P>
constexpr bool kHotPair = !std::is_integral_v<T> && (std::is_void_v<P> || std::is_same_v<T, P>);

// Where a chunk is: its tensor, its id, its offset in the tensor, its global
// index (the tensor's base + offset).
struct ChunkAt {
  int32_t tensor;
  int64_t chunk, offset, global;
};

// Every chunk of the table, in parallel: body(kind constant, x, y, len, T* tag,
// ChunkAt), the kind constant a KindConstant for the hot pairs (kHotPair<T, P>)
// of a pass compiled PerKind, else RuntimeKind (the rare passes: a crowded
// digit, a model of 2^32 elements or more).
template <typename P, bool PerKind = true, typename Body>
void each_score_chunk(const WorkTable& table, int64_t kind, Body body) {
  for_each_chunk(table, kCpuChunk, [&](const TensorEntry& e, int32_t t, int64_t c, int64_t off, int64_t len) {
    LS_SWITCH_DTYPE(e.dtype, T, {
      const T* x = static_cast<const T*>(e.x) + off;
      const T* y = e.y ? static_cast<const T*>(e.y) + off : x;
      const ChunkAt at{t, c, off, e.base + off};
      if constexpr (PerKind && kHotPair<T, P>) {
        with_score_kind(kind, [&](auto kc) { body(kc, x, y, len, static_cast<T*>(nullptr), at); });
      } else {
        body(RuntimeKind(), x, y, len, static_cast<T*>(nullptr), at);
      }
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

template <typename P>
constexpr int key_bits() {
  return static_cast<int>(sizeof(P) * 8);
}

// The width of the radix select's top digit and of rth_largest_collected's
// bins: 16 key bits (of a float32 key: sign, exponent, 7 mantissa bits).
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

// Picks, from counts of digits 0..bins-1, the digit holding the `remaining`-th
// largest, and lowers `remaining` by the counts above it.
inline uint64_t pick_digit(const int64_t* counts, int64_t bins, int64_t& remaining) {
  for (int64_t b = bins - 1; b >= 0; --b) {
    if (remaining <= counts[b]) return static_cast<uint64_t>(b);
    remaining -= counts[b];
  }
  return 0;
}

// Keys that one thread collected.
struct KeySpan {
  const uint64_t* keys;
  int64_t size;
};

// The r-th largest (1-based) of the keys collected per thread (one span per
// thread), all within [lo, hi] (sparse_select_kth.cpp).
uint64_t rth_largest_collected(const std::vector<KeySpan>& spans, uint64_t lo, uint64_t hi, int64_t r);

// The k-th largest key (csrc/common/radix.h) of the scores of `kind` in score
// dtype P, by the sample select on large models, else (or when its bracket
// misses; try_sample = false: it already ran and missed) the radix select.
template <typename P>
uint64_t kth_largest_key(const WorkTable& table, int64_t kind, int64_t k, bool try_sample = true);

// The sample select alone: false when the model is too small for it or the
// bracket missed. With `marks`, the pass also marks the kept elements
// (sparse_select_cpu); marks->complete says whether they are all marked.
template <typename P>
bool sampled_kth_largest_key(const WorkTable& table, int64_t kind, int64_t k, uint64_t& result,
                             Marks* marks = nullptr);

// Instantiated for every score dtype of kth_value_for_dtype, in
// sparse_select_kth.cpp and sparse_select_sample.cpp.
#define LS_SPARSE_KTH_EXTERN_(P)                                                                \
  extern template uint64_t kth_largest_key<P>(const WorkTable&, int64_t, int64_t, bool);       \
  extern template bool sampled_kth_largest_key<P>(const WorkTable&, int64_t, int64_t, uint64_t&, \
                                                  Marks*);
LS_SPARSE_KTH_EXTERN_(float)
LS_SPARSE_KTH_EXTERN_(double)
LS_SPARSE_KTH_EXTERN_(c10::Half)
LS_SPARSE_KTH_EXTERN_(c10::BFloat16)
LS_SPARSE_KTH_EXTERN_(int64_t)
#undef LS_SPARSE_KTH_EXTERN_

}  // namespace layersel
