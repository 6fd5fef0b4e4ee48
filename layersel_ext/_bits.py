"""Backend-independent bit math of the masks: the keyed-by-scores Philox key and the bitmap packing.

Neither is a twin of an op, so neither depends on which backend runs: ``key_from_scores`` is
csrc/common/fingerprint.h's key derivation in Python integers (the torch twin of ``sample_masks``
uses it, and the sharded sampler, which all-reduces the fingerprint and derives the key itself);
``pack_bits`` turns 0/1 masks into the compact wire format's bitmap (``ops.sample_mask_bits`` on the
torch backend, the sharded path, the public mask sampler).
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def key_from_scores(seed: int, fingerprint: int, total_numel: int) -> int:
    """The Philox key of csrc/common/fingerprint.h's key_from_scores."""
    return _mix64((seed & _MASK64) ^ _mix64(fingerprint + _mix64(total_numel)))


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
