"""Every rank makes the same call, or every rank raises the same error: the agreement check of the sharded paths.

A sharded call gives the unsharded model's answer only when every rank calls the same function with
the same arguments on the same model structure; otherwise the collectives' sizes differ (gloo aborts
a rank, or a rank waits for a collective its peer skipped) or they match by chance and the answer is
silently wrong. So before its first collective whose size or meaning depends on the call, every
sharded call checks that the ranks agree, in ONE small fixed-size int64 SUM all-reduce:

- each rank hashes (blake2b, 64 bits) each part of its call (``FIELDS``: the arguments; the entry
  names; their global shapes, dtypes and placements; the device mesh) and sends every 16-bit piece
  ``p`` of each hash as ``(p, p * p)``. The ranks agree on a piece exactly when
  ``sum(p) ** 2 == world * sum(p * p)`` (Cauchy-Schwarz), which every rank tests on the same
  reduced sums, so all ranks reach the same verdict. A SUM (not MIN and MAX) lets the words ride
  in an existing int64 SUM all-reduce (the unseeded masks' seed and fingerprint do);
- one more word counts the ranks whose own checks of their local shards failed (a custom split, say):
  such a rank still joins the all-reduce, so no peer is left waiting, and every rank raises.

On disagreement (only then) one ``all_gather_object`` of every rank's description lets every rank
build the same message, naming what differs and on which ranks, and raise it: a ``ValueError``
("the ranks called <fn> with different arguments or models: ..."), or the failing rank's own error
type when the ranks agree and only a local check failed. The cost of a call that agrees: hashing
its names, shapes, dtypes and placements on the host, and one all-reduce of ``WORDS`` int64s.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

FIELDS = ("arguments", "layer names", "global shapes", "dtypes", "placements", "device mesh")
_PIECE_BITS = 16
_PIECES = 64 // _PIECE_BITS
WORDS = 2 * _PIECES * len(FIELDS) + 1  # the pieces and their squares, and the count of failed local checks
_ERROR_TYPES: dict[str, type[Exception]] = {
    "ValueError": ValueError, "TypeError": TypeError, "NotImplementedError": NotImplementedError,
}  # fmt: skip


def _layouts(ts: Sequence[Tensor | None]) -> list[tuple[tuple[str, int | None], ...] | None]:
    """Each DTensor's placements as (kind, dim) pairs (``str`` of a placement costs 20 times more),
    worked out once per distinct placements; None: a plain tensor or no tensor."""
    seen: dict[Any, tuple[tuple[str, int | None], ...]] = {}
    out: list[tuple[tuple[str, int | None], ...] | None] = []
    for t in ts:
        placements = None if t is None or type(t) is Tensor else getattr(t, "placements", None)
        if placements is None:
            out.append(None)
            continue
        layout = seen.get(placements)
        if layout is None:
            layout = seen[placements] = tuple((type(p).__name__, getattr(p, "dim", None)) for p in placements)
        out.append(layout)
    return out


def _show_layout(layout: Any) -> str:
    if layout is None:
        return "plain"
    return "DTensor(" + ", ".join(kind if dim is None else f"{kind}({dim})" for kind, dim in layout) + ")"


@dataclass(frozen=True)
class CallDescription:
    """What every rank's call must share: one tuple per ``FIELDS`` entry, each the same on every rank
    whose call is the same (plain values: their ``repr`` is hashed, the same in every process)."""

    what: str
    arguments: tuple[tuple[str, Any], ...]
    names: tuple[str, ...]
    shapes: tuple[tuple[torch.Size, torch.Size | None], ...]  # (model, initial) per entry
    dtypes: tuple[tuple[torch.dtype, torch.dtype | None], ...]
    placements: tuple[tuple[Any, Any], ...]  # ``_layout``s
    mesh: tuple[str, tuple[int, ...]]

    @classmethod
    def of(
        cls,
        what: str,
        arguments: Sequence[tuple[str, Any]],
        names: Sequence[str],
        xs: Sequence[Tensor],
        ys: Sequence[Tensor] | None,
        mesh: Any,
    ) -> CallDescription:
        # One pass per field over plain attributes (a few microseconds an entry: this runs every call).
        others: Sequence[Tensor | None] = [None] * len(xs) if ys is None else ys
        return cls(
            what=what,
            arguments=tuple((name, value) for name, value in arguments),
            names=tuple(names),
            shapes=tuple((x.shape, None if y is None else y.shape) for x, y in zip(xs, others)),
            dtypes=tuple((x.dtype, None if y is None else y.dtype) for x, y in zip(xs, others)),
            placements=tuple(zip(_layouts(xs), _layouts(others))),
            mesh=(str(mesh.device_type), tuple(mesh.mesh.reshape(-1).tolist())),
        )

    def fields(self) -> tuple[Any, ...]:
        return (self.what, self.arguments), self.names, self.shapes, self.dtypes, self.placements, self.mesh

    def words(self, failed: bool) -> list[int]:
        out = []
        for value in self.fields():
            h = int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little")
            for k in range(_PIECES):
                p = (h >> (k * _PIECE_BITS)) & ((1 << _PIECE_BITS) - 1)
                out += [p, p * p]
        return out + [int(failed)]


def agree(
    mesh: Any, call: CallDescription, local_error: Exception | None = None, extra: Tensor | None = None
) -> Tensor | None:
    """Check that every rank of ``mesh`` (``.group``, ``.world``, ``.device``) makes ``call``, in one
    int64 SUM all-reduce; ``extra`` (int64 words of the caller's own SUM all-reduce, which must not
    overflow) rides along and comes back reduced. Raises the same error on every rank when the calls
    differ or any rank's ``local_error`` is set."""
    import torch.distributed as dist

    words = torch.tensor(call.words(local_error is not None), dtype=torch.int64, device=mesh.device)
    if extra is not None:
        words = torch.cat([words, extra.to(device=mesh.device, dtype=torch.int64).reshape(-1)])
    dist.all_reduce(words, op=dist.ReduceOp.SUM, group=mesh.group)
    total = words[:WORDS].tolist()
    differing = []
    for f, field in enumerate(FIELDS):
        base = 2 * _PIECES * f
        sums, squares = total[base : base + 2 * _PIECES : 2], total[base + 1 : base + 2 * _PIECES : 2]
        if any(s * s != mesh.world * q for s, q in zip(sums, squares)):
            differing.append(field)
    if differing or total[-1]:
        _raise_everywhere(mesh, call, differing, local_error)
    return None if extra is None else words[WORDS:]


def _by_rank(values: Sequence[Any], show: Any = repr) -> str:
    """'A on ranks 0, 2 vs B on rank 1': each distinct value with the ranks that hold it, in rank order."""
    groups: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(show(v), []).append(r)
    return " vs ".join(
        f"{text} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}" for text, ranks in groups.items()
    )


def _first_entry_difference(calls: Sequence[CallDescription], field: str) -> str:
    """The first entry whose ``field`` differs across ranks, with each rank's value."""
    column = {"global shapes": "shapes", "dtypes": "dtypes", "placements": "placements"}[field]
    rows = [getattr(c, column) for c in calls]
    for i in range(min(map(len, rows))):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            model = [v[0] for v in values]
            initial = [v[1] for v in values]
            side, shown = ("model", model) if len(set(model)) > 1 else ("initial_model", initial)
            show = {"shapes": lambda v: str(tuple(v)), "dtypes": str, "placements": _show_layout}[column]
            return f"{field} differ: layer {calls[0].names[i]!r} ({side}): {_by_rank(shown, show)}"
    return f"{field} differ"


def _describe(calls: Sequence[CallDescription], differing: Sequence[str]) -> list[str]:
    parts = []
    for field in differing:
        if field == "arguments":
            names = list(dict.fromkeys(n for c in calls for n, _ in c.arguments))
            values = [dict(c.arguments) for c in calls]
            named = [f"{n}: {_by_rank([v.get(n, '(none)') for v in values])}" for n in names
                     if len({repr(v.get(n)) for v in values}) > 1]  # fmt: skip
            if len({c.what for c in calls}) > 1:
                named.insert(0, f"function: {_by_rank([c.what for c in calls], str)}")
            parts.append("arguments differ: " + ("; ".join(named) or "(equal reprs)"))
        elif field == "layer names":
            counts = [len(c.names) for c in calls]
            if len(set(counts)) > 1:
                parts.append(f"layer names differ: {_by_rank(counts, lambda n: f'{n} entries')}")
            else:
                i = next((i for i in range(counts[0]) if len({c.names[i] for c in calls}) > 1), 0)
                parts.append(f"layer names differ: entry #{i}: {_by_rank([c.names[i] for c in calls])}")
        elif field == "device mesh":
            parts.append(f"device mesh differs: {_by_rank([c.mesh for c in calls], str)}")
        else:
            parts.append(_first_entry_difference(calls, field))
    return parts


def _raise_everywhere(
    mesh: Any, call: CallDescription, differing: Sequence[str], local_error: Exception | None
) -> None:
    """Every rank gets every rank's description and local error (one ``all_gather_object``, on this
    error path only) and raises the same message."""
    import torch.distributed as dist

    mine = (call, None if local_error is None else (type(local_error).__name__, str(local_error)))
    gathered: list[Any] = [None] * mesh.world
    dist.all_gather_object(gathered, mine, group=mesh.group)
    calls = [c for c, _ in gathered]
    errors = [(r, e) for r, (_, e) in enumerate(gathered) if e is not None]
    if differing:
        parts = _describe(calls, differing)
        parts += [f"rank {r}: {kind}: {message}" for r, (kind, message) in errors]
        raise ValueError(f"the ranks called {call.what} with different arguments or models: " + "; ".join(parts))
    r, (kind, message) = errors[0]
    if len(errors) == mesh.world and len({e for _, e in errors}) == 1:  # the same failure on every rank
        raise _ERROR_TYPES.get(kind, RuntimeError)(message)
    also = f" (and on rank{'s' if len(errors) > 2 else ''} {', '.join(str(q) for q, _ in errors[1:])})"
    raise _ERROR_TYPES.get(kind, RuntimeError)(f"rank {r}: {message}" + (also if len(errors) > 1 else ""))
