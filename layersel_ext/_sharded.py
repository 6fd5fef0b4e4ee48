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
* masks: each rank samples its own pieces, every element keyed by its index in the unsharded model
  (the kernel's ``counters``), so the masks are the unsharded model's; an unseeded key takes mesh
  rank 0's draw and the fingerprints of all pieces (one all-reduce); one all-gather of the mask
  bytes (never the scores) gives every rank the full masks;
* sparse COO: the k-th largest score by a radix select whose digit histograms (of the local scores'
  order-preserving keys, every element counted once) are all-reduced, one digit a collective; then
  each rank extracts its local entries with global indices (``offset``), and one all-gather of the
  per-entry counts and one of the values and flat indices give every rank the unsharded arrays.
  The scores never travel.

``torch.distributed.tensor`` is never imported here: a DTensor can only exist once it is, so
``has_dtensor`` looks it up in ``sys.modules`` (a dictionary lookup when nothing is sharded).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _bits, _keys, ops
from ._checks import explain_failure, layer_error
from ._score_kinds import ScoreKind, uses_initial

_ALIGN = 64  # bytes: each packed piece starts aligned for any dtype view


def _dtensor_class() -> Any:
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return None
    from . import _dtensor_ops  # (here: it imports this module)

    _dtensor_ops.install()  # the ops' DTensor handlers, once DTensor exists (a flag test after the first)
    return getattr(module, "DTensor", None)


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
        if tensors and not isinstance(tensors, ops.HELD):  # held tensors are plain ones
            kinds = list(map(type, tensors))
            if kinds.count(Tensor) != len(kinds) and any(issubclass(k, cls) for k in set(kinds)):
                return True
    return False


def _is_dtensor(t: object) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


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
        device_type = mesh.device_type
        self.device = (
            torch.device("cpu") if device_type == "cpu" else torch.device(device_type, torch.cuda.current_device())
        )  # where this mesh's collectives take their tensors


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


def _empty_like(t: Tensor) -> Tensor:
    """No elements, same dtype, device and number of dimensions (a 0-d tensor becomes 1-D)."""
    return t.narrow(0, 0, 0) if t.dim() else t.reshape(-1)[:0]


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

    # ------------------------------------------------------------------------------------------ layout

    def counted(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The local tensors with every entry that all ranks hold in full (Replicate, plain) emptied on
        ranks other than mesh rank 0: summed over ranks, each element is then counted exactly once."""
        if self.mesh.rank == 0:
            return list(tensors)
        return [t if dim is not None else _empty_like(t) for t, dim in zip(tensors, self.dims)]

    def offset(self, i: int) -> int:
        """Where this rank's piece of entry ``i`` starts along its sharded dimension (0 when held in full)."""
        dim = self.dims[i]
        return 0 if dim is None else _chunk_start(self.xs[i].shape[dim], self.mesh.world, self.mesh.rank)

    # ------------------------------------------------------------------------------------------ drift

    def drift_sq_norms(self) -> np.ndarray:
        """The unsharded op's per-entry sums, on every rank: local partial sums, one float64 SUM all-reduce."""
        import torch.distributed as dist

        assert self.local_y is not None
        lx, ly = [], []
        for x, a, b in zip(self.xs, self.counted(self.local_x), self.counted(self.local_y)):
            if a.numel() == 1 and x.numel() > 1:
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

    # ------------------------------------------------------------------------------------------ sparse COO

    def kth_largest_score(self, kind: int, k: int, score_dtype: torch.dtype) -> Tensor:
        """``ops.kth_largest_score`` of the unsharded tensors, on every rank, without moving any score:
        a radix select over the order-preserving keys of the local scores (each element counted once),
        each digit's histogram all-reduced (``_digit_widths``: 256 KB, then 1 KB a digit)."""
        import torch.distributed as dist

        from ._checks import check_rank

        check_rank("kth_largest_score", k, sum(x.numel() for x in self.xs))  # every rank, before any collective
        xs = self.counted(self.local_x)
        ys = self.counted(self.local_y) if self.local_y is not None else None
        if kind != ScoreKind.GIVEN:  # the kernel's checks of every entry, on every rank (none may skip a collective)
            try:
                ops.scores([_empty_like(x) for x in xs], None if ys is None else [_empty_like(y) for y in ys], kind)
            except (RuntimeError, ValueError, TypeError) as exc:
                explain_failure(exc, self.names, xs, ys, self.what)
        key_dtype = score_dtype if score_dtype.is_floating_point else torch.int64
        nbits = _keys.key_bits(key_dtype)
        total = sum(x.numel() for x in self.xs)
        count_dtype = torch.int32 if total < 2**31 else torch.int64

        def all_reduce(counts: Tensor) -> Tensor:
            counts = counts.to(device=self.mesh.device, dtype=count_dtype)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.mesh.group)
            return counts.to(torch.int64)

        keys = _LocalKeys(xs, ys, kind, key_dtype, nbits)
        key = _keys.radix_select(keys, k, nbits, _digit_widths(nbits), all_reduce)
        return _keys.key_to_value(key, key_dtype).to(score_dtype)

    def sparse_extract(self, kind: int, thresholds: Sequence[float | int]) -> tuple[list[Tensor], list[Tensor]]:
        """``ops.sparse_extract`` of the unsharded tensors, on every rank: each rank extracts from its local
        shards (entries held in full: mesh rank 0 only), shifts the indices by its shard's offset and
        flattens them (row-major, global shape); ONE all-gather of the per-entry counts, ONE of the
        values and flat indices; pieces sharded along a dimension other than 0 are put back in row-major
        order. A 0-d entry gives nothing (the COO exchanger drops it)."""
        import torch.distributed as dist

        xs = self.counted(self.local_x)
        ys = self.counted(self.local_y) if self.local_y is not None else None
        try:
            values, indices = ops.sparse_extract(xs, ys, kind, thresholds)
        except (RuntimeError, ValueError, TypeError) as exc:
            explain_failure(exc, self.names, xs, ys if uses_initial(kind) else None, self.what)
        flat = []
        for i, (x, idx) in enumerate(zip(self.xs, indices)):
            if x.dim() == 0:
                values[i], idx = values[i][:0], idx.new_zeros((0, 1))
            shape, dim = list(x.shape), self.dims[i]
            strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))] or [1]  # row-major, global shape
            if dim is not None:
                idx = idx.clone()
                idx[:, dim] += self.offset(i)
            flat.append((idx * torch.tensor(strides, dtype=torch.int64, device=idx.device)).sum(1))
        counts = torch.tensor([v.numel() for v in values], dtype=torch.int64, device=self.mesh.device)
        every = [torch.empty_like(counts) for _ in range(self.mesh.world)]
        dist.all_gather(every, counts, group=self.mesh.group)
        per_rank = [[n for n in row.tolist() for _ in (0, 1)] for row in every]  # values, flat indices per entry
        pieces = _all_gather_packed(
            self.mesh, per_rank, [t for pair in zip(values, flat) for t in pair],
            [dt for x in self.xs for dt in (x.dtype, torch.int64)],
        )  # fmt: skip
        out_values, out_indices = [], []
        for i, x in enumerate(self.xs):
            vals, where = torch.cat(pieces[2 * i]), torch.cat(pieces[2 * i + 1])
            if self.dims[i] not in (None, 0):  # each rank's piece is a block of columns: interleave
                order = torch.argsort(where)
                vals, where = vals[order], where[order]
            out_values.append(vals)
            if x.dim() == 0:
                out_indices.append(where.view(0, 0))
            else:
                out_indices.append(torch.stack(torch.unravel_index(where, tuple(x.shape)), dim=1))
        return out_values, out_indices


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


def _all_gather_packed(
    mesh: _Mesh, counts: Sequence[Sequence[int]], local: Sequence[Tensor], dtypes: Sequence[torch.dtype]
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
    mesh: _Mesh, names: Sequence[str], tensors: Sequence[Tensor], locals_: Sequence[Tensor], dims: Sequence[int | None]
) -> list[Tensor]:
    """Rebuild the full tensors of sharded entries from every rank's piece with ONE ``all_gather``
    (``_all_gather_packed``; every rank computes every rank's piece sizes from the global shapes);
    entries held in full (dim None) are returned as they are.
    """
    if mesh.world == 1:  # one rank: every local piece is the whole tensor (no buffer, no collective)
        return list(locals_)
    out: list[Tensor | None] = [loc if dim is None else None for loc, dim in zip(locals_, dims)]
    sharded = [j for j, dim in enumerate(dims) if dim is not None]
    if not sharded:
        return out  # type: ignore[return-value]
    shapes = [[_piece_shape(tensors[j].shape, dims[j], mesh.world, r) for j in sharded] for r in range(mesh.world)]  # type: ignore[arg-type]
    pieces = _all_gather_packed(
        mesh, [[math.prod(shape) for shape in row] for row in shapes], [locals_[j] for j in sharded],
        [tensors[j].dtype for j in sharded],
    )  # fmt: skip
    for k, j in enumerate(sharded):
        rebuilt = [piece.view(shapes[r][k]) for r, piece in enumerate(pieces[k])]
        # On the local tensor's device (the gather's buffer is on the mesh's: they differ when FSDP2
        # offloads the shards to the CPU beside a GPU mesh).
        out[j] = torch.cat(rebuilt, dim=dims[j]).to(locals_[j].device)  # type: ignore[arg-type]
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
            found = _stream_pieces(local, x.shape, dim, state.offset(i), self.total)
            self.pieces += [p for p, _ in found]
            self.counters += [c for _, c in found]
            self.counted += [dim is not None or state.mesh.rank == 0] * len(found)
            self.per_entry.append(sum(p.numel() for p, _ in found))
            self.total += x.numel()

    def seed_and_fingerprint(self, seed: int) -> tuple[int, int]:
        """(mesh rank 0's ``seed``, the unsharded model's fingerprint), on every rank: this rank's
        fingerprint of its counted pieces and rank 0's seed, as four 32-bit halves in ONE int64 SUM
        all-reduce (the sums of the halves cannot overflow; the fingerprint is a sum mod 2**64)."""
        import torch.distributed as dist

        mesh = self.state.mesh
        keep = [(p, c) for p, c, counted in zip(self.pieces, self.counters, self.counted) if counted]
        if keep:
            fp = ops.score_fingerprint([p for p, _ in keep], [c for _, c in keep]).to(mesh.device)
        else:
            fp = torch.zeros(1, dtype=torch.int64, device=mesh.device)
        mine = seed if mesh.rank == 0 else 0
        halves = torch.cat([torch.tensor([mine & 0xFFFFFFFF, mine >> 32], dtype=torch.int64, device=mesh.device),
                            fp & 0xFFFFFFFF, (fp >> 32) & 0xFFFFFFFF])  # fmt: skip
        dist.all_reduce(halves, op=dist.ReduceOp.SUM, group=mesh.group)
        s_lo, s_hi, f_lo, f_hi = (int(v) for v in halves.cpu())
        return s_lo + (s_hi << 32), (f_lo + (f_hi << 32)) & ((1 << 64) - 1)


def sample_masks(names: list[str], scores: list[Tensor], seed: int, key_by_scores: bool, what: str) -> Tensor:
    """The unsharded model's flat uint8 masks (``ops.sample_masks`` of the full scores, keyed as it
    would be), on every rank. Each rank samples only its own pieces, each element with its index in
    the unsharded model as its Philox counter (``_StreamLayout``); entries held in full are sampled
    by every rank (the same bits everywhere, no communication). With ``key_by_scores`` the key is
    ``key_from_scores(mesh rank 0's seed, the unsharded fingerprint, the unsharded size)`` (one
    all-reduce). Then ONE all-gather of the sharded entries' mask bytes (a quarter of float32
    scores' bytes) rebuilds them at full size."""
    state = ShardedState(names, scores, None, what, layout="model")
    _check_floating(names, state.xs, what)
    layout = _StreamLayout(state)
    key = seed
    if key_by_scores:
        key = _bits.key_from_scores(*layout.seed_and_fingerprint(seed), layout.total)
    device = state.local_x[0].device
    try:
        flat = (ops.sample_masks(layout.pieces, key, torch.uint8, counters=layout.counters) if layout.pieces
                else torch.empty(0, dtype=torch.uint8, device=device))  # fmt: skip
    except (RuntimeError, ValueError, TypeError) as exc:
        explain_failure(exc, names, state.local_x, None, what)
    local_masks, at = [], 0
    for local, n in zip(state.local_x, layout.per_entry):
        local_masks.append(flat[at : at + n].view(local.shape))
        at += n
    full = gather_full(state.mesh, names, [_meta_like(x, torch.uint8) for x in state.xs], local_masks, state.dims)
    return torch.cat([m.reshape(-1) for m in full])  # gather_full: every piece on the local device


def score_fingerprint(names: list[str], scores: list[Tensor], what: str) -> Tensor:
    """``ops.score_fingerprint`` of the unsharded scores (int64[1], on every rank): one all-reduce."""
    state = ShardedState(names, scores, None, what, layout="model")
    _check_floating(names, state.xs, what)
    layout = _StreamLayout(state)
    _, fp = layout.seed_and_fingerprint(0)
    return torch.tensor(
        [fp - (1 << 64) if fp >= 1 << 63 else fp], dtype=torch.int64, device=layout.state.local_x[0].device
    )


def _check_floating(names: Sequence[str], xs: Sequence[Tensor], what: str) -> None:
    """Every score entry floating, checked on the global entries (the same on every rank) before any
    collective: a rank whose own piece of a bad entry is empty must not go on alone."""
    for name, x in zip(names, xs):
        if not x.dtype.is_floating_point:
            raise TypeError(f"{what}: layer {name!r}: score dtype {x.dtype} is not floating point")


def _meta_like(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A storage-less tensor of ``x``'s global shape in ``dtype``: what ``gather_full`` reads of an entry."""
    return torch.empty(x.shape, dtype=dtype, device="meta")
