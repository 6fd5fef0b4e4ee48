// CUDA: Bernoulli(sigmoid(score)) masks of every score tensor in one launch.
// Element g of the concatenation uses word g % 4 of Philox block g / 4, the
// same stream and comparison as the CPU kernel (csrc/common/), so a seed gives
// the same masks on both.
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common/bernoulli.h"
#include "../common/fingerprint.h"
#include "../common/op_checks.h"
#include "../common/philox.h"
#include "cuda_utils.cuh"

namespace layersel {
namespace {

// Adds each chunk's fingerprint terms to *out (integer atomics: the sum is
// mod 2^64, so the order does not matter and the bits are always the same).
__global__ void __launch_bounds__(kThreads) fingerprint_kernel(TableRef table, unsigned long long* out) {
  const int64_t c = blockIdx.x;
  const auto [t, e, off, len] = locate_chunk(table, c);
  const uint64_t g0 = static_cast<uint64_t>(e.counter + off);
  uint64_t f = 0;
  LS_SWITCH_FLOAT_DTYPE(e.dtype, T, {
    const T* x = static_cast<const T*>(e.x) + off;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      const uint64_t g = g0 + static_cast<uint64_t>(i);
      f += fingerprint_term(raw_bits(x[i]), static_cast<int>(g % kFingerprintLanes)) * fingerprint_block_weight(g);
    }
  });
  f = block_sum(f);
  if (threadIdx.x == 0) atomicAdd(out, static_cast<unsigned long long>(f));
}

// The four elements of Philox block b that lie in stream indices [g0, g1):
// the shared math (the dtype switch stays outside the loops). Stream index g
// is element g - counter of the tensor x and of its output out.
template <typename T, typename M>
__device__ __forceinline__ void sample_block(const PhiloxStream& stream, uint64_t b, uint64_t g0, uint64_t g1,
                                             const T* x, uint64_t counter, M* out) {
  const Philox4x32Out r = stream.block(b);
#pragma unroll
  for (int lane = 0; lane < 4; ++lane) {
    const uint64_t g = 4 * b + lane;
    if (g >= g0 && g < g1) {
      const uint64_t j = g - counter;
      out[j] = static_cast<M>(bernoulli_sample(static_cast<float>(x[j]), r.v[lane]));
    }
  }
}

// The Philox key of a mask launch: `seed`, or with the scores' fingerprint
// (computed on the device by an earlier launch) key_from_scores(seed,
// *fingerprint, total).
struct MaskKey {
  uint64_t seed;
  const unsigned long long* fingerprint;  // null: keyed by the seed alone
  uint64_t total;
  __device__ __forceinline__ PhiloxStream stream() const {
    return PhiloxStream(fingerprint ? key_from_scores(seed, *fingerprint, total) : seed);
  }
};

template <typename M>
__global__ void __launch_bounds__(kThreads) sample_masks_kernel(TableRef table, MaskKey key, M* out) {
  const int64_t c = blockIdx.x;
  const auto [t, e, off, len] = locate_chunk(table, c);
  const uint64_t g0 = static_cast<uint64_t>(e.counter + off);  // stream indices of the chunk
  const uint64_t g1 = g0 + static_cast<uint64_t>(len);          // exclusive
  const PhiloxStream stream = key.stream();
  // Each thread takes whole Philox blocks; edge blocks are shared with the
  // neighbouring chunk or tensor, each writing only its own elements.
  LS_SWITCH_FLOAT_DTYPE(e.dtype, T, {
    const T* x = static_cast<const T*>(e.x);
    for (uint64_t b = (g0 >> 2) + threadIdx.x; b <= ((g1 - 1) >> 2); b += blockDim.x)
      sample_block<T, M>(stream, b, g0, g1, x, static_cast<uint64_t>(e.counter), out + e.base);
  });
}

// Bit g of the bitmap is element g of the concatenation (stream index g), the
// draw of sample_masks_kernel. A lane draws one Philox block (4 elements), so a
// warp covers 128 consecutive bits, and 8 lanes' nibbles OR together into one
// 32-bit word: bit g % 32 of word g / 32, which little-endian is bit g % 8 of
// byte g / 8. Words wholly inside the chunk are stored; a word shared with a
// neighbouring chunk or tensor is OR-ed in (the output starts zeroed). Words
// from `full_words` on (the last one, when the bytes end inside it) are left
// to tail_bits_kernel: a 32-bit store there would pass the end of the output.
template <typename T>
__device__ __forceinline__ void sample_bits_chunk(const PhiloxStream& stream, const T* x, uint64_t base, uint64_t g0,
                                                  uint64_t g1, uint64_t full_words, uint32_t* words) {
  const int lane = threadIdx.x & 31;
  for (uint64_t group = (g0 & ~uint64_t{127}) + (threadIdx.x >> 5) * 128; group < g1; group += kThreads / 32 * 128) {
    const uint64_t b = group / 4 + lane;  // elements 4b .. 4b + 3
    const Philox4x32Out r = stream.block(b);
    uint32_t nibble = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint64_t g = 4 * b + i;
      if (g >= g0 && g < g1) {
        nibble |= static_cast<uint32_t>(bernoulli_sample(static_cast<float>(x[g - base]), r.v[i])) << i;
      }
    }
    uint32_t word = nibble << (4 * (lane & 7));
    word |= __shfl_xor_sync(0xffffffffu, word, 1);
    word |= __shfl_xor_sync(0xffffffffu, word, 2);
    word |= __shfl_xor_sync(0xffffffffu, word, 4);
    const uint64_t w = group / 32 + lane / 8;
    if ((lane & 7) != 0 || w >= full_words) continue;
    if (32 * w >= g0 && 32 * w + 32 <= g1) {
      words[w] = word;
    } else if (word != 0) {
      atomicOr(&words[w], word);
    }
  }
}

template <typename T>
__device__ __forceinline__ bool sample_bit(const PhiloxStream& stream, const T* x, uint64_t g) {
  return bernoulli_sample(static_cast<float>(x[0]), stream.block(g / 4).v[g % 4]);
}

__global__ void __launch_bounds__(kThreads) sample_bits_kernel(TableRef table, MaskKey key, uint64_t full_words,
                                                               uint32_t* words) {
  const auto [t, e, off, len] = locate_chunk(table, blockIdx.x);
  const uint64_t base = static_cast<uint64_t>(e.base), g0 = base + static_cast<uint64_t>(off);
  const PhiloxStream stream = key.stream();
  LS_SWITCH_FLOAT_DTYPE(e.dtype, T, {
    sample_bits_chunk<T>(stream, static_cast<const T*>(e.x), base, g0, g0 + static_cast<uint64_t>(len), full_words,
                         words);
  });
}

// The bits from 32 * full_words to total (fewer than 32), one lane each, into
// the output's last 1..3 bytes: lane i finds its element's tensor (the last
// entry whose base is at or below it: an empty tensor shares its base with the
// next one) and draws it; lane 0 stores the bytes.
__global__ void tail_bits_kernel(TableRef table, MaskKey key, uint64_t full_words, uint8_t* bytes) {
  const int lane = threadIdx.x;
  const uint64_t g = 32 * full_words + lane;
  const uint64_t total = key.total;
  const PhiloxStream stream = key.stream();
  bool bit = false;
  if (g < total) {
    const TensorEntry* entries = table.entries;
    const TensorEntry& e = entries[last_at_or_below(table.n, static_cast<int64_t>(g),
                                                    [entries](int32_t i) { return entries[i].base; })];
    const uint64_t j = g - static_cast<uint64_t>(e.base);
    LS_SWITCH_FLOAT_DTYPE(e.dtype, T, { bit = sample_bit(stream, static_cast<const T*>(e.x) + j, g); });
  }
  const uint32_t word = __ballot_sync(0xffffffffu, bit);
  if (lane == 0) {
    for (uint64_t byte = 4 * full_words; byte < (total + 7) / 8; ++byte)
      bytes[byte] = static_cast<uint8_t>(word >> (8 * (byte - 4 * full_words)));
  }
}

// The fingerprint of the table's tensors, as int64[1] on the device.
at::Tensor fingerprint_on_device(const DeviceTable& dt, int64_t chunks, c10::Device device, cudaStream_t stream) {
  at::Tensor fingerprint = at::empty({1}, at::TensorOptions().dtype(at::kLong).device(device));
  C10_CUDA_CHECK(cudaMemsetAsync(fingerprint.data_ptr<int64_t>(), 0, sizeof(int64_t), stream));
  if (chunks == 0) return fingerprint;
  fingerprint_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
      dt.ref, reinterpret_cast<unsigned long long*>(fingerprint.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return fingerprint;
}

// What both mask ops launch with: the table on the device and the key (with
// key_by_scores, the fingerprint computed and used on the device: no sync).
struct MaskLaunch {
  DeviceTable dt;
  at::Tensor fingerprint;  // keeps it alive until the launches are queued
  MaskKey key;
};

MaskLaunch prepare_mask_launch(const WorkTable& table, int64_t seed, bool key_by_scores, c10::Device device,
                               cudaStream_t stream) {
  MaskLaunch m;
  m.dt = upload_table(table, device);
  m.key = MaskKey{static_cast<uint64_t>(seed), nullptr, static_cast<uint64_t>(table.total_numel)};
  if (key_by_scores) {
    m.fingerprint = fingerprint_on_device(m.dt, table.total_chunks(), device, stream);
    m.key.fingerprint = reinterpret_cast<const unsigned long long*>(m.fingerprint.data_ptr<int64_t>());
  }
  return m;
}

at::Tensor sample_masks_cuda(at::TensorList scores, int64_t seed, at::ScalarType dtype, bool key_by_scores,
                             c10::optional<at::IntArrayRef> counters) {
  check_mask_dtype(dtype);  // before the empty-input return: the CPU kernel refuses the same dtypes
  const WorkTable table = score_table(scores, counters, chunk_for_bandwidth(scores), "sample_masks");
  const c10::Device device = cuda_device_of(scores, "sample_masks");
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({table.total_numel}, at::TensorOptions().dtype(dtype).device(device));
  const int64_t chunks = table.total_chunks();
  if (chunks == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const MaskLaunch m = prepare_mask_launch(table, seed, key_by_scores, device, stream);
  AT_DISPATCH_INTEGRAL_TYPES(dtype, "sample_masks_cuda", [&] {
    sample_masks_kernel<scalar_t><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(m.dt.ref, m.key,
                                                                                          out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// sample_masks as a bitmap (csrc/ops.cpp), without the mask bytes: one launch
// writes the bits, a one-warp launch the last partial word.
at::Tensor sample_mask_bits_cuda(at::TensorList scores, int64_t seed, bool key_by_scores) {
  // Bit g of the bitmap is stream index g: no counters here.
  const WorkTable table = score_table(scores, c10::nullopt, chunk_for_bandwidth(scores), "sample_mask_bits");
  const c10::Device device = cuda_device_of(scores, "sample_mask_bits");
  const c10::cuda::CUDAGuard guard(device);
  const uint64_t total = static_cast<uint64_t>(table.total_numel);
  const int64_t nbytes = static_cast<int64_t>((total + 7) / 8);
  at::Tensor out = at::zeros({nbytes}, at::TensorOptions().dtype(at::kByte).device(device));
  const int64_t chunks = table.total_chunks();
  if (chunks == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const MaskLaunch m = prepare_mask_launch(table, seed, key_by_scores, device, stream);
  const uint64_t full_words = static_cast<uint64_t>(nbytes) / 4;  // 32-bit words wholly inside the output
  // The allocation is 512-byte aligned (the caching allocator), so the words are 4-byte aligned.
  if (full_words > 0) {
    sample_bits_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
        m.dt.ref, m.key, full_words, reinterpret_cast<uint32_t*>(out.data_ptr<uint8_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (32 * full_words < total) {
    tail_bits_kernel<<<1, 32, 0, stream>>>(m.dt.ref, m.key, full_words, out.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor score_fingerprint_cuda(at::TensorList scores, c10::optional<at::IntArrayRef> counters) {
  const WorkTable table = score_table(scores, counters, chunk_for_bandwidth(scores), "score_fingerprint");
  const c10::Device device = cuda_device_of(scores, "score_fingerprint");
  const c10::cuda::CUDAGuard guard(device);
  const int64_t chunks = table.total_chunks();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (chunks == 0) return fingerprint_on_device(DeviceTable{}, 0, device, stream);
  return fingerprint_on_device(upload_table(table, device), chunks, device, stream);
}

}  // namespace
}  // namespace layersel

TORCH_LIBRARY_IMPL(layersel, CUDA, m) {
  m.impl("sample_masks", &layersel::sample_masks_cuda);
  m.impl("score_fingerprint", &layersel::score_fingerprint_cuda);
  m.impl("sample_mask_bits", &layersel::sample_mask_bits_cuda);
}
