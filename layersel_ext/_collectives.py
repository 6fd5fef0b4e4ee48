"""The all-gathers of the sharded paths: every rank's pieces of many tensors in ONE collective.

``all_gather_packed`` packs this rank's pieces (any dtypes) into its aligned slot of one byte
buffer, which is the input of one ``all_gather_single``; every rank knows every rank's piece sizes,
so nothing but the bytes travels. ``gather_full`` rebuilds full-size tensors of sharded entries from
their ``torch.chunk`` pieces that way (the layers a drift selection keeps, the scores and masks the
DTensor handlers return); the COO extraction (``_sharded_select``) gathers its values and indices
with it too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._shard_layout import Mesh, ShardedState, piece_shape

_ALIGN = 64  # bytes: each packed piece starts aligned for any dtype view


def all_gather_packed(
    mesh: Mesh, counts: Sequence[Sequence[int]], local: Sequence[Tensor], dtypes: Sequence[torch.dtype]
) -> list[list[Tensor]]:
    """ONE in-place ``all_gather_single`` (``all_gather_into_tensor``) of every rank's pieces: ``counts[r][k]`` elements of
    ``dtypes[k]`` in rank r's piece k (every rank knows every rank's counts). One buffer of world
    slots, each the largest rank's total; each rank packs its pieces' bytes, each 64-byte aligned,
    into its own slot, which is the collective's input (no separate send buffer: the only memory
    beyond the pieces is this buffer, the gathered bytes plus padding). Returns ``out[k][r]``: rank
    r's piece k, flat, a view of that buffer."""
    import torch.distributed as dist

    if mesh.world == 1:  # a one-rank mesh: its pieces are all there is (no buffer, no collective)
        return [[piece.reshape(-1)] for piece in local]
    sizes = [torch.empty(0, dtype=dt).element_size() for dt in dtypes]
    offsets = [[0] * len(dtypes) for _ in range(mesh.world)]
    totals = [0] * mesh.world
    for r in range(mesh.world):
        for k, size in enumerate(sizes):
            offsets[r][k] = totals[r]
            totals[r] += -(-counts[r][k] * size // _ALIGN) * _ALIGN
    slot = max(max(totals), _ALIGN)
    buffer = torch.empty(mesh.world * slot, dtype=torch.uint8, device=mesh.device)
    mine = buffer[mesh.rank * slot : (mesh.rank + 1) * slot]
    mine.zero_()  # the padding too: no uninitialised byte travels
    with torch.no_grad():
        for k, piece in enumerate(local):
            o = offsets[mesh.rank][k]
            if piece.numel():
                mine[o : o + piece.numel() * sizes[k]].view(dtypes[k]).copy_(piece.reshape(-1))
    # all_gather_single where torch has it (2.14 deprecates all_gather_into_tensor, same collective).
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_single(buffer, mine, group=mesh.group)
    return [
        [buffer[r * slot + offsets[r][k] : r * slot + offsets[r][k] + counts[r][k] * size].view(dtypes[k])
         for r in range(mesh.world)]
        for k, size in enumerate(sizes)
    ]  # fmt: skip


def gather_full(
    mesh: Mesh,
    names: Sequence[str],
    tensors: Sequence[Tensor],
    locals_: Sequence[Tensor],
    dims: Sequence[int | None],
    from_rank0: Sequence[bool] | None = None,
) -> list[Tensor]:
    """Rebuild the full tensors of sharded entries from every rank's piece with ONE ``all_gather``
    (``all_gather_packed``; every rank computes every rank's piece sizes from the global shapes);
    entries held in full (dim None) are returned as they are, except those marked in ``from_rank0``
    (plain entries, which may differ across ranks): mesh rank 0's copy, which it alone sends in the
    same all-gather.
    """
    if mesh.world == 1:  # one rank: every local piece is the whole tensor (no buffer, no collective)
        return list(locals_)
    first = list(from_rank0) if from_rank0 is not None else [False] * len(dims)
    out: list[Tensor | None] = [loc if dim is None and not f else None for loc, dim, f in zip(locals_, dims, first)]
    moved = [j for j, dim in enumerate(dims) if dim is not None or first[j]]
    if not moved:
        return out  # type: ignore[return-value]

    def shape(j: int, r: int) -> list[int]:
        dim = dims[j]
        if dim is None:  # rank 0's whole tensor; nothing from the others
            return list(tensors[j].shape) if r == 0 else [0]
        return piece_shape(tensors[j].shape, dim, mesh.world, r)

    shapes = [[shape(j, r) for j in moved] for r in range(mesh.world)]
    local = [locals_[j] if dims[j] is not None or mesh.rank == 0 else locals_[j].reshape(-1)[:0] for j in moved]
    pieces = all_gather_packed(
        mesh, [[math.prod(s) for s in row] for row in shapes], local, [tensors[j].dtype for j in moved]
    )
    for k, j in enumerate(moved):
        rebuilt = [piece.view(shapes[r][k]) for r, piece in enumerate(pieces[k])]
        # On the local tensor's device (the gather's buffer is on the mesh's: they differ when FSDP2
        # offloads the shards to the CPU beside a GPU mesh).
        full = rebuilt[0].clone() if dims[j] is None else torch.cat(rebuilt, dim=dims[j])  # type: ignore[arg-type]
        out[j] = full.to(locals_[j].device)
    return out  # type: ignore[return-value]


def full_model_tensors(state: ShardedState, indices: Sequence[int]) -> list[Tensor]:
    """Full-size model tensors of the given entries; the sharded ones (and the plain ones, mesh rank 0's)
    gathered in ONE all-gather."""
    return gather_full(state.mesh, [state.names[i] for i in indices], [state.xs[i] for i in indices],
                       [state.local_x[i] for i in indices], [state.dims[i] for i in indices],
                       [state.plain[i] for i in indices])  # fmt: skip
