"""Order-preserving integer keys of score values and the radix select over them.

Pure tensor math, the same on every backend and device: the torch twin of ``kth_largest_score``
(``_torch_ops``) and the distributed radix select of sharded state (``_sharded_select``, whose digit
histograms are all-reduced) both select the k-th largest score through these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

_KEY_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}  # fmt: skip


def signed_keys(v: Tensor) -> Tensor:
    """Keys ordered as torch.sort orders the values (every NaN first when descending): signed integers
    of the values' width (int16 / int32 / int64; integer values: int64), a few elementwise ops."""
    if not v.is_floating_point():
        return v.to(torch.int64)
    bits = v.view(_KEY_VIEW[v.dtype])
    magnitude = (1 << (v.element_size() * 8 - 1)) - 1
    keys = bits ^ ((bits >> (v.element_size() * 8 - 1)) & magnitude)  # negative values: magnitude bits flipped
    return keys.masked_fill_(torch.isnan(v), magnitude)


def key_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``signed_keys`` gives for values of ``dtype``."""
    return _KEY_VIEW[dtype] if dtype.is_floating_point else torch.int64


def key_to_value(key: int, dtype: torch.dtype) -> Tensor:
    if not dtype.is_floating_point:
        return torch.tensor(key, dtype=dtype)
    nbits = torch.finfo(dtype).bits
    bits = key ^ ((1 << (nbits - 1)) - 1) if key < 0 else key
    return torch.tensor(bits, dtype=_KEY_VIEW[dtype]).view(dtype)


def key_bits(dtype: torch.dtype) -> int:
    """Width of the order-preserving keys of ``dtype`` (``signed_keys``): its bits; integers select as int64."""
    return torch.finfo(dtype).bits if dtype.is_floating_point else 64


def keys_matching(keys: Tensor, prefix: int, consumed: int, nbits: int) -> Tensor:
    """The keys whose top ``consumed`` bits (of ``nbits``, read as a signed number) equal ``prefix``."""
    return keys if consumed == 0 else keys[(keys >> (nbits - consumed)) == prefix]


def radix_select(
    keys: Callable[[int, int], Iterable[Tensor]],
    k: int,
    nbits: int,
    widths: Sequence[int],
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> int:
    """The k-th largest (1-based) of a multiset of signed ``nbits``-bit keys, a digit per pass.

    ``keys(prefix, consumed)`` yields the keys whose top ``consumed`` bits equal ``prefix``
    (``keys_matching``); pass p histograms their next ``widths[p]`` bits; ``reduce`` (an all-reduce
    for sharded keys) turns the local histogram into the global one. Returns the k-th largest key.
    """
    prefix, consumed, remaining = 0, 0, k
    for p, width in enumerate(widths):
        shift = nbits - consumed - width
        counts: Tensor | None = None
        for chunk in keys(prefix, consumed):
            high = (chunk >> shift).to(torch.int32) if chunk.element_size() < 4 else chunk >> shift
            # The first digit carries the sign: offset so that it orders as an unsigned bin.
            digits = high + (1 << (width - 1)) if p == 0 else high & ((1 << width) - 1)
            part = torch.bincount(digits, minlength=1 << width)
            counts = part if counts is None else counts + part
        if counts is None:
            counts = torch.zeros(1 << width, dtype=torch.int64)
        if reduce is not None:
            counts = reduce(counts)
        above = counts.cpu().flip(0).cumsum(0)  # counts from the largest digit down
        idx = int(torch.searchsorted(above, torch.tensor(remaining)))
        digit = (1 << width) - 1 - idx
        remaining -= int(above[idx - 1]) if idx > 0 else 0
        prefix = digit - (1 << (width - 1)) if p == 0 else (prefix << width) | digit
        consumed += width
    return prefix
