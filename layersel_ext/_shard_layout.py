"""Sharded state's layout (FSDP2 ``fully_shard``, ``distribute_tensor`` on a 1-D mesh): which entries are
DTensors, on which mesh, sharded along which dimension, and where this rank's piece of each starts.

Called on every rank with the same model structure, as FSDP code is. Each entry is a ``DTensor``
(``Shard(d)`` or ``Replicate()`` on one 1-D mesh) or a plain tensor (buffers FSDP leaves alone,
mesh rank 0's copy counts); ``ShardedState`` holds each entry's local tensor and layout, and the
kernels only ever see local tensors. Pieces follow ``torch.chunk``'s split (the split DTensor and
FSDP2 use), so uneven shards are rebuilt exactly. The only communication here is the check that
every rank makes the same call (``_agreement``), before any other collective; the gathers are
``_collectives``', and the sharded ops build on both (``_sharded_scores``: drift and scores;
``_sharded_select``: the k-th largest score and the COO extraction; ``_sharded_masks``: masks and
fingerprints).
``torch.distributed.tensor`` is never imported: a DTensor can only exist once it is, so
``has_dtensor`` looks it up in ``sys.modules`` (a dictionary lookup when nothing is sharded).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _agreement, ops
from ._checks import layer_error


def dtensor_class() -> Any:
    """``DTensor`` once ``torch.distributed.tensor`` is imported (and then the ops' DTensor handlers are
    in place: a flag test after the first call), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return None
    ops.enable_dtensor_ops()
    return getattr(module, "DTensor", None)


def has_dtensor(*lists: Sequence[Tensor] | None) -> bool:
    """Whether any tensor of the lists is a DTensor.

    Cheap: a dictionary lookup while ``torch.distributed.tensor`` is not imported (no DTensor can
    exist then); otherwise one C-level pass per list (state tensors are detached, so plain ones
    are exactly ``torch.Tensor``), about 20 us per 1,000 tensors.
    """
    cls = dtensor_class()
    if cls is None:
        return False
    for tensors in lists:
        if tensors and not isinstance(tensors, ops.HELD):  # held tensors are plain ones
            kinds = list(map(type, tensors))
            if kinds.count(Tensor) != len(kinds) and any(issubclass(k, cls) for k in set(kinds)):
                return True
    return False


def is_dtensor(t: object) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def _chunk_size(size: int, world: int, rank: int) -> int:
    """Length of rank ``rank``'s piece of a dimension of ``size`` split as ``torch.chunk`` (empty pieces last)."""
    step = -(-size // world) if size else 0
    return max(0, min(step, size - rank * step))


def piece_shape(shape: Sequence[int], dim: int, world: int, rank: int) -> list[int]:
    piece = list(shape)
    piece[dim] = _chunk_size(shape[dim], world, rank)
    return piece


def _chunk_start(size: int, world: int, rank: int) -> int:
    step = -(-size // world) if size else 0
    return min(rank * step, size)


class Mesh:
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
        ranks = [int(r) for r in mesh.mesh.reshape(-1).tolist()]
        self.src = ranks[0]  # global rank of mesh coordinate 0 (for broadcast)
        if self.world > 1:
            _check_mesh_order(ranks, self.group, first_name, what)
        device_type = mesh.device_type
        self.device = (
            torch.device("cpu") if device_type == "cpu" else torch.device(device_type, torch.cuda.current_device())
        )  # where this mesh's collectives take their tensors


def _check_mesh_order(ranks: Sequence[int], group: Any, first_name: str, what: str) -> None:
    """Mesh coordinate i must be rank i of the mesh's process group: the gathers put rank i's piece
    i-th. Torch builds a 1-D mesh over all ranks on the default group whatever its order, so
    ``DeviceMesh("cpu", [1, 0])`` is not (and its own ``full_tensor()`` gathers out of order there).
    Decided from the mesh alone, so every rank of a mesh refuses it alike, before any collective."""
    import torch.distributed as dist

    order = [dist.get_group_rank(group, r) for r in ranks]
    if order != list(range(len(ranks))):
        raise NotImplementedError(
            f"{what}: layer {first_name!r} is on a device mesh of global ranks {ranks}, which its process "
            f"group numbers {order}; sharded selection needs mesh coordinate i to be group rank i (build "
            f"the mesh in rank order, e.g. init_device_mesh(device_type, (world_size,)))"
        )


def _find_mesh(names: Sequence[str], lists: Sequence[Sequence[Tensor] | None], what: str) -> Mesh:
    found, found_name = None, ""
    for tensors in lists:
        for name, t in zip(names, tensors or ()):
            if is_dtensor(t):
                if found is None:
                    found, found_name = t.device_mesh, name
                elif t.device_mesh != found:
                    raise ValueError(
                        f"{what}: layer {name!r} is on another device mesh than layer {found_name!r} "
                        "(one mesh per call)"
                    )
    assert found is not None
    return Mesh(found, found_name, what)


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


def _narrow(t: Tensor, dim: int, mesh: Mesh) -> Tensor:
    size = t.shape[dim]
    return t.narrow(dim, _chunk_start(size, mesh.world, mesh.rank), _chunk_size(size, mesh.world, mesh.rank))


def empty_like(t: Tensor) -> Tensor:
    """No elements, same dtype, device and number of dimensions (a 0-d tensor becomes 1-D)."""
    return t.narrow(0, 0, 0) if t.dim() else t.reshape(-1)[:0]


def meta_like(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A storage-less tensor of ``x``'s global shape in ``dtype``: what ``gather_full`` reads of an entry."""
    return torch.empty(x.shape, dtype=dtype, device="meta")


def _check_local(name: str, t: Any, local: Tensor, dim: int, mesh: Mesh, what: str) -> None:
    expected = _chunk_size(t.shape[dim], mesh.world, mesh.rank)
    if local.shape[dim] != expected:
        raise NotImplementedError(
            f"{what}: layer {name!r}: local shard has {local.shape[dim]} rows on dim {dim} where torch.chunk's "
            f"split gives {expected} (a custom split is not supported)"
        )


class ShardedState:
    """Local tensors of a (model, initial) pair of state lists, with each entry's layout.

    ``dims[i]``: the sharded dimension of entry i, or None for an entry every rank holds in full
    (Replicate DTensor or plain tensor). ``plain[i]``: held in full as a plain model tensor; every
    function takes such an entry from mesh rank 0 (plain entries may differ across ranks, as
    BatchNorm buffers without SyncBatchNorm do; a Replicate DTensor is the same on every rank by
    DTensor's contract). ``layout`` says whose placement wins when model and initial differ:
    ``"either"`` (drift: a plain tensor beside a DTensor is narrowed to its shard, no
    communication) or ``"model"`` (scores: the output takes the model entry's layout).

    Before any collective, the ranks check that they make the same call (``_agreement``: one small
    all-reduce of ``arguments`` and the entries' names, global shapes, dtypes and placements, with
    the checks of each rank's local shards), so a call that differs across ranks raises the same
    error on every rank. ``agree``: ``"now"``; ``"later"`` (the caller calls ``agree`` before its
    first collective: the masks carry the check in their own all-reduce; a failed check here is
    agreed at once); ``"when_communicating"`` (the score functions: each rank's scores are its own
    shards', so no check unless building the local tensors communicates, an initial entry laid out
    unlike its model entry; a failed check here raises on this rank alone, as nothing waits for it).
    """

    def __init__(
        self,
        names: list[str],
        xs: list[Tensor],
        ys: list[Tensor] | None,
        what: str,
        layout: str = "either",
        arguments: Sequence[tuple[str, Any]] = (),
        agree: str = "now",
    ) -> None:
        self.names, self.xs, self.ys, self.what, self.arguments = names, xs, ys, what, tuple(arguments)
        self.mesh = _find_mesh(names, [xs, ys], what)
        self.agreed = self.mesh.world == 1  # one rank agrees with itself
        self.dims: list[int | None] = []
        self.local_x: list[Tensor] = []
        self.local_y: list[Tensor] | None = [] if ys is not None else None
        try:
            pending = self._locals(layout)
        except (ValueError, TypeError, NotImplementedError) as exc:
            if not self.agreed and agree != "when_communicating":
                self.agree(local_error=exc)  # raises on every rank
            raise
        if agree == "now" or pending:
            self.agree()
        for i in pending:  # the initial entries whose local tensors take a collective (rare)
            x, y = xs[i], ys[i]  # type: ignore[index]
            if is_dtensor(x):
                y = y.redistribute(x.device_mesh, x.placements)  # type: ignore[attr-defined]
                self.local_y[i] = self._local(names[i], y, self.dims[i])  # type: ignore[index]
            else:  # model entry plain, initial sharded, the model's layout wins (scores)
                self.local_y[i] = y.full_tensor()  # type: ignore[attr-defined, index]
        self.plain = [dim is None and not is_dtensor(x) for x, dim in zip(xs, self.dims)]

    def _locals(self, layout: str) -> list[int]:
        """Each entry's layout and local tensors, checked, without communicating; returns the entries
        whose initial local tensor needs a collective (left None in ``local_y`` until agreed)."""
        names, xs, ys, what = self.names, self.xs, self.ys, self.what
        pending = []
        for i, (name, x) in enumerate(zip(names, xs)):
            y = ys[i] if ys is not None else None
            if y is not None and x.shape != y.shape:  # global shapes: the local shards may differ anyway
                raise layer_error(what, names, xs, i, "shape mismatch", y)
            x_is, y_is = is_dtensor(x), y is not None and is_dtensor(y)
            if x_is:
                dim = _shard_dim(name, x, what)
            elif y_is and layout == "either":
                dim = _shard_dim(name, y, what)
            else:
                dim = None
            self.dims.append(dim)
            self.local_x.append(self._local(name, x, dim))
            if self.local_y is not None:
                if x_is and y_is and tuple(y.placements) != tuple(x.placements):  # type: ignore[union-attr]
                    pending.append(i)  # redistributed to the model entry's placements
                    self.local_y.append(None)  # type: ignore[arg-type]
                elif y_is and dim is None and _shard_dim(name, y, what) is not None:
                    pending.append(i)  # gathered: a plain model entry's layout wins (scores)
                    self.local_y.append(None)  # type: ignore[arg-type]
                else:
                    self.local_y.append(self._local(name, y, dim))  # type: ignore[arg-type]
        return pending

    def agree(self, extra: Tensor | None = None, local_error: Exception | None = None) -> Tensor | None:
        """Check that every rank makes this call (``_agreement.agree``, once per state); ``extra`` int64
        words are SUM-reduced in the same all-reduce (in their own one when already agreed). With
        ``local_error`` (this rank's failed check), every rank raises."""
        if self.agreed:
            if extra is None or self.mesh.world == 1:
                return extra
            import torch.distributed as dist

            extra = extra.to(device=self.mesh.device, dtype=torch.int64)
            dist.all_reduce(extra, op=dist.ReduceOp.SUM, group=self.mesh.group)
            return extra
        call = _agreement.CallDescription.of(self.what, self.arguments, self.names, self.xs, self.ys, self.mesh.mesh)
        reduced = _agreement.agree(self.mesh, call, local_error, extra)
        self.agreed = True
        return reduced

    def _local(self, name: str, t: Any, dim: int | None) -> Tensor:
        if not is_dtensor(t):
            return t if dim is None else _narrow(t, dim, self.mesh)
        if t.device_mesh != self.mesh.mesh:
            raise ValueError(f"{self.what}: layer {name!r} is on another device mesh (one mesh per call)")
        local = t.to_local()
        if dim is not None:
            _check_local(name, t, local, dim, self.mesh, self.what)
        return local

    def counted(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The local tensors with every entry that all ranks hold in full (Replicate, plain) emptied on
        ranks other than mesh rank 0: summed over ranks, each element is then counted exactly once."""
        if self.mesh.rank == 0:
            return list(tensors)
        return [t if dim is not None else empty_like(t) for t, dim in zip(tensors, self.dims)]

    def offset(self, i: int) -> int:
        """Where this rank's piece of entry ``i`` starts along its sharded dimension (0 when held in full)."""
        dim = self.dims[i]
        return 0 if dim is None else _chunk_start(self.xs[i].shape[dim], self.mesh.world, self.mesh.rank)


def sharded_state(
    names: list[str],
    xs: Sequence[Tensor],
    ys: Sequence[Tensor] | None,
    what: str,
    arguments: Sequence[tuple[str, Any]] = (),
) -> ShardedState | None:
    """The local shards and layouts when any entry is a DTensor (FSDP2 / distribute_tensor), else None;
    ``arguments`` (name, value) are the call's own, which every rank must pass alike."""
    if not has_dtensor(xs, ys):
        return None
    return ShardedState(names, list(xs), None if ys is None else list(ys), what, arguments=arguments)
