// The coded mask codec's torch wrapper: argument checks, the blocks of the
// concatenated layers on at::parallel_for, and the bitmap helpers.
#include "wire_masks.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstring>

#include "../common/mask_coder.h"
#include "cpu_kernel_utils.h"
#include "mask_lanes_simd.h"
#include "mask_prior_simd.h"

namespace layersel {
namespace {

namespace mc = maskcode;

constexpr int64_t kWordsPerTask = int64_t{1} << 14;  // prior words (of 64 elements) per parallel task
// A prior's outputs, the encoder's scratch and output and the decoder's output
// come from the output cache from this size up: a client and its server code
// every round, and fresh pages of a few MB cost them more in first-touch faults
// than their loops.
constexpr size_t kCacheMinBytes = size_t{256} << 10;

// The priors as the coder reads them, checked against each other.
std::vector<mc::Prior> priors_of(const std::vector<at::Tensor>& q, const std::vector<at::Tensor>& words) {
  TORCH_CHECK_VALUE(q.size() == words.size(), "mask priors: ", q.size(), " q, ", words.size(), " bit words");
  std::vector<mc::Prior> out(q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    const int64_t n = q[i].numel(), nw = mc::prior_words(n);
    TORCH_CHECK_VALUE(q[i].device().is_cpu() && q[i].scalar_type() == at::kShort && q[i].is_contiguous(), "prior #", i,
                      ": q must be a contiguous int16 CPU tensor");
    const at::Tensor& w = words[i];
    TORCH_CHECK_VALUE(w.device().is_cpu() && w.scalar_type() == at::kLong && w.is_contiguous() && w.dim() == 2 &&
                          w.size(0) == 3 && w.size(1) == nw,
                      "prior #", i, ": its bit words must be a contiguous int64 CPU tensor [3, ", nw, "]");
    const auto* rows = reinterpret_cast<const uint64_t*>(w.data_ptr<int64_t>());
    out[i] = {reinterpret_cast<const uint16_t*>(q[i].data_ptr<int16_t>()), rows, rows + nw, rows + 2 * nw, n};
  }
  return out;
}

// Block b's segments: the pieces of the layers (concatenated) in
// [b * block_elems, (b + 1) * block_elems).
struct Blocks {
  std::vector<mc::Segment> segs;
  std::vector<int64_t> first;  // block b's segments are segs[first[b], first[b + 1])
  std::vector<int64_t> elems;  // and its elements
  int64_t total = 0;

  Blocks(const std::vector<mc::Prior>& priors, const std::vector<int64_t>& bit_offsets, int64_t block_elems) {
    for (const mc::Prior& p : priors) total += p.n;
    TORCH_CHECK_VALUE(block_elems > 0 && block_elems % 64 == 0, "block_elems must be a positive multiple of 64, got ",
                      block_elems);
    const int64_t nblocks = (total + block_elems - 1) / block_elems;
    size_t layer = 0;
    int64_t elem = 0;  // within the layer
    for (int64_t b = 0; b < nblocks; ++b) {
      first.push_back(static_cast<int64_t>(segs.size()));
      const int64_t want = std::min(block_elems, total - b * block_elems);
      elems.push_back(want);
      for (int64_t left = want; left > 0;) {
        while (elem == priors[layer].n) {
          ++layer;
          elem = 0;
        }
        const int64_t len = std::min(left, priors[layer].n - elem);
        const uint64_t bit = bit_offsets.empty() ? 0 : static_cast<uint64_t>(bit_offsets[layer] + elem);
        segs.push_back({&priors[layer], elem, len, bit});
        elem += len;
        left -= len;
      }
    }
    first.push_back(static_cast<int64_t>(segs.size()));
  }
  int64_t count() const { return static_cast<int64_t>(elems.size()); }
  const mc::Segment* of(int64_t b) const { return segs.data() + first[b]; }
  int size(int64_t b) const { return static_cast<int>(first[b + 1] - first[b]); }
};

// The 8 elements of every byte value: expanding a byte is one copy.
template <typename T>
struct ByteElements {
  T v[256][8];
  ByteElements() {
    for (int b = 0; b < 256; ++b) {
      for (int i = 0; i < 8; ++i) v[b][i] = static_cast<T>((b >> i) & 1);
    }
  }
};

// The coder's loops, compiled per ISA (BMI and wider multiplies make encoding
// about 40% faster on an AVX2 machine), and with the AVX-512 or AVX2 lane
// loops where the CPU has them.
LS_CPU_CLONES uint16_t* encode_cloned(const mc::Segment* segs, int nsegs, const uint8_t* bits, uint64_t bytes,
                                     uint16_t* begin, uint16_t* end) {
  return mc::encode_block(segs, nsegs, bits, bytes, begin, end);
}
LS_CPU_CLONES bool decode_cloned(const mc::Segment* segs, int nsegs, const uint8_t* in, int64_t words, uint64_t* out) {
  return mc::decode_block(segs, nsegs, in, words, out);
}
// Which lane loops run: 2 AVX-512, 1 AVX2, 0 the scalar ones (LAYERSEL_CPU_ISA caps them too).
int lane_level() {
  static const int level = [] {
    const int cap = cpu_simd_level();
    if (cap >= 2 && mc::lanes_avx512_supported()) return 2;
    return cap >= 1 && mc::lanes_avx2_supported() ? 1 : 0;
  }();
  return level;
}
uint16_t* encode_any(const mc::Segment* segs, int nsegs, const uint8_t* bits, uint64_t bytes, uint16_t* begin,
                     uint16_t* end) {
#ifdef LS_HAVE_LANES_SIMD
  if (lane_level() == 2) return mc::encode_block_avx512(segs, nsegs, bits, bytes, begin, end);
  if (lane_level() == 1) return mc::encode_block_avx2(segs, nsegs, bits, bytes, begin, end);
#endif
  return encode_cloned(segs, nsegs, bits, bytes, begin, end);
}
bool decode_any(const mc::Segment* segs, int nsegs, const uint8_t* in, int64_t words, uint64_t* out) {
#ifdef LS_HAVE_LANES_SIMD
  if (lane_level() == 2) return mc::decode_block_avx512(segs, nsegs, in, words, out);
  if (lane_level() == 1) return mc::decode_block_avx2(segs, nsegs, in, words, out);
#endif
  return decode_cloned(segs, nsegs, in, words, out);
}

template <typename T>
void expand_as(const uint8_t* bits, uint64_t bytes, int64_t bit_offset, T* out, int64_t n) {
  static const ByteElements<T> table;
  at::parallel_for(0, (n + 63) / 64, kWordsPerTask, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t begin = w * 64, count = std::min<int64_t>(64, n - begin);
      const uint64_t v = mc::load_bits(bits, bytes, static_cast<uint64_t>(bit_offset + begin), static_cast<int>(count));
      int64_t i = 0;
      for (; i + 8 <= count; i += 8) std::memcpy(out + begin + i, table.v[(v >> i) & 255], sizeof(table.v[0]));
      for (; i < count; ++i) out[begin + i] = static_cast<T>((v >> i) & 1);
    }
  });
}

}  // namespace

std::tuple<bool, at::Tensor, at::Tensor, int64_t> mask_prior(const at::Tensor& theta) {
  TORCH_CHECK_VALUE(theta.device().is_cpu() && theta.is_contiguous() &&
                        (theta.scalar_type() == at::kFloat || theta.scalar_type() == at::kDouble),
                    "mask_prior: theta must be a contiguous float32 or float64 CPU tensor, got ", theta.scalar_type());
  const int64_t n = theta.numel(), nw = mc::prior_words(n);
  // From the output cache, down to a small layer's: each round quantizes every layer of theta, and
  // fresh pages cost more in first-touch faults than the SIMD loop that fills them.
  at::Tensor q = empty_cpu_output_from(n, at::kShort, kCacheMinBytes);
  at::Tensor words = empty_cpu_output_from(3 * nw, at::kLong, kCacheMinBytes).view({3, nw});
  auto* qp = reinterpret_cast<uint16_t*>(q.data_ptr<int16_t>());
  auto* cp = reinterpret_cast<uint64_t*>(words.data_ptr<int64_t>());
  uint64_t *ep = cp + nw, *hp = cp + 2 * nw;
  static const int level = cpu_simd_level();
  std::atomic<uint64_t> sum{0};
  std::atomic<bool> ok{true};
  at::parallel_for(0, nw, kWordsPerTask, [&](int64_t w0, int64_t w1) {
    uint64_t part = 0;
    const bool good = theta.scalar_type() == at::kFloat
                          ? mc::prepare_prior_at(level, theta.data_ptr<float>(), n, w0, w1, qp, cp, ep, hp, &part)
                          : mc::prepare_prior_at(level, theta.data_ptr<double>(), n, w0, w1, qp, cp, ep, hp, &part);
    if (!good) ok = false;
    sum += part;
  });
  return {ok.load(), q, words, mc::finish_fingerprint(sum.load(), n)};
}

std::tuple<bool, std::vector<int64_t>, at::Tensor> mask_encode(const at::Tensor& bits,
                                                              const std::vector<int64_t>& bit_offsets,
                                                              const std::vector<at::Tensor>& q,
                                                              const std::vector<at::Tensor>& words,
                                                              int64_t block_elems) {
  const uint8_t* src = bytes_of(bits, "bits");
  const uint64_t bytes = static_cast<uint64_t>(bits.numel());
  const std::vector<mc::Prior> priors = priors_of(q, words);
  TORCH_CHECK_VALUE(bit_offsets.size() == priors.size(), "mask_encode: ", bit_offsets.size(), " bit offsets for ",
                    priors.size(), " priors");
  for (size_t i = 0; i < priors.size(); ++i) {
    TORCH_CHECK_VALUE(bit_offsets[i] >= 0 && static_cast<uint64_t>(bit_offsets[i] + priors[i].n) <= 8 * bytes,
                      "mask_encode: layer #", i, " runs past the bitmap");
  }
  const Blocks blocks(priors, bit_offsets, block_elems);
  const int64_t nb = blocks.count();
  // Each block may take as many words as its bitmap, plus the state.
  std::vector<int64_t> cap_start(nb + 1, 0);
  for (int64_t b = 0; b < nb; ++b) cap_start[b + 1] = cap_start[b] + (blocks.elems[b] + 15) / 16 + 2;
  const at::Tensor scratch_block = empty_cpu_output_from(cap_start[nb], at::kShort, kCacheMinBytes);
  uint16_t* scratch = reinterpret_cast<uint16_t*>(scratch_block.data_ptr<int16_t>());
  std::vector<const uint16_t*> head(nb, nullptr);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      head[b] = encode_any(blocks.of(b), blocks.size(b), src, bytes, scratch + cap_start[b],
                              scratch + cap_start[b + 1]);
    }
  });
  std::vector<int64_t> sizes(nb), start(nb + 1, 0);
  for (int64_t b = 0; b < nb; ++b) {
    if (head[b] == nullptr) return {false, {}, at::Tensor()};
    sizes[b] = 2 * (scratch + cap_start[b + 1] - head[b]);
    start[b + 1] = start[b] + sizes[b];
  }
  at::Tensor payload = empty_cpu_output_from(start[nb], at::kByte, kCacheMinBytes);
  uint8_t* dst = payload.data_ptr<uint8_t>();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) std::memcpy(dst + start[b], head[b], static_cast<size_t>(sizes[b]));
  });
  return {true, sizes, payload};
}

std::tuple<int64_t, at::Tensor> mask_decode(const at::Tensor& payload, const std::vector<int64_t>& block_bytes,
                                            int64_t block_elems, const std::vector<at::Tensor>& q,
                                            const std::vector<at::Tensor>& words) {
  const uint8_t* src = bytes_of(payload, "payload");
  const std::vector<mc::Prior> priors = priors_of(q, words);
  const Blocks blocks(priors, {}, block_elems);
  const int64_t nb = blocks.count();
  TORCH_CHECK_VALUE(static_cast<int64_t>(block_bytes.size()) == nb, "coded masks: ", block_bytes.size(),
                    " block sizes for ", nb, " blocks of ", block_elems, " elements");
  std::vector<int64_t> start(nb + 1, 0);
  for (int64_t b = 0; b < nb; ++b) {
    TORCH_CHECK_VALUE(block_bytes[b] >= 2 * mc::kBlockMinWords && block_bytes[b] % 2 == 0 &&
                          block_bytes[b] <= payload.numel(),
                      "coded masks: block #", b, " has ", block_bytes[b], " bytes (an even number, at least ",
                      2 * mc::kBlockMinWords, ")");
    start[b + 1] = start[b] + block_bytes[b];
  }
  TORCH_CHECK_VALUE(start[nb] == payload.numel(), "coded masks: the blocks take ", start[nb], " bytes, the payload has ",
                    payload.numel());
  // Blocks start at multiples of block_elems (a multiple of 64): each writes
  // whole words of its own, but the last block's last word only as far as its
  // last 16-bit piece, so that word starts zeroed (bits past the end are zero).
  const int64_t out_words_n = mc::prior_words(blocks.total);
  at::Tensor out = empty_cpu_output_from(8 * out_words_n, at::kByte, kCacheMinBytes);
  auto* out_words = reinterpret_cast<uint64_t*>(out.data_ptr<uint8_t>());
  if (out_words_n > 0) out_words[out_words_n - 1] = 0;
  std::atomic<int64_t> bad{nb};
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (!decode_any(blocks.of(b), blocks.size(b), src + start[b], block_bytes[b] / 2,
                      out_words + b * (block_elems / 64))) {
        int64_t seen = bad.load();
        while (b < seen && !bad.compare_exchange_weak(seen, b)) {
        }
      }
    }
  });
  const int64_t first_bad = bad.load();
  return {first_bad == nb ? -1 : first_bad, out};
}

at::Tensor bits_expand(const at::Tensor& bits, int64_t bit_offset, int64_t n, int64_t element_size) {
  const uint8_t* src = bytes_of(bits, "bits");
  TORCH_CHECK_VALUE(n >= 0 && bit_offset >= 0 && bit_offset <= 8 * bits.numel() - n, "bits_expand: ", n,
                    " bits from bit ", bit_offset, " run past a bitmap of ", bits.numel(), " bytes");
  const at::ScalarType dtype = element_size == 1   ? at::kChar
                               : element_size == 2 ? at::kShort
                               : element_size == 4 ? at::kInt
                               : element_size == 8 ? at::kLong
                                                   : at::ScalarType::Undefined;
  TORCH_CHECK_VALUE(dtype != at::ScalarType::Undefined, "bits_expand: elements of 1, 2, 4 or 8 bytes, not ",
                    element_size);
  at::Tensor out = empty_cpu_output_from(n, dtype, kCacheMinBytes);
  if (n == 0) return out;
  const uint64_t bytes = static_cast<uint64_t>(bits.numel());
  void* p = out.data_ptr();
  switch (element_size) {
    case 1: expand_as(src, bytes, bit_offset, static_cast<uint8_t*>(p), n); break;
    case 2: expand_as(src, bytes, bit_offset, static_cast<uint16_t*>(p), n); break;
    case 4: expand_as(src, bytes, bit_offset, static_cast<uint32_t*>(p), n); break;
    default: expand_as(src, bytes, bit_offset, static_cast<uint64_t*>(p), n); break;
  }
  return out;
}

at::Tensor bits_gather(const at::Tensor& bits, const std::vector<int64_t>& offsets,
                       const std::vector<int64_t>& lengths) {
  const uint8_t* src = bytes_of(bits, "bits");
  const uint64_t bytes = static_cast<uint64_t>(bits.numel());
  TORCH_CHECK_VALUE(offsets.size() == lengths.size(), "bits_gather: ", offsets.size(), " offsets, ", lengths.size(),
                    " lengths");
  int64_t total = 0;
  for (size_t i = 0; i < offsets.size(); ++i) {
    TORCH_CHECK_VALUE(offsets[i] >= 0 && lengths[i] >= 0 && static_cast<uint64_t>(offsets[i] + lengths[i]) <= 8 * bytes,
                      "bits_gather: range #", i, " runs past the bitmap");
    total += lengths[i];
  }
  at::Tensor words = at::empty({mc::prior_words(total) + 1}, at::kLong);
  mc::BitWriter w(words.data_ptr<int64_t>());
  for (size_t i = 0; i < offsets.size(); ++i) {
    for (int64_t t = 0; t < lengths[i]; t += 64) {
      const int count = static_cast<int>(std::min<int64_t>(64, lengths[i] - t));
      w.put(mc::load_bits(src, bytes, static_cast<uint64_t>(offsets[i] + t), count), count);
    }
  }
  w.flush();
  return words.view(at::kByte).narrow(0, 0, (total + 7) / 8).clone();
}

}  // namespace layersel
