"""FedPM masks and score fingerprints of sharded state, the unsharded model's on every rank.

Each rank samples its own pieces, every element keyed by its index in the unsharded model (the
kernel's ``counters``, laid out by ``_StreamLayout``), so the masks are the unsharded model's; an
unseeded key takes mesh rank 0's draw and the fingerprints of all pieces (one all-reduce); one
all-gather of the mask bytes (never the scores, ``_collectives.gather_full``) gives every rank the
full masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import ops
from ._bits import key_from_scores
from ._checks import explain_failure
from ._collectives import gather_full
from ._shard_layout import ShardedState, meta_like


def _stream_pieces(local: Tensor, shape: Sequence[int], dim: int | None, offset: int, base: int):
    """(piece, first stream index) pairs covering this rank's ``local`` part of an entry whose elements
    take stream indices ``base`` .. in the unsharded model (row-major): the whole tensor when held in
    full, one piece for a shard whose elements are consecutive there (dim 0, or leading dims of size
    1), else one piece per index of the dimensions before ``dim``."""
    if dim is None:
        return [(local.reshape(-1), base)]
    if local.numel() == 0:
        return []
    inner = math.prod(shape[dim + 1 :])
    outer = math.prod(shape[:dim])
    start = base + offset * inner
    if outer == 1 or local.shape[dim] == shape[dim]:  # consecutive in the unsharded tensor: one run
        return [(local.reshape(-1), start)]
    rows = local.reshape(outer, -1)
    stride = shape[dim] * inner
    return [(rows[o], start + o * stride) for o in range(outer)]


class _StreamLayout:
    """The pieces of sharded score state that this rank samples, each with its first stream index in
    the unsharded model (``ops.sample_masks``' ``counters``), in entry order; ``counted`` marks the
    pieces that enter this rank's fingerprint (entries held in full: mesh rank 0 only)."""

    def __init__(self, state: ShardedState) -> None:
        self.state = state
        self.pieces: list[Tensor] = []
        self.counters: list[int] = []
        self.counted: list[bool] = []
        self.per_entry: list[int] = []  # each entry's number of elements in `pieces`
        self.total = 0  # elements of the unsharded model
        for i, (x, local, dim) in enumerate(zip(state.xs, state.local_x, state.dims)):
            if state.plain[i] and state.mesh.rank != 0:  # mesh rank 0's plain entries: sampled there only
                local = local.reshape(-1)[:0]
            found = _stream_pieces(local, x.shape, dim, state.offset(i), self.total)
            self.pieces += [p for p, _ in found]
            self.counters += [c for _, c in found]
            self.counted += [dim is not None or state.mesh.rank == 0] * len(found)
            self.per_entry.append(sum(p.numel() for p, _ in found))
            self.total += x.numel()

    def seed_and_fingerprint(self, seed: int) -> tuple[int, int]:
        """(mesh rank 0's ``seed``, the unsharded model's fingerprint), on every rank: this rank's
        fingerprint of its counted pieces and rank 0's seed, as four 32-bit halves in ONE int64 SUM
        all-reduce (the sums of the halves cannot overflow; the fingerprint is a sum mod 2**64), the
        one that also carries the ranks' agreement check (``ShardedState.agree``)."""
        mesh = self.state.mesh
        keep = [(p, c) for p, c, counted in zip(self.pieces, self.counters, self.counted) if counted]
        if keep:
            fp = ops.score_fingerprint([p for p, _ in keep], [c for _, c in keep]).to(mesh.device)
        else:
            fp = torch.zeros(1, dtype=torch.int64, device=mesh.device)
        mine = seed if mesh.rank == 0 else 0
        halves = torch.cat([torch.tensor([mine & 0xFFFFFFFF, mine >> 32], dtype=torch.int64, device=mesh.device),
                            fp & 0xFFFFFFFF, (fp >> 32) & 0xFFFFFFFF])  # fmt: skip
        halves = self.state.agree(extra=halves)
        s_lo, s_hi, f_lo, f_hi = (int(v) for v in halves.cpu())  # type: ignore[union-attr]
        return s_lo + (s_hi << 32), (f_lo + (f_hi << 32)) & ((1 << 64) - 1)


def sample_masks(
    names: list[str],
    scores: list[Tensor],
    seed: int,
    key_by_scores: bool,
    what: str,
    arguments: Sequence[tuple[str, object]] = (),
) -> Tensor:
    """The unsharded model's flat uint8 masks (``ops.sample_masks`` of the full scores, keyed as it
    would be), on every rank. Each rank samples only its own pieces, each element with its index in
    the unsharded model as its Philox counter (``_StreamLayout``); Replicate entries are sampled by
    every rank (the same bits everywhere), plain entries by mesh rank 0 only (they may differ across
    ranks). With ``key_by_scores`` the key is ``key_from_scores(mesh rank 0's seed, the unsharded
    fingerprint, the unsharded size)`` (one all-reduce, which also carries the ranks' agreement
    check; without it, that check is one all-reduce of its own). Then ONE all-gather of the sharded
    and plain entries' mask bytes (a quarter of float32 scores' bytes) rebuilds them at full size."""
    # The seed is part of the call only when it is the key: a key by scores takes mesh rank 0's draw.
    own = [("key_by_scores", key_by_scores)] + ([] if key_by_scores else [("seed", seed)])
    state = ShardedState(names, scores, None, what, layout="model", arguments=[*own, *arguments], agree="later")
    _check_floating(state)
    layout = _StreamLayout(state)
    key = seed
    if key_by_scores:
        key = key_from_scores(*layout.seed_and_fingerprint(seed), layout.total)
    else:
        state.agree()
    device = state.local_x[0].device
    try:
        flat = (ops.sample_masks(layout.pieces, key, torch.uint8, counters=layout.counters) if layout.pieces
                else torch.empty(0, dtype=torch.uint8, device=device))  # fmt: skip
    except (RuntimeError, ValueError, TypeError) as exc:
        explain_failure(exc, names, state.local_x, None, what)
    local_masks, at = [], 0
    for local, n in zip(state.local_x, layout.per_entry):
        local_masks.append(flat[at : at + n].view(local.shape if n == local.numel() else (n,)))
        at += n
    carriers = [meta_like(x, torch.uint8) for x in state.xs]
    full = gather_full(state.mesh, names, carriers, local_masks, state.dims, state.plain)
    return torch.cat([m.reshape(-1) for m in full])  # gather_full: every piece on the local device


def score_fingerprint(names: list[str], scores: list[Tensor], what: str) -> Tensor:
    """``ops.score_fingerprint`` of the unsharded scores (int64[1], on every rank): one all-reduce."""
    state = ShardedState(names, scores, None, what, layout="model", agree="later")
    _check_floating(state)
    layout = _StreamLayout(state)
    _, fp = layout.seed_and_fingerprint(0)  # with the ranks' agreement check
    return torch.tensor(
        [fp - (1 << 64) if fp >= 1 << 63 else fp], dtype=torch.int64, device=layout.state.local_x[0].device
    )


def _check_floating(state: ShardedState) -> None:
    """Every score entry floating, checked on the global entries before any collective: a rank whose
    own piece of a bad entry is empty must not go on alone (and a rank whose dtypes differ from its
    peers' must not leave them waiting: the failure is agreed, so every rank raises)."""
    for name, x in zip(state.names, state.xs):
        if not x.dtype.is_floating_point:
            exc = TypeError(f"{state.what}: layer {name!r}: score dtype {x.dtype} is not floating point")
            state.agree(local_error=exc)
            raise exc
