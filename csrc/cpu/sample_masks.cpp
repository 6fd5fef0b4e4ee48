// CPU: Bernoulli(sigmoid(score)) masks for all score tensors in one parallel
// region, from the Philox stream shared with the CUDA kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../common/bernoulli.h"
#include "../common/fingerprint.h"
#include "../common/op_checks.h"
#include "../common/philox.h"
#include "bernoulli_simd.h"
#include "cpu_kernel_utils.h"

namespace layersel {
namespace {

constexpr int kBatchBlocks = 16;  // 64 elements per batch of Philox blocks
constexpr int64_t kBatch = 4 * kBatchBlocks;

// One element, from the shared scalar math.
template <typename T, typename M>
inline void sample_one(const PhiloxStream& stream, uint64_t g, T x, M* out) {
  const Philox4x32Out r = stream.block(g >> 2);
  *out = static_cast<M>(bernoulli_sample(static_cast<float>(x), r.v[g & 3u]));
}

// Elements [g, g + n) of the global stream, g the global index of x[0]: edges
// one by one, the middle in batches aligned to 64 in the global index.
template <typename T, typename M>
void sample_chunk_portable(PhiloxStream stream, uint64_t g, const T* x, M* out, int64_t n) {
  int64_t i = 0;
  for (; i < n && ((g + i) % kBatch) != 0; ++i) sample_one(stream, g + i, x[i], out + i);
  uint32_t words[kBatch];
  for (; i + kBatch <= n; i += kBatch) {
    philox_blocks<kBatchBlocks>(stream, (g + i) >> 2, words);
    for (int k = 0; k < kBatch; ++k)
      out[i + k] = static_cast<M>(bernoulli_sample(static_cast<float>(x[i + k]), words[k]));
  }
  for (; i < n; ++i) sample_one(stream, g + i, x[i], out + i);
}

// 0/1 bytes m[0, n) as bits [g, g + n) of the bitmap (element g at bit g % 8
// of byte g / 8). Whole bytes are stored; a byte the range shares with a
// neighbouring chunk (the first or last, when g or g + n is not a multiple of
// 8) is OR-ed in atomically, onto zeros.
inline void store_bits(const uint8_t* m, uint64_t g, int64_t n, uint8_t* bits) {
  int64_t i = 0;
  auto shared = [&](int64_t from, int64_t to) {  // elements [from, to) of one byte
    unsigned v = 0;
    for (int64_t k = from; k < to; ++k) v |= static_cast<unsigned>(m[k]) << ((g + k) & 7u);
    __atomic_fetch_or(bits + ((g + from) >> 3), static_cast<uint8_t>(v), __ATOMIC_RELAXED);
  };
  if (g & 7u) {
    i = std::min<int64_t>(n, static_cast<int64_t>(8 - (g & 7u)));
    shared(0, i);
  }
  for (; i + 8 <= n; i += 8) bits[(g + i) >> 3] = pack_flags8(m + i);
  if (i < n) shared(i, n);
}

// Elements [g, g + n) one by one into the bitmap (chunk edges).
template <typename T>
void sample_bits_one_by_one(const PhiloxStream& stream, uint64_t g, const T* x, int64_t n, uint8_t* bits) {
  uint8_t m[64];
  for (int64_t i = 0; i < n; i += 64) {
    const int64_t len = std::min<int64_t>(64, n - i);
    for (int64_t k = 0; k < len; ++k) sample_one(stream, g + i + k, x[i + k], m + k);
    store_bits(m, g + i, len, bits);
  }
}

// The n floats at x, converted into buf unless they are floats already.
template <typename T>
inline const float* as_floats(const T* x, float* buf, int64_t n) {
  if constexpr (std::is_same<T, float>::value) {
    return x;
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<float>(x[k]);
    return buf;
  }
}

#ifdef LS_HAVE_SIMD_PATH
// Same elements through a SIMD form of the same math (bit-identical), groups
// of 4 * kLanes aligned in the global index. One instantiation per ISA. The
// _bits form writes each group's masks as one 4 * kLanes-bit word of the
// bitmap (the group's bytes are the chunk's alone), the edges through store_bits.
#define LS_SAMPLE_CHUNK_SIMD(ISA, TARGET)                                                               \
  template <typename T, typename M>                                                                   \
  __attribute__((target(TARGET))) void sample_chunk_##ISA(PhiloxStream stream, uint64_t g, const T* x, \
                                                          M* out, int64_t n) {                          \
    constexpr int64_t kGroup = 4 * ISA::kLanes;                                                        \
    int64_t i = 0;                                                                                     \
    for (; i < n && ((g + i) % kGroup) != 0; ++i) sample_one(stream, g + i, x[i], out + i);           \
    float xf[kGroup];                                                                                  \
    for (; i + kGroup <= n; i += kGroup) {                                                             \
      ISA::sample_group(stream, (g + i) >> 2, as_floats(x + i, xf, kGroup), out + i);                  \
    }                                                                                                  \
    for (; i < n; ++i) sample_one(stream, g + i, x[i], out + i);                                       \
  }                                                                                                    \
  template <typename T>                                                                                \
  __attribute__((target(TARGET))) void sample_bits_chunk_##ISA(PhiloxStream stream, uint64_t g,        \
                                                               const T* x, int64_t n, uint8_t* bits) {  \
    constexpr int64_t kGroup = 4 * ISA::kLanes;                                                        \
    const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((kGroup - g % kGroup) % kGroup));   \
    sample_bits_one_by_one(stream, g, x, head, bits);                                                  \
    float xf[kGroup];                                                                                  \
    int64_t i = head;                                                                                  \
    for (; i + kGroup <= n; i += kGroup) {                                                             \
      const uint64_t word = ISA::sample_group_bits(stream, (g + i) >> 2, as_floats(x + i, xf, kGroup)); \
      std::memcpy(bits + ((g + i) >> 3), &word, kGroup / 8);                                           \
    }                                                                                                  \
    sample_bits_one_by_one(stream, g + i, x + i, n - i, bits);                                         \
  }
LS_SAMPLE_CHUNK_SIMD(avx2, "avx2")
LS_SAMPLE_CHUNK_SIMD(avx512, "avx512f,avx512dq,avx512bw,avx512vl")
#undef LS_SAMPLE_CHUNK_SIMD
#endif

template <typename T, typename M>
void sample_chunk(PhiloxStream stream, uint64_t g, const T* x, M* out, int64_t n) {
#ifdef LS_HAVE_SIMD_PATH
  static const int isa = cpu_simd_level();
  if (isa == 2) return sample_chunk_avx512(stream, g, x, out, n);
  if (isa == 1) return sample_chunk_avx2(stream, g, x, out, n);
#endif
  sample_chunk_portable(stream, g, x, out, n);
}

// Elements [g, g + n) into the bitmap (zeroed beforehand).
template <typename T>
void sample_bits_chunk(PhiloxStream stream, uint64_t g, const T* x, int64_t n, uint8_t* bits) {
#ifdef LS_HAVE_SIMD_PATH
  static const int isa = cpu_simd_level();
  if (isa == 2) return sample_bits_chunk_avx512(stream, g, x, n, bits);
  if (isa == 1) return sample_bits_chunk_avx2(stream, g, x, n, bits);
#endif
  alignas(64) uint8_t piece[4096];  // sampled as bytes (the portable batches), then packed
  for (int64_t i = 0; i < n;) {
    const int64_t len = std::min<int64_t>(n - i, 4096);
    sample_chunk_portable(stream, g + i, x + i, piece, len);
    store_bits(piece, g + i, len, bits);
    i += len;
  }
}

// Elements [g0, g0 + n) of the fingerprint sum (csrc/common/fingerprint.h):
// whole 64-element blocks of the global index in a loop that vectorises
// (32 x 32 -> 64-bit multiplies), the edges one by one.
template <typename T>
LS_CPU_CLONES uint64_t fingerprint_chunk(const T* x, uint64_t g0, int64_t n) {
  static const auto weights = [] {
    struct {
      uint32_t lo[kFingerprintLanes], hi[kFingerprintLanes];
    } w;
    for (int l = 0; l < kFingerprintLanes; ++l) {
      w.lo[l] = static_cast<uint32_t>(fingerprint_weight_lo(l));
      w.hi[l] = static_cast<uint32_t>(fingerprint_weight_hi(l));
    }
    return w;
  }();
  auto one = [&](int64_t i) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    return fingerprint_term(raw_bits(x[i]), static_cast<int>(g % kFingerprintLanes)) * fingerprint_block_weight(g);
  };
  uint64_t f = 0;
  int64_t i = 0;
  for (; i < n && (g0 + i) % kFingerprintLanes != 0; ++i) f += one(i);
  for (; i + kFingerprintLanes <= n; i += kFingerprintLanes) {
    uint64_t s = 0;
    for (int l = 0; l < kFingerprintLanes; ++l) {
      const uint64_t bits = raw_bits(x[i + l]);
      s += static_cast<uint64_t>(static_cast<uint32_t>(bits)) * weights.lo[l];
      if constexpr (sizeof(T) == 8) s += (bits >> 32) * weights.hi[l];
    }
    f += s * fingerprint_block_weight(g0 + static_cast<uint64_t>(i));
  }
  for (; i < n; ++i) f += one(i);
  return f;
}

uint64_t fingerprint_cpu(const WorkTable& table) {
  std::vector<uint64_t> partial(static_cast<size_t>(table.total_chunks()), 0);
  for_each_chunk(table, kCpuChunk, [&](const TensorEntry& e, int32_t, int64_t c, int64_t off, int64_t len) {
    LS_SWITCH_FLOAT_DTYPE(e.dtype, T, {
      partial[c] = fingerprint_chunk(static_cast<const T*>(e.x) + off, static_cast<uint64_t>(e.counter + off), len);
    });
  });
  uint64_t f = 0;
  for (uint64_t p : partial) f += p;  // mod 2^64: any order gives the same bits
  return f;
}

// The work table and the Philox stream of one call: keyed by `seed`, or by
// key_from_scores(seed, fingerprint) with key_by_scores.
struct MaskStream {
  WorkTable table;
  PhiloxStream stream;
};

MaskStream mask_stream(at::TensorList scores, int64_t seed, bool key_by_scores,
                       const c10::optional<at::IntArrayRef>& counters, const char* op) {
  WorkTable table = score_table(scores, counters, kCpuChunk, op);
  const uint64_t key = key_by_scores ? key_from_scores(static_cast<uint64_t>(seed), fingerprint_cpu(table),
                                                       static_cast<uint64_t>(table.total_numel))
                                     : static_cast<uint64_t>(seed);
  return {std::move(table), PhiloxStream(key)};
}

at::Tensor sample_masks_cpu(at::TensorList scores, int64_t seed, at::ScalarType dtype, bool key_by_scores,
                            c10::optional<at::IntArrayRef> counters) {
  check_mask_dtype(dtype);
  const MaskStream ms = mask_stream(scores, seed, key_by_scores, counters, "sample_masks");
  at::Tensor out = empty_cpu_output(ms.table.total_numel, dtype);
  AT_DISPATCH_INTEGRAL_TYPES(dtype, "sample_masks_cpu", [&] {
    using M = scalar_t;
    M* o = out.data_ptr<M>();
    for_each_chunk(ms.table, kCpuChunk, [&](const TensorEntry& e, int32_t, int64_t, int64_t off, int64_t len) {
      LS_SWITCH_FLOAT_DTYPE(e.dtype, T, {
        sample_chunk<T, M>(ms.stream, static_cast<uint64_t>(e.counter + off), static_cast<const T*>(e.x) + off,
                           o + e.base + off, len);
      });
    });
  });
  return out;
}

at::Tensor sample_mask_bits_cpu(at::TensorList scores, int64_t seed, bool key_by_scores) {
  // Bit g of the bitmap is stream index g: no counters here.
  const MaskStream ms = mask_stream(scores, seed, key_by_scores, c10::nullopt, "sample_mask_bits");
  at::Tensor out = at::zeros({(ms.table.total_numel + 7) / 8}, at::kByte);
  uint8_t* bits = out.data_ptr<uint8_t>();
  for_each_chunk(ms.table, kCpuChunk, [&](const TensorEntry& e, int32_t, int64_t, int64_t off, int64_t len) {
    LS_SWITCH_FLOAT_DTYPE(e.dtype, T, {
      sample_bits_chunk<T>(ms.stream, static_cast<uint64_t>(e.base + off), static_cast<const T*>(e.x) + off, len,
                           bits);
    });
  });
  return out;
}

at::Tensor score_fingerprint_cpu(at::TensorList scores, c10::optional<at::IntArrayRef> counters) {
  const WorkTable table = score_table(scores, counters, kCpuChunk, "score_fingerprint");
  at::Tensor out = at::empty({1}, at::kLong);
  const uint64_t f = fingerprint_cpu(table);
  std::memcpy(out.data_ptr<int64_t>(), &f, sizeof(f));
  return out;
}

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CPU, m) {
  m.impl("sample_masks", &layersel::sample_masks_cpu);
  m.impl("sample_mask_bits", &layersel::sample_mask_bits_cpu);
  m.impl("score_fingerprint", &layersel::score_fingerprint_cpu);
}
