// The coded FedPM mask format's codec on CPU tensors (the format:
// layersel_ext/wire_coded.py; the coder: common/mask_coder.h), and the bitmap
// helpers both mask forms use. Bound into the Python module as _C.mask_*,
// _C.bits_*; arrays come from numpy without copies (torch.from_numpy).
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace layersel {

// A layer's prior from theta (float32/float64, contiguous): (whether every
// element is a probability, q as int16 holding uint16 [n], its bit words as
// int64 [3, ceil(n / 64)]: the "certain", "expected" and "half" rows of
// common/mask_coder.h's Prior, the prior's fingerprint). When not every
// element is a probability only the first is meaningful.
std::tuple<bool, at::Tensor, at::Tensor, int64_t> mask_prior(const at::Tensor& theta);

// Codes the layers whose priors are given (q, words: mask_prior's tensors), whose bits start at bit_offsets[i] of `bits` (uint8, little bit
// order), concatenated and cut into blocks of block_elems elements. Returns
// (false, ...) when a block takes more words than its bitmap would, else
// (true, every block's bytes, the blocks concatenated).
std::tuple<bool, std::vector<int64_t>, at::Tensor> mask_encode(const at::Tensor& bits,
                                                              const std::vector<int64_t>& bit_offsets,
                                                              const std::vector<at::Tensor>& q,
                                                              const std::vector<at::Tensor>& words,
                                                              int64_t block_elems);

// The inverse: the layers' bits, concatenated, as uint8 [8 * ceil(total / 64)]
// (the bits past the total zero), and the first block that is not exactly a
// valid stream for these priors (-1 when none). ValueError when the block sizes
// do not fit the payload.
std::tuple<int64_t, at::Tensor> mask_decode(const at::Tensor& payload, const std::vector<int64_t>& block_bytes,
                                            int64_t block_elems, const std::vector<at::Tensor>& q,
                                            const std::vector<at::Tensor>& words);

// Bits [bit_offset, bit_offset + n) of `bits` as 0/1 integers of element_size
// bytes (1, 2, 4 or 8: int8 .. int64, which the caller views as the mask's own
// dtype), written on all threads into a new tensor from the output cache: a
// server expands every client's masks every round.
at::Tensor bits_expand(const at::Tensor& bits, int64_t bit_offset, int64_t n, int64_t element_size);

// The ranges [offsets[i], offsets[i] + lengths[i]) of `bits`, concatenated
// into a new bitmap (uint8 [ceil(sum / 8)], the padding bits zero).
at::Tensor bits_gather(const at::Tensor& bits, const std::vector<int64_t>& offsets,
                       const std::vector<int64_t>& lengths);

}  // namespace layersel
