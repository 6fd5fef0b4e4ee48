"""Pure-torch implementation of every ``torch.ops.layersel`` op.

The fallback when no compiled kernel is available, and the oracle in tests: each function has
the op's exact signature and output. ``sample_masks`` reproduces the compiled kernels' bits
(the same Philox4x32-10 stream and the same float32 operation sequence as
``csrc/common/bernoulli.h``), on CPU and CUDA tensors alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from . import _checks
from ._bits import key_from_scores
from ._keys import key_bits, key_to_value, keys_matching, radix_select, signed_keys
from ._score_kinds import NUM_FORMULAS, ScoreKind, uses_initial

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def drift_sq_norms(model: Sequence[Tensor], initial: Sequence[Tensor]) -> Tensor:
    """Per-tensor sum of ``float(model - initial)**2``, float64 [n]: the difference in the tensors' dtype,
    each square in float32 (as fl4health's float32 norm squares), the squares summed in float64
    (``drift_square`` in csrc/common/scores.h); a one-element tensor's exact square in float64."""
    _checks.check_tensors("drift_sq_norms", model, initial)
    device = model[0].device if len(model) else torch.device("cpu")
    sums = []
    for a, b in zip(model, initial):
        d = (a - b).float().reshape(-1)
        if d.numel() == 1:  # one element: the exact square (its root is |d|, as torch's norm of one element)
            sums.append(torch.sum(d.double() * d.double()))
        else:
            sums.append(torch.sum(d * d, dtype=torch.float64))
    if not sums:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.stack(sums)


# The "smallest" formulas: the negation of the "largest" one before them.
_NEGATED_KINDS = (
    ScoreKind.SMALLEST_FINAL_MAGNITUDE,
    ScoreKind.SMALLEST_MAGNITUDE_CHANGE,
    ScoreKind.SMALLEST_INCREASE_IN_MAGNITUDE,
)


def score_into(kind: int, x: Tensor, y: Tensor | None, out: Tensor) -> None:
    """Write fl4health's score formula ``kind`` of (x, y) into ``out`` (same shape and dtype)."""
    if kind in (ScoreKind.LARGEST_FINAL_MAGNITUDE, ScoreKind.SMALLEST_FINAL_MAGNITUDE):
        torch.abs(x, out=out)
    elif kind in (ScoreKind.LARGEST_MAGNITUDE_CHANGE, ScoreKind.SMALLEST_MAGNITUDE_CHANGE):
        assert y is not None
        torch.sub(x, y, out=out)
        out.abs_()
    else:
        assert y is not None
        torch.abs(x, out=out)
        out.sub_(torch.abs(y))
    if kind in _NEGATED_KINDS:
        out.neg_()


def _group_dtypes(tensors: Sequence[Tensor]) -> list[torch.dtype]:
    return list(dict.fromkeys(t.dtype for t in tensors))


def scores(model: Sequence[Tensor], initial: Sequence[Tensor], kind: int) -> list[Tensor]:
    """Score formula ``kind`` for every tensor; one flat buffer per dtype, in order of first appearance."""
    _checks.check_formula_kind("scores", kind, NUM_FORMULAS)
    needs_y = uses_initial(kind)
    _checks.check_tensors("scores", model, initial if needs_y else None)
    device = model[0].device if len(model) else torch.device("cpu")
    dtypes = _group_dtypes(model)
    sizes = {dt: sum(t.numel() for t in model if t.dtype == dt) for dt in dtypes}
    buffers = {dt: torch.empty(sizes[dt], dtype=dt, device=device) for dt in dtypes}
    fill = dict.fromkeys(dtypes, 0)
    for i, x in enumerate(model):
        out = buffers[x.dtype][fill[x.dtype] : fill[x.dtype] + x.numel()].view(x.shape)
        fill[x.dtype] += x.numel()
        score_into(kind, x, initial[i] if needs_y else None, out)
    return [buffers[dt] for dt in dtypes]


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    p = b * a  # < 2**64: wraps in int64, the bits are right
    return (p >> 32) & _MASK32, p & _MASK32


def philox4x32_10(counter: Tensor, key: tuple[int, int]) -> Tensor:
    """Philox4x32-10 of int64 counters [..., 4] (each < 2**32) under ``key``; returns [..., 4] words."""
    c0, c1, c2, c3 = (counter[..., i].clone() for i in range(4))
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def _philox_words(seed: int, start: int, count: int, device: torch.device) -> Tensor:
    """The 32-bit words for global element indices [start, start + count) (int64 tensor)."""
    g = torch.arange(start, start + count, dtype=torch.int64, device=device)
    blocks = g >> 2
    counter = torch.stack([blocks & _MASK32, blocks >> 32, torch.zeros_like(g), torch.zeros_like(g)], dim=-1)
    words = philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32))
    return words.gather(-1, (g & 3).unsqueeze(-1)).squeeze(-1)


def _round_half_even(x: Tensor) -> Tensor:
    magic = 12582912.0  # 1.5 * 2**23: exact for |x| < 2**22, as csrc/common/bernoulli.h
    return (x + magic) - magic


def _portable_exp(x: Tensor) -> Tensor:
    k = _round_half_even(x * 1.44269504)
    r = (x - k * 0.693359375) - k * -2.12194440e-4
    p = torch.full_like(r, 1.0 / 5040.0)
    for c in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * r + c
    scale = ((k.to(torch.int32) + 127) << 23).view(torch.float32)
    return p * scale


def bernoulli_probability(score: Tensor) -> Tensor:
    """sigmoid(score) with exactly the compiled kernels' float32 operations (NaN: ~1.6e-38, never sampled)."""
    s = score.to(torch.float32)
    x = torch.where(torch.isnan(s), torch.full_like(s, 87.0), -s)
    x = torch.clamp(x, -87.0, 87.0)
    return 1.0 / (1.0 + _portable_exp(x))


def word_to_uniform(words: Tensor) -> Tensor:
    return (((words >> 9) << 1) | 1).to(torch.float32) * (1.0 / 16777216.0)


_MASK64 = (1 << 64) - 1
_FP_LANES = 64
_BITS_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def _fingerprint_weights(device: torch.device) -> tuple[Tensor, Tensor]:
    lanes = torch.arange(_FP_LANES, dtype=torch.int64, device=device)
    lo = (((lanes * 0x9E3779B9) & _MASK32) ^ 0x85EBCA6B) | 1
    hi = (((lanes * 0xC2B2AE35) & _MASK32) ^ 0x27D4EB2F) | 1
    return lo, hi


def _stream_bases(scores: Sequence[Tensor], counters: Sequence[int] | None, op: str) -> list[int]:
    """Each tensor's first stream index: its place in the concatenation, or ``counters[i]``."""
    if counters is None:
        bases, base = [], 0
        for s in scores:
            bases.append(base)
            base += s.numel()
        return bases
    if len(counters) != len(scores):
        raise ValueError(f"layersel::{op}: got {len(counters)} counters for {len(scores)} tensors")
    for i, (c, s) in enumerate(zip(counters, scores)):
        if not 0 <= c <= 2**62 - s.numel():
            raise ValueError(f"layersel::{op}: counter #{i} is {c} (expected 0 <= counter and counter + numel <= 2^62)")
    return [int(c) for c in counters]


def score_fingerprint(scores: Sequence[Tensor], counters: Sequence[int] | None = None) -> int:
    """The 64-bit fingerprint of csrc/common/fingerprint.h: sum over elements g of the concatenation of
    (lo32(bits) * W_lo[g % 64] + hi32(bits) * W_hi[g % 64]) * (2 * (g // 64) + 1), mod 2**64
    (with ``counters``, tensor i's element j is g = counters[i] + j).
    int64 tensor arithmetic wraps mod 2**64, which is what the definition asks for."""
    _checks.check_tensors("score_fingerprint", scores, None)
    _checks.check_floating_scores(scores, "score_fingerprint")
    total = 0
    step = 1 << 20  # bounded temporaries
    for s, base in zip(scores, _stream_bases(scores, counters, "score_fingerprint")):
        flat = s.detach().reshape(-1)
        size = flat.element_size()
        w_lo, w_hi = _fingerprint_weights(flat.device)
        for lo_i in range(0, flat.numel(), step):
            part = flat[lo_i : lo_i + step].view(_BITS_VIEW[size]).to(torch.int64)
            g = torch.arange(base + lo_i, base + lo_i + part.numel(), dtype=torch.int64, device=flat.device)
            lane = g & (_FP_LANES - 1)
            if size == 8:
                term = (part & _MASK32) * w_lo[lane] + ((part >> 32) & _MASK32) * w_hi[lane]
            else:
                term = (part & ((1 << (8 * size)) - 1)) * w_lo[lane]
            total += int((term * (2 * (g >> 6) + 1)).sum())
    return total & _MASK64


def sample_masks(
    scores: Sequence[Tensor],
    seed: int,
    dtype: torch.dtype,
    key_by_scores: bool = False,
    counters: Sequence[int] | None = None,
) -> Tensor:
    """Bernoulli(sigmoid(score)) masks of all tensors, flat, in ``dtype``; bit-equal to the compiled kernels."""
    _checks.check_mask_dtype(dtype)
    _checks.check_tensors("sample_masks", scores, None)
    _checks.check_floating_scores(scores)
    device = scores[0].device if len(scores) else torch.device("cpu")
    total = sum(s.numel() for s in scores)
    bases = _stream_bases(scores, counters, "sample_masks")
    if key_by_scores:
        seed = key_from_scores(seed, score_fingerprint(scores, counters), total)
    out = torch.empty(total, dtype=dtype, device=device)
    step = 1 << 20  # bounded temporaries
    at = 0  # place in the output
    for s, base in zip(scores, bases):
        s = s.reshape(-1)
        for lo in range(0, s.numel(), step):
            part = s[lo : lo + step]
            u = word_to_uniform(_philox_words(seed, base + lo, part.numel(), device))
            out[at + lo : at + lo + part.numel()] = (u < bernoulli_probability(part)).to(dtype)
        at += s.numel()
    return out


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_bits(flat01: Tensor) -> Tensor:
    """0/1 values (one dimension, any device) as a little-endian bitmap, uint8[ceil(n / 8)]: element
    i at bit i % 8 of byte i // 8, as ``numpy.packbits(..., bitorder="little")``."""
    n = flat01.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=flat01.device)
    padded[:n] = flat01
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat01.device)
    # Each row's eight terms are distinct powers of two, so the uint8 sum is exact (no carries).
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


# ----------------------------------------------------------------------------- sparse selection


def _check_inputs(model: Sequence[Tensor], initial: Sequence[Tensor], kind: int, op: str) -> None:
    """The kernels' table checks (a meta-device initial tensor must not pass as zeros); given scores
    (ScoreKind.GIVEN) may have another dtype than their tensor, bool too."""
    needs_y = uses_initial(kind)
    _checks.check_tensors(op, model, initial if needs_y else None, given=kind == ScoreKind.GIVEN)


def sparse_score(kind: int, x: Tensor, y: Tensor | None) -> Tensor:
    if kind == ScoreKind.GIVEN:
        assert y is not None
        return y
    out = torch.empty_like(x)
    score_into(kind, x, y, out)
    return out


def kth_largest_score(
    model: Sequence[Tensor], initial: Sequence[Tensor], kind: int, k: int, score_dtype: torch.dtype
) -> Tensor:
    """The k-th largest score (1-based) over all tensors, as torch.cat(...).sort(descending=True)[k - 1].

    Radix select on order-preserving keys, 16 bits a pass, one tensor at a time (bounded memory).
    """
    if not score_dtype.is_floating_point and score_dtype != torch.int64:
        # 8/16/32-bit integer scores: the same k-th largest value among the int64 values.
        return kth_largest_score(model, initial, kind, k, torch.int64).to(score_dtype)
    _check_inputs(model, initial, kind, "kth_largest_score")
    _checks.check_rank("kth_largest_score", k, sum(t.numel() for t in model))
    nbits = key_bits(score_dtype)

    def keys(prefix: int, consumed: int) -> Iterator[Tensor]:
        for i, x in enumerate(model):
            s = sparse_score(kind, x, initial[i] if uses_initial(kind) else None)
            yield keys_matching(signed_keys(s.reshape(-1).to(score_dtype)), prefix, consumed, nbits)

    return key_to_value(radix_select(keys, k, nbits, (16,) * (nbits // 16)), score_dtype)


def sparse_extract(
    model: Sequence[Tensor], initial: Sequence[Tensor], kind: int, thresholds: Sequence[float | int]
) -> tuple[list[Tensor], list[Tensor]]:
    """Per tensor: non-zero model values whose score passes its threshold, and their row-major indices."""
    _check_inputs(model, initial, kind, "sparse_extract")
    values, indices = [], []
    for i, x in enumerate(model):
        s = sparse_score(kind, x, initial[i] if uses_initial(kind) else None)
        if not s.is_floating_point() and not isinstance(thresholds[i], int):
            s = s.to(torch.float32)  # torch compares an integer tensor with a float scalar in float32
        keep = (s >= thresholds[i]) & (x != 0)
        values.append(x[keep].reshape(-1))
        indices.append(torch.nonzero(keep).reshape(int(keep.sum()), x.dim()))
    return values, indices
