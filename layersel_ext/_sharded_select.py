"""The k-th largest score and the COO extraction of sharded state, without moving any score.

The k-th largest: a radix select over the order-preserving keys of the local scores (``_keys``; every
element counted once: entries held in full by mesh rank 0 only) whose digit histograms are
all-reduced, one digit a collective. Then each rank extracts its local entries with global indices
(``ShardedState.offset``), and one all-gather of the per-entry counts and one of the values and flat
indices (``_collectives.all_gather_packed``) give every rank the unsharded arrays.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from . import _keys, ops
from ._checks import check_rank, explain_failure
from ._collectives import all_gather_packed
from ._score_kinds import ScoreKind, uses_initial
from ._shard_layout import ShardedState, empty_like

_FIRST_DIGIT_BITS = 16  # 65,536 bins (256 KB of int32 counts): sign, exponent, 7 bits of a float32
_DIGIT_BITS = 8  # the later digits, over the few candidate keys left: 1 KB a digit
_CHUNK = 1 << 20  # keys made 1M scores at a time (bounded temporaries)
_MAX_CANDIDATES = 1 << 22  # candidate keys kept after the first digit (16 or 32 MB); more: passes recompute


def _digit_widths(nbits: int) -> tuple[int, ...]:
    return (_FIRST_DIGIT_BITS,) + (_DIGIT_BITS,) * ((nbits - _FIRST_DIGIT_BITS) // _DIGIT_BITS)


class _LocalKeys:
    """This rank's keys for ``_keys.radix_select``, made from the scores of ``_CHUNK`` elements at a
    time (scores are never materialised whole). The first pass also keeps each score's first digit
    (int16, 2 bytes a score), so that later passes key only the scores under the chosen first digit;
    those keys are kept (when they fit) and only they are read by the passes after."""

    def __init__(
        self, xs: Sequence[Tensor], ys: Sequence[Tensor] | None, kind: int, key_dtype: torch.dtype, nbits: int
    ) -> None:
        self.kind, self.key_dtype, self.nbits = kind, key_dtype, nbits
        self.chunks = [
            (x.reshape(-1)[lo : lo + _CHUNK], None if ys is None else ys[i].reshape(-1)[lo : lo + _CHUNK])
            for i, x in enumerate(xs)
            for lo in range(0, x.numel(), _CHUNK)
        ]
        self.first: list[Tensor] = []  # per chunk, the top _FIRST_DIGIT_BITS of each key
        self.kept: Tensor | None = None

    def _scores(self, chunk: tuple[Tensor, Tensor | None]) -> Tensor:
        x, y = chunk
        if self.kind == ScoreKind.GIVEN:
            return y  # type: ignore[return-value]
        return ops.scores([x], None if y is None else [y], self.kind)[0]

    def __call__(self, prefix: int, consumed: int) -> Iterator[Tensor]:
        if self.kept is not None:
            self.kept = _keys.keys_matching(self.kept, prefix, consumed, self.nbits)
            yield self.kept
            return
        if consumed == 0:
            for chunk in self.chunks:
                keys = _keys.signed_keys(self._scores(chunk).to(self.key_dtype))
                if self.nbits > _FIRST_DIGIT_BITS:
                    self.first.append((keys >> (self.nbits - _FIRST_DIGIT_BITS)).to(torch.int16))
                yield keys
            return
        first_digit = prefix >> (consumed - _FIRST_DIGIT_BITS)
        found: list[Tensor] | None = []
        size = 0
        for chunk, first in zip(self.chunks, self.first):
            keys = _keys.signed_keys(self._scores(chunk)[first == first_digit].to(self.key_dtype))
            keys = _keys.keys_matching(keys, prefix, consumed, self.nbits)
            if found is not None:
                size += keys.numel()
                if size <= _MAX_CANDIDATES:
                    found.append(keys)
                else:
                    found = None
            yield keys
        if found is not None:
            self.first = []
            self.kept = torch.cat(found) if found else torch.empty(0, dtype=_keys.key_dtype(self.key_dtype))


def kth_largest_score(state: ShardedState, kind: int, k: int, score_dtype: torch.dtype) -> Tensor:
    """``ops.kth_largest_score`` of the unsharded tensors, on every rank, without moving any score:
    a radix select over the order-preserving keys of the local scores (each element counted once),
    each digit's histogram all-reduced (``_digit_widths``: 256 KB, then 1 KB a digit)."""
    import torch.distributed as dist

    check_rank("kth_largest_score", k, sum(x.numel() for x in state.xs))  # every rank, before any collective
    xs = state.counted(state.local_x)
    ys = state.counted(state.local_y) if state.local_y is not None else None
    if kind != ScoreKind.GIVEN:  # the kernel's checks of every entry, on every rank (none may skip a collective)
        try:
            ops.scores([empty_like(x) for x in xs], None if ys is None else [empty_like(y) for y in ys], kind)
        except (RuntimeError, ValueError, TypeError) as exc:
            explain_failure(exc, state.names, xs, ys, state.what)
    key_dtype = score_dtype if score_dtype.is_floating_point else torch.int64
    nbits = _keys.key_bits(key_dtype)
    total = sum(x.numel() for x in state.xs)
    count_dtype = torch.int32 if total < 2**31 else torch.int64

    def all_reduce(counts: Tensor) -> Tensor:
        counts = counts.to(device=state.mesh.device, dtype=count_dtype)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=state.mesh.group)
        return counts.to(torch.int64)

    keys = _LocalKeys(xs, ys, kind, key_dtype, nbits)
    key = _keys.radix_select(keys, k, nbits, _digit_widths(nbits), all_reduce)
    return _keys.key_to_value(key, key_dtype).to(score_dtype)


def sparse_extract(
    state: ShardedState, kind: int, thresholds: Sequence[float | int]
) -> tuple[list[Tensor], list[Tensor]]:
    """``ops.sparse_extract`` of the unsharded tensors, on every rank: each rank extracts from its local
    shards (entries held in full: mesh rank 0 only), shifts the indices by its shard's offset and
    flattens them (row-major, global shape); ONE all-gather of the per-entry counts, ONE of the
    values and flat indices; pieces sharded along a dimension other than 0 are put back in row-major
    order. A 0-d entry (held in full) gives mesh rank 0's answer, with ``(n, 0)`` indices as the op's
    (the COO exchanger drops it)."""
    import torch.distributed as dist

    xs = state.counted(state.local_x)
    ys = state.counted(state.local_y) if state.local_y is not None else None
    try:
        values, indices = ops.sparse_extract(xs, ys, kind, thresholds)
    except (RuntimeError, ValueError, TypeError) as exc:
        explain_failure(exc, state.names, xs, ys if uses_initial(kind) else None, state.what)
    flat = []
    for i, (x, idx) in enumerate(zip(state.xs, indices)):
        if x.dim() == 0:  # its one element, if kept, is flat index 0
            flat.append(idx.new_zeros(values[i].numel()))
            continue
        shape, dim = list(x.shape), state.dims[i]
        strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))] or [1]  # row-major, global shape
        if dim is not None:
            idx = idx.clone()
            idx[:, dim] += state.offset(i)
        flat.append((idx * torch.tensor(strides, dtype=torch.int64, device=idx.device)).sum(1))
    counts = torch.tensor([v.numel() for v in values], dtype=torch.int64, device=state.mesh.device)
    every = [torch.empty_like(counts) for _ in range(state.mesh.world)]
    dist.all_gather(every, counts, group=state.mesh.group)
    per_rank = [[n for n in row.tolist() for _ in (0, 1)] for row in every]  # values, flat indices per entry
    pieces = all_gather_packed(
        state.mesh, per_rank, [t for pair in zip(values, flat) for t in pair],
        [dt for x in state.xs for dt in (x.dtype, torch.int64)],
    )  # fmt: skip
    out_values, out_indices = [], []
    for i, x in enumerate(state.xs):
        vals, where = torch.cat(pieces[2 * i]), torch.cat(pieces[2 * i + 1])
        if state.dims[i] not in (None, 0):  # each rank's piece is a block of columns: interleave
            order = torch.argsort(where)
            vals, where = vals[order], where[order]
        out_values.append(vals)
        if x.dim() == 0:
            out_indices.append(where.new_zeros((where.numel(), 0)))
        else:
            out_indices.append(torch.stack(torch.unravel_index(where, tuple(x.shape)), dim=1))
    return out_values, out_indices
