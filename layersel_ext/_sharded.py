"""Sharded state (FSDP2 ``fully_shard``, ``distribute_tensor`` on a 1-D mesh): the torch.distributed side.

Called on every rank with the same model structure, as FSDP code is. Each entry is a ``DTensor``
(``Shard(d)`` or ``Replicate()`` on one 1-D mesh) or a plain tensor (buffers FSDP leaves alone).
The kernels only ever see local tensors:

* drift: each rank runs ``drift_sq_norms`` on its local shards; Replicate and plain entries are
  counted by mesh rank 0 only; ONE float64 SUM all-reduce of the per-entry vector, so every rank
  selects the same layers. Only the selected layers are gathered to full size, in ONE all-gather
  of their local bytes packed into a padded buffer (pieces follow ``torch.chunk``'s split, the
  split DTensor and FSDP2 use, so uneven shards are rebuilt exactly);
* scores: elementwise on the local shard, rewrapped with ``DTensor.from_local`` (no communication);
* masks: the scores are gathered (one all-gather) and the unsharded path runs; an unseeded draw is
  broadcast from mesh rank 0.

``torch.distributed.tensor`` is never imported here: a DTensor can only exist once it is, so
``has_dtensor`` looks it up in ``sys.modules`` (a dictionary lookup when nothing is sharded).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import ops
from ._checks import explain_failure, layer_error

_ALIGN = 64  # bytes: each packed piece starts aligned for any dtype view


def _dtensor_class() -> Any:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def has_dtensor(*lists: Sequence[Tensor] | None) -> bool:
    """Whether any tensor of the lists is a DTensor.

    Cheap: a dictionary lookup while ``torch.distributed.tensor`` is not imported (no DTensor can
    exist then); otherwise one C-level pass per list (state tensors are detached, so plain ones
    are exactly ``torch.Tensor``), about 20 us per 1,000 tensors.
    """
    cls = _dtensor_class()
    if cls is None:
        return False
    for tensors in lists:
        if tensors:
            kinds = list(map(type, tensors))
            if kinds.count(Tensor) != len(kinds) and any(issubclass(k, cls) for k in set(kinds)):
                return True
    return False


def _is_dtensor(t: object) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def refuse(names: Sequence[str], lists: Sequence[Sequence[Tensor] | None], what: str) -> None:
    """Raise a clear NotImplementedError naming the first DTensor entry (for functions without a sharded path)."""
    for tensors in lists:
        for name, t in zip(names, tensors or ()):
            if _is_dtensor(t):
                raise NotImplementedError(
                    f"{what}: layer {name!r} is a DTensor (sharded model state); sharded sparse COO selection "
                    "is not supported yet. Gather the model first (e.g. DTensor.full_tensor() of every entry "
                    "into an unsharded copy) or use layer selection, scores or masks, which accept sharded state"
                )


# ---------------------------------------------------------------------------------------------- layout


def _chunk_size(size: int, world: int, rank: int) -> int:
    """Length of rank ``rank``'s piece of a dimension of ``size`` split as ``torch.chunk`` (empty pieces last)."""
    step = -(-size // world) if size else 0
    return max(0, min(step, size - rank * step))


def _piece_shape(shape: Sequence[int], dim: int, world: int, rank: int) -> list[int]:
    piece = list(shape)
    piece[dim] = _chunk_size(shape[dim], world, rank)
    return piece


def _chunk_start(size: int, world: int, rank: int) -> int:
    step = -(-size // world) if size else 0
    return min(rank * step, size)


class _Mesh:
    """The one 1-D mesh of a call: its process group, size and this rank's coordinate."""

    def __init__(self, mesh: Any, first_name: str, what: str) -> None:
        if mesh.ndim != 1:
            raise NotImplementedError(
                f"{what}: layer {first_name!r} is on a {mesh.ndim}-D device mesh; only 1-D meshes are supported"
            )
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world = mesh.size()
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            raise ValueError(f"{what}: this rank is not in the device mesh of layer {first_name!r}")
        self.rank = int(coordinate[0])
        self.src = int(mesh.mesh.reshape(-1)[0])  # global rank of mesh coordinate 0 (for broadcast)


def _find_mesh(names: Sequence[str], lists: Sequence[Sequence[Tensor] | None], what: str) -> _Mesh:
    found, found_name = None, ""
    for tensors in lists:
        for name, t in zip(names, tensors or ()):
            if _is_dtensor(t):
                if found is None:
                    found, found_name = t.device_mesh, name
                elif t.device_mesh != found:
                    raise ValueError(
                        f"{what}: layer {name!r} is on another device mesh than layer {found_name!r} "
                        "(one mesh per call)"
                    )
    assert found is not None
    return _Mesh(found, found_name, what)


def _shard_dim(name: str, t: Any, what: str) -> int | None:
    """The sharded dimension of a DTensor (None: replicated), after checking its placement is one we handle."""
    (placement,) = t.placements
    kind = type(placement).__name__
    if kind == "Replicate":
        return None
    if kind == "Shard":
        return placement.dim % max(t.dim(), 1)
    raise NotImplementedError(
        f"{what}: layer {name!r} has placement {placement}; sharded selection handles Shard(d) and Replicate() only"
    )


def _narrow(t: Tensor, dim: int, mesh: _Mesh) -> Tensor:
    size = t.shape[dim]
    return t.narrow(dim, _chunk_start(size, mesh.world, mesh.rank), _chunk_size(size, mesh.world, mesh.rank))


def _check_local(name: str, t: Any, local: Tensor, dim: int, mesh: _Mesh, what: str) -> None:
    expected = _chunk_size(t.shape[dim], mesh.world, mesh.rank)
    if local.shape[dim] != expected:
        raise NotImplementedError(
            f"{what}: layer {name!r}: local shard has {local.shape[dim]} rows on dim {dim} where torch.chunk's "
            f"split gives {expected} (a custom split is not supported)"
        )


class ShardedState:
    """Local tensors of a (model, initial) pair of state lists, with each entry's layout.

    ``dims[i]``: the sharded dimension of entry i, or None for an entry every rank holds in full
    (Replicate DTensor or plain tensor). ``layout`` says whose placement wins when model and
    initial differ: ``"either"`` (drift: a plain tensor beside a DTensor is narrowed to its shard,
    no communication) or ``"model"`` (scores: the output takes the model entry's layout).
    """

    def __init__(
        self, names: list[str], xs: list[Tensor], ys: list[Tensor] | None, what: str, layout: str = "either"
    ) -> None:
        self.names, self.xs, self.what = names, xs, what
        self.mesh = _find_mesh(names, [xs, ys], what)
        self.dims: list[int | None] = []
        self.local_x: list[Tensor] = []
        self.local_y: list[Tensor] | None = [] if ys is not None else None
        for i, (name, x) in enumerate(zip(names, xs)):
            y = ys[i] if ys is not None else None
            if y is not None and x.shape != y.shape:  # global shapes: the local shards may differ anyway
                raise layer_error(what, names, xs, i, "shape mismatch", y)
            x_is, y_is = _is_dtensor(x), y is not None and _is_dtensor(y)
            if x_is and y_is and tuple(y.placements) != tuple(x.placements):  # type: ignore[union-attr]
                y = y.redistribute(x.device_mesh, x.placements)  # type: ignore[union-attr]  # a collective, rare
            if x_is:
                dim = _shard_dim(name, x, what)
            elif y_is and layout == "either":
                dim = _shard_dim(name, y, what)
            else:
                dim = None
            self.dims.append(dim)
            self.local_x.append(self._local(name, x, dim))
            if self.local_y is not None:
                if y_is and dim is None and _shard_dim(name, y, what) is not None:
                    # Model entry plain (or replicated), initial sharded, the model's layout wins (scores).
                    self.local_y.append(y.full_tensor())  # type: ignore[union-attr]
                else:
                    self.local_y.append(self._local(name, y, dim))  # type: ignore[arg-type]

    def _local(self, name: str, t: Any, dim: int | None) -> Tensor:
        if not _is_dtensor(t):
            return t if dim is None else _narrow(t, dim, self.mesh)
        if t.device_mesh != self.mesh.mesh:
            raise ValueError(f"{self.what}: layer {name!r} is on another device mesh (one mesh per call)")
        local = t.to_local()
        if dim is not None:
            _check_local(name, t, local, dim, self.mesh, self.what)
        return local

    # ------------------------------------------------------------------------------------------ drift

    def drift_sq_norms(self) -> np.ndarray:
        """The unsharded op's per-entry sums, on every rank: local partial sums, one float64 SUM all-reduce."""
        import torch.distributed as dist

        assert self.local_y is not None
        lx, ly = [], []
        for x, a, b, dim in zip(self.xs, self.local_x, self.local_y, self.dims):
            if dim is None and self.mesh.rank != 0:  # held in full by every rank: counted by rank 0 only
                a, b = a.reshape(-1)[:0], b.reshape(-1)[:0]
            elif a.numel() == 1 and x.numel() > 1:
                # The op squares a lone element exactly in float64 (torch's norm of one element is |d|);
                # this element belongs to a larger tensor, whose squares are float32: pad with a zero drift.
                zero = a.new_zeros(1)
                a, b = torch.cat([a.reshape(-1), zero]), torch.cat([b.reshape(-1), zero])
            lx.append(a)
            ly.append(b)
        try:
            partial = ops.drift_sq_norms(lx, ly)
        except (RuntimeError, ValueError, TypeError) as exc:
            explain_failure(exc, self.names, lx, ly, self.what)
        total = partial.to(torch.float64).contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.mesh.group)
        return total.cpu().numpy()

    # ------------------------------------------------------------------------------------------ gather

    def full_model_tensors(self, indices: Sequence[int]) -> list[Tensor]:
        """Full-size model tensors of the given entries; the sharded ones gathered in ONE all-gather."""
        return gather_full(self.mesh, [self.names[i] for i in indices], [self.xs[i] for i in indices],
                           [self.local_x[i] for i in indices], [self.dims[i] for i in indices])  # fmt: skip


def gather_full(
    mesh: _Mesh, names: Sequence[str], tensors: Sequence[Tensor], locals_: Sequence[Tensor], dims: Sequence[int | None]
) -> list[Tensor]:
    """Rebuild the full tensors of sharded entries from every rank's piece with ONE ``all_gather``.

    Each rank packs its local pieces' bytes (each 64-byte aligned) into one buffer, padded to the
    largest rank's total (every rank computes every rank's piece sizes from the global shapes);
    entries held in full (dim None) are returned as they are.
    """
    import torch.distributed as dist

    out: list[Tensor | None] = [loc if dim is None else None for loc, dim in zip(locals_, dims)]
    sharded = [j for j, dim in enumerate(dims) if dim is not None]
    if not sharded:
        return out  # type: ignore[return-value]
    world = mesh.world
    offsets = [[0] * len(sharded) for _ in range(world)]
    totals = [0] * world
    for r in range(world):
        for k, j in enumerate(sharded):
            t = tensors[j]
            nbytes = math.prod(_piece_shape(t.shape, dims[j], world, r)) * t.element_size()  # type: ignore[arg-type]
            offsets[r][k] = totals[r]
            totals[r] += -(-nbytes // _ALIGN) * _ALIGN
    capacity = max(max(totals), _ALIGN)
    device = locals_[sharded[0]].device
    send = torch.zeros(capacity, dtype=torch.uint8, device=device)
    with torch.no_grad():
        for k, j in enumerate(sharded):
            local = locals_[j]
            o = offsets[mesh.rank][k]
            if local.numel():
                send[o : o + local.numel() * local.element_size()].view(local.dtype).copy_(local.reshape(-1))
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send, group=mesh.group)
    for k, j in enumerate(sharded):
        t, dim = tensors[j], dims[j]
        pieces = []
        for r in range(world):
            shape = _piece_shape(t.shape, dim, world, r)  # type: ignore[arg-type]
            o = offsets[r][k]
            pieces.append(received[r][o : o + math.prod(shape) * t.element_size()].view(t.dtype).view(shape))
        out[j] = torch.cat(pieces, dim=dim)  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- scores


def scores(names: list[str], xs: list[Tensor], ys: list[Tensor] | None, kind: int, what: str) -> list[Tensor]:
    """Scores of sharded state: the kernel on each rank's local shards; a DTensor entry gives a DTensor
    (same mesh, placements, global shape and stride), a plain entry a plain tensor. No communication
    (unless the model entry is plain and its initial entry sharded: that initial entry is gathered)."""
    state = ShardedState(names, xs, ys, what, layout="model")
    try:
        local = ops.scores(state.local_x, state.local_y, kind)
    except (RuntimeError, ValueError, TypeError) as exc:
        explain_failure(exc, names, state.local_x, state.local_y, what)
    cls = _dtensor_class()
    out = []
    for x, s in zip(xs, local):
        if isinstance(x, cls):
            s = cls.from_local(s, x.device_mesh, x.placements, shape=x.shape, stride=x.stride(), run_check=False)
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------- masks


def full_scores(names: list[str], tensors: list[Tensor], what: str) -> tuple[list[Tensor], _Mesh]:
    """Every score tensor at full size on every rank (one all-gather), and the mesh."""
    state = ShardedState(names, tensors, None, what, layout="model")
    return state.full_model_tensors(range(len(names))), state.mesh


def broadcast_seed(seed: int, mesh: _Mesh) -> int:
    """Mesh rank 0's seed on every rank (an unseeded draw must be the same everywhere)."""
    import torch.distributed as dist

    device_type = mesh.mesh.device_type
    device = torch.device("cpu") if device_type == "cpu" else torch.device(device_type, torch.cuda.current_device())
    value = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(value, src=mesh.src, group=mesh.group)
    return int(value.item())
