"""Drift and scores of sharded state: the per-entry and elementwise ops, on each rank's local shards.

Drift: each rank runs ``drift_sq_norms`` on its local shards; Replicate and plain entries are
counted by mesh rank 0 only; ONE float64 SUM all-reduce of the per-entry vector, so every rank
selects the same layers (only the selected layers are then gathered to full size, by
``_collectives.full_model_tensors``). Scores: elementwise on the local shard, rewrapped with
``DTensor.from_local`` (no communication).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import ops
from ._checks import explain_failure
from ._shard_layout import ShardedState, dtensor_class


def drift_sq_norms(state: ShardedState) -> np.ndarray:
    """The unsharded op's per-entry sums, on every rank: local partial sums, one float64 SUM all-reduce."""
    import torch.distributed as dist

    assert state.local_y is not None
    lx, ly = [], []
    for x, a, b in zip(state.xs, state.counted(state.local_x), state.counted(state.local_y)):
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
        explain_failure(exc, state.names, lx, ly, state.what)
    total = partial.to(torch.float64).contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=state.mesh.group)
    return total.cpu().numpy()


def scores(names: list[str], xs: list[Tensor], ys: list[Tensor] | None, kind: int, what: str) -> list[Tensor]:
    """Scores of sharded state: the kernel on each rank's local shards; a DTensor entry gives a DTensor
    (same mesh, placements, global shape and stride), a plain entry a plain tensor. No communication
    (unless the model entry is plain and its initial entry sharded: that initial entry is gathered)."""
    # No agreement check: each rank's scores are its own shards' (unless an initial entry must be gathered).
    state = ShardedState(names, xs, ys, what, layout="model", arguments=[("kind", kind)], agree="when_communicating")
    try:
        local = ops.scores(state.local_x, state.local_y, kind)
    except (RuntimeError, ValueError, TypeError) as exc:
        explain_failure(exc, names, state.local_x, state.local_y, what)
    cls = dtensor_class()
    out = []
    for x, s in zip(xs, local):
        if isinstance(x, cls):
            s = cls.from_local(s, x.device_mesh, x.placements, shape=x.shape, stride=x.stride(), run_check=False)
        out.append(s)
    return out
