"""Layer drift as fl4health computes it, and the layers a drift selection keeps as numpy arrays.

The work behind ``layer_drift_norms`` and ``select_layers_by_threshold`` / ``_by_percentage``: one
fused op and one sync for every entry's squared drift (sharded state: local sums and one
all-reduce, ``_sharded_scores``), fl4health's float32 rounding of the norm on the host, then the kept
layers to the host together (sharded ones gathered in one collective first, ``_collectives``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from . import _sharded_scores, ops
from ._checks import explain_failure
from ._collectives import full_model_tensors
from ._host import NDArrays, to_numpy
from ._shard_layout import ShardedState


def drift_norms(
    names: list[str],
    xs: Sequence[Tensor],
    ys: Sequence[Tensor],
    normalize: bool,
    what: str,
    sharded: ShardedState | None = None,
) -> list[float]:
    """fl4health's ``_calculate_drift_norm`` for every entry, from one fused op and one sync.

    The kernels sum the float32 squares in float64; the total is rounded to float32 before the
    square root (a total above the float32 maximum is inf, as in fl4health's float32 norm), the
    root taken in float32; a one-element entry gives |d|, as torch's norm of one element does.
    With ``normalize`` it is divided by numel in float32 the way torch does it on that device
    (CUDA multiplies by a float32 reciprocal). Sharded state: the same sums from the local shards
    and one all-reduce (``_sharded_scores``); numel is the global one.
    """
    if sharded is not None:
        sq = _sharded_scores.drift_sq_norms(sharded)
    else:
        try:
            sq = ops.drift_sq_norms(xs, ys).cpu().numpy()
        except (RuntimeError, ValueError, TypeError) as exc:
            explain_failure(exc, names, xs, ys, what)
    numel = np.array(ops.numels(xs), dtype=np.float32)
    with np.errstate(over="ignore"):
        norms = np.sqrt(sq.astype(np.float32))
    single = numel == 1  # torch's norm of one element is |d|: the root of the op's exact square
    norms[single] = np.sqrt(sq[single]).astype(np.float32)
    if normalize:
        with np.errstate(divide="ignore", invalid="ignore"):
            if xs[0].device.type == "cuda":
                norms = norms * (np.float32(1.0) / numel)
            else:
                norms = norms / numel
    return norms.astype(np.float64).tolist()


def selected_to_numpy(
    names: list[str], xs: Sequence[Tensor], keep: list[int], sharded: ShardedState | None
) -> tuple[NDArrays, list[str]]:
    """The kept layers as numpy arrays; sharded ones gathered to full size (one collective for all)."""
    kept_names = [names[i] for i in keep]
    kept = ops.take(xs, keep) if sharded is None else full_model_tensors(sharded, keep)
    return to_numpy(kept_names, kept), kept_names
