"""FedPM masks below one bit per parameter: lossless coding with the server's Bernoulli parameters.

In FedPM as fl4health runs it, the server sends every client the global Bernoulli parameters θ
(``FedPm.aggregate_bayesian``'s Beta posterior mode, one float array per layer) and the client turns
them into its scores (``FedPmExchanger.pull_parameters``), trains, and sends back masks sampled from
its scores. So when a client codes its masks, client and server hold the same θ: each mask bit is
coded with the probability θ gives it, and costs about ``-log2 p(bit)`` bits. Where θ is exactly 0 or
1 (most elements after a few rounds: every client's masks agreed there) a bit costs almost nothing;
elsewhere about the entropy of θ. The server decodes exactly the bits that were sent, so its
aggregation and every model stay bit for bit what fl4health's own format gives.

``CodedMaskPacker(side=...)`` is the packer of ``patch(wire="coded")``: on the client
(``FedPmExchanger``) it remembers the θ it last unpacked, on the server (``FedPm``) the θ it last
packed; ``sample_masks_coded`` is the client's message straight from its scores.

The prior. θ (float32 or float64, every element in [0, 1]) becomes ``q = floor(θ * 2**15 + 1/2)``,
an integer in [0, 2**15] computed exactly in double arithmetic, the same on every machine. An element
with ``0 < q < 2**15`` is one rANS symbol with P(1) = q / 2**15, except q = 2**14 (θ = 1/2: with two
clients, every element they disagreed on), whose bit goes as it is, in the block's raw bits: exactly
the one bit it costs, without the coder's work. One with q = 0 or 2**15 is expected to be 0 or 1,
and a bit that contradicts it still codes (at about 15 bits; runs of expected bits cost about 1.44
bits per 2**15 elements). The coder: ``csrc/common/mask_coder.h``.

Stream (``wire.py`` has the header, the names, the hint and ``DecodeLimits``), form 6:
``[header, meta, coding, bits, payload, names, hint]``:

- meta, int64: ``[n, then per layer: dtype code, ndim, *shape, method, fingerprint]``; method 0: the
  layer's bits are in ``bits``, 1: in ``payload``, coded with the prior whose fingerprint follows (0
  for method 0).
- coding, int64: ``[block_elems, then the bytes of each block]``: the coded layers, concatenated in
  order, are cut into blocks of ``block_elems`` elements (a multiple of 64), each coded on its own.
- bits, uint8: the method-0 layers' bits, concatenated, as ``wire.py``'s bitmap form has them.
- payload, uint8: the blocks, concatenated; a block is its rANS words, then its raw bits (the θ = 1/2
  elements' bits in order, in 16-bit words). Its first word says whether it has lanes: then it codes
  its uncertain elements in 64 more rANS states side by side (element k of each 64 on lane k: four
  SIMD vectors), whose stream, with its length, comes before the rest (the layout:
  ``csrc/common/mask_coder.h``).

A layer goes as bits when the sender has no prior for it: the first round, a θ of another shape,
values that are not probabilities (initial parameters that are scores, say). When coding would not
be smaller than the bitmap, or the compiled module is not loaded, the whole message goes in
``wire.py``'s bitmap form, which this packer reads too.

The fingerprint is a 64-bit hash of the quantized prior. The server refuses (``ValueError`` naming
the layer) a coded layer whose prior it does not hold with that fingerprint and shape: a client that
coded with another round's θ, or another layer's, is told so, never mis-decoded. That also bounds
decoding: a coded layer decodes to as many elements as the θ the server itself sent, so a short
message cannot make it allocate more than its own model (``DecodeLimits`` counts both). A corrupt
block (one that does not end exactly in the coder's initial state) is refused too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ._host import contiguous_tensor, from_numpy
from .ops import COMPILED
from .wire import (
    _DTYPE_CODES,
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_EXPANSION,
    FORM_BITMAP,
    FORM_CODED,
    FORM_PLAIN,
    TENSOR_OVERHEAD_BYTES,
    DecodeLimits,
    _check_bitmap,
    _check_numpy_sizes,
    _fail,
    _header,
    _is_mask,
    _measure_names,
    _meta,
    _meta_count,
    _read_header,
    _read_meta,
    _split_names,
    _trailer,
    expand_bits,
    pack_bits,
    unpack,
)

METHOD_BITS, METHOD_CODED = 0, 1
_MIN_BLOCK_BYTES = 10  # the word saying whether it has lanes and the two states
MIN_BLOCK_ELEMS = 2**20  # below this a block's fixed cost (about 18 bytes) outweighs its thread
_MAX_BLOCK_ELEMS = 2**62


@dataclass(frozen=True)
class Prior:
    """One layer's quantized θ as the coder reads it (``_C.mask_prior``)."""

    shape: tuple[int, ...]
    q: torch.Tensor
    words: torch.Tensor  # int64 [3, ceil(n / 64)]: the certain, expected and half bits
    fingerprint: int


def prior_of(theta: np.ndarray) -> Prior | None:
    """The prior of a float32/float64 array of probabilities; None for anything else, or when the
    compiled module is not loaded (its coder is C++ only)."""
    if COMPILED is None or not hasattr(COMPILED, "mask_prior"):
        return None
    a = np.asarray(theta)
    if a.dtype not in (np.float32, np.float64):
        return None
    ok, q, words, fingerprint = COMPILED.mask_prior(from_numpy(np.ascontiguousarray(a).reshape(-1)))
    return Prior(tuple(a.shape), q, words, fingerprint) if ok else None


def priors_of(arrays: Sequence[np.ndarray], names: Sequence[str]) -> dict[str, Prior]:
    """The priors of a θ message: every layer whose array is one."""
    out = {}
    for name, a in zip(names, arrays):
        prior = prior_of(a)
        if prior is not None:
            out[name] = prior
    return out


def block_elems_for(total: int) -> int:
    """Elements per block: a block a thread, at least ``MIN_BLOCK_ELEMS``."""
    per = -(-total // max(1, torch.get_num_threads()))
    return max(MIN_BLOCK_ELEMS, -(-per // 64) * 64)


def encode_bits(
    bits: np.ndarray,
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    dtype_code: int,
    priors: dict[str, Prior],
) -> list[np.ndarray]:
    """The coded stream of masks given as one bitmap (``bits``: every layer's bits, concatenated, as
    ``wire.pack_bits`` gives them), their names, shapes and dtype code; the bitmap form when no layer
    has a prior or coding would not be smaller."""
    numels = [math.prod(s) for s in shapes]
    offsets = np.concatenate([[0], np.cumsum(numels, dtype=np.int64)])[:-1].tolist()
    coded = [i for i, (name, shape) in enumerate(zip(names, shapes)) if name in priors and priors[name].shape == shape]
    meta_all = np.asarray([len(shapes)] + [v for s in shapes for v in (dtype_code, len(s), *s)], dtype=np.int64)
    bitmap_form = [_header(FORM_BITMAP), meta_all, bits, *_trailer(names)]
    if not coded or COMPILED is None or not hasattr(COMPILED, "mask_encode"):
        return bitmap_form
    bits_t = contiguous_tensor(bits)
    ps = [priors[names[i]] for i in coded]
    total_coded = sum(numels[i] for i in coded)
    block_elems = block_elems_for(total_coded)
    ok, sizes, payload = COMPILED.mask_encode(
        bits_t,
        [offsets[i] for i in coded],
        [p.q for p in ps],
        [p.words for p in ps],
        block_elems,
    )
    coding = np.asarray([block_elems, *sizes], dtype=np.int64)
    if not ok or payload.numel() + coding.nbytes >= -(-total_coded // 8):
        return bitmap_form
    fingerprints = dict(zip(coded, (p.fingerprint for p in ps)))
    in_bits = [i for i in range(len(shapes)) if i not in fingerprints]
    plain = COMPILED.bits_gather(bits_t, [offsets[i] for i in in_bits], [numels[i] for i in in_bits]).numpy()
    meta = [len(shapes)]
    for i, s in enumerate(shapes):
        method = METHOD_CODED if i in fingerprints else METHOD_BITS
        meta += [dtype_code, len(s), *s, method, fingerprints.get(i, 0)]
    return [
        _header(FORM_CODED),
        np.asarray(meta, dtype=np.int64),
        coding,
        plain,
        payload.numpy(),
        *_trailer(names),
    ]


def decode(
    packed: Sequence[np.ndarray], priors: dict[str, Prior], limits: DecodeLimits
) -> tuple[list[np.ndarray], list[str]]:
    """The masks and names of a coded stream, decoded with ``priors`` (``ValueError`` naming what is
    wrong: a layer coded with a prior other than the one held, a corrupt block, a malformed stream,
    or one whose decoding would allocate more than ``limits`` allow)."""
    if len(packed) != 7:
        raise _fail(f"a coded stream has 7 arrays, got {len(packed)}")
    if COMPILED is None or not hasattr(COMPILED, "mask_decode"):
        raise _fail("decoding coded masks needs layersel_ext's compiled module, which is not loaded here")
    meta, coding, bits, payload = (np.asarray(a) for a in packed[1:5])
    n = _meta_count(meta)
    limits.check(packed, n * TENSOR_OVERHEAD_BYTES, 64 * bits.nbytes, "mask arrays at most")
    need_names = _measure_names(packed[-2], packed[-1], n, "arrays")
    entries = _read_meta(meta, trailing=2)
    names = _split_names(packed[-2])
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise _fail(f"the payload must be a 1-D uint8 array, got {payload.dtype} {payload.shape}")
    if coding.dtype != np.int64 or coding.ndim != 1 or coding.size < 1:
        raise _fail(f"the coding array must be a 1-D int64 array, got {coding.dtype} {coding.shape}")
    coded, in_bits = [], []
    for i, ((dtype, shape, (method, fingerprint)), name) in enumerate(zip(entries, names)):
        if method == METHOD_BITS:
            in_bits.append(i)
            continue
        if method != METHOD_CODED:
            raise _fail(f"layer {name!r}: unknown method {method}")
        prior = priors.get(name)
        if prior is None:
            raise _fail(
                f"layer {name!r} was coded with a prior this side does not hold: the server has not sent θ "
                "for it (the client holds θ from another server or federation)"
            )
        if prior.shape != shape or prior.fingerprint != fingerprint:
            raise _fail(
                f"layer {name!r} was coded with another prior than the θ this side holds (shape {shape} vs "
                f"{prior.shape}, fingerprint {fingerprint} vs {prior.fingerprint}): the client coded with "
                "another round's or another layer's θ"
            )
        coded.append(i)
    numels = [math.prod(shape) for _, shape, _ in entries]
    _check_bitmap(bits, sum(numels[i] for i in in_bits))
    total_coded = sum(numels[i] for i in coded)
    block_elems = int(coding[0])
    if not 64 <= block_elems <= _MAX_BLOCK_ELEMS or block_elems % 64:
        raise _fail(f"block_elems must be a multiple of 64 of at least 64, got {block_elems}")
    blocks = -(-total_coded // block_elems)
    sizes = coding[1:]
    if (
        sizes.size != blocks
        or (sizes < _MIN_BLOCK_BYTES).any()
        or (sizes > payload.size).any()  # so that their sum cannot wrap
        or (sizes % 2).any()
        or int(sizes.sum()) != payload.size
    ):
        raise _fail(
            f"{total_coded} coded elements in blocks of {block_elems} need {blocks} block sizes (even, at least "
            f"{_MIN_BLOCK_BYTES}, adding up to the payload's {payload.size} bytes), got {sizes.size}"
        )
    _check_numpy_sizes(entries)
    masks = sum(numels[i] * dtype.itemsize for i, (dtype, _, _) in enumerate(entries))
    decoded_bits = 8 * -(-total_coded // 64)
    need = masks + decoded_bits + n * TENSOR_OVERHEAD_BYTES + need_names
    # The coded layers have the shapes of the θ this side sent (checked above): whatever their
    # message's size, they cost no more than the model it already holds.
    coded_need = sum(numels[i] * entries[i][0].itemsize for i in coded) + decoded_bits
    allowance = 64 * bits.nbytes + coded_need + len(coded) * TENSOR_OVERHEAD_BYTES
    limits.check(packed, need, allowance, "mask arrays (the bitmap's, and the coded layers', shaped as θ)")
    ps = [priors[names[i]] for i in coded]
    bad, decoded = COMPILED.mask_decode(
        contiguous_tensor(payload),
        sizes.tolist(),
        block_elems,
        [p.q for p in ps],
        [p.words for p in ps],
    )
    if bad >= 0:
        raise _fail(f"coded block #{bad} is corrupt: it does not decode exactly with the priors held")
    source = {}
    at = 0
    for i in coded:
        source[i] = (decoded, at)
        at += numels[i]
    at, bits_t = 0, contiguous_tensor(bits)
    for i in in_bits:
        source[i] = (bits_t, at)
        at += numels[i]
    return expand_bits(entries, [source[i] for i in range(len(entries))]), names


class CodedMaskPacker:
    """Drop-in for fl4health's ``ParameterPackerWithLayerNames`` on the FedPM flow, with masks coded
    against the θ the server sent (the module docstring).

    Args:
        side: ``"client"`` remembers the θ it last unpacked (what ``FedPmExchanger`` pulls);
            ``"server"`` the θ it last packed (what the ``FedPm`` strategy sends).
        max_decoded_bytes, max_expansion: ``wire.DecodeLimits``.
    """

    def __init__(
        self,
        side: str = "client",
        *,
        max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
        max_expansion: int = DEFAULT_MAX_EXPANSION,
    ) -> None:
        if side not in ("client", "server"):
            raise ValueError(f"side must be 'client' or 'server', got {side!r}")
        self.side = side
        self.limits = DecodeLimits(max_decoded_bytes, max_expansion)
        self.priors: dict[str, Prior] = {}

    def pack_parameters(self, model_weights: Sequence[np.ndarray], weights_names: Sequence[str]) -> list[np.ndarray]:
        if len(model_weights) != len(weights_names):
            raise ValueError(f"{len(model_weights)} arrays but {len(weights_names)} names")
        arrays = [np.asarray(a) for a in model_weights]
        if arrays and all(_is_mask(a) for a in arrays):
            dtypes = {a.dtype for a in arrays}
            bits = pack_bits(np.concatenate([a.ravel() for a in arrays]))
            if len(dtypes) == 1:
                code = _DTYPE_CODES[dtypes.pop()]
                return encode_bits(bits, weights_names, [a.shape for a in arrays], code, self.priors)
            return [_header(FORM_BITMAP), _meta(arrays), bits, *_trailer(weights_names)]
        if self.side == "server":
            self.priors = priors_of(arrays, weights_names)
        return [_header(FORM_PLAIN), *arrays, *_trailer(weights_names)]

    def unpack_parameters(self, packed_parameters: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[str]]:
        if _read_header(packed_parameters) == FORM_CODED:
            return decode(packed_parameters, self.priors, self.limits)
        arrays, names = unpack(packed_parameters, limits=self.limits)
        if self.side == "client" and _read_header(packed_parameters) == FORM_PLAIN:
            self.priors = priors_of(arrays, names)
        return arrays, names


def sample_masks_coded(
    model: nn.Module,
    packer: CodedMaskPacker,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    mask_dtype: object = np.int64,
) -> list[np.ndarray]:
    """FedPM's client message in the coded form, straight from the scores: the masks
    ``select_scores_and_sample_masks(model, None, seed=seed, generator=generator,
    mask_dtype=mask_dtype)`` gives, sampled into one bitmap (on the scores' device, whence n / 8 bytes
    come to the host) and coded with the priors ``packer`` holds."""
    from ._host import numpy_dtype
    from ._masks import mask_torch_dtype, sample_flat_masks

    np_dtype = numpy_dtype(mask_torch_dtype(mask_dtype))
    if np_dtype not in _DTYPE_CODES:
        raise TypeError(f"mask_dtype {np_dtype} has no code in the compact wire format")
    names, scores, bits = sample_flat_masks(model, seed=seed, generator=generator, dtype=torch.uint8, packed=True)
    if bits is None:  # no scores: what the packer sends for no arrays
        return packer.pack_parameters([], [])
    shapes = [tuple(s.shape) for s in scores]
    return encode_bits(bits.cpu().numpy(), names, shapes, _DTYPE_CODES[np_dtype], packer.priors)
