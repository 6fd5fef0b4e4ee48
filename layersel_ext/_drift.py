"""Layer drift as fl4health computes it, and the layers a drift selection keeps as numpy arrays.

The work behind ``layer_drift_norms`` and ``select_layers_by_threshold`` / ``_by_percentage``: one
fused op and one sync for every entry's squared drift (sharded state: local sums and one
all-reduce, ``_sharded_scores``), fl4health's float32 rounding of the norm on the host, then the kept
layers to the host together (sharded ones gathered in one collective first, ``_collectives``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    return _norms(sq, numel, normalize, xs[0].device.type == "cuda").tolist()


def _norms(sq: np.ndarray, numel: np.ndarray, normalize: bool, cuda: bool) -> np.ndarray:
    """The drifts (float64, the float32 values as Python floats hold them) of float64 squared sums."""
    with np.errstate(over="ignore"):
        norms = np.sqrt(sq.astype(np.float32))
    single = numel == 1  # torch's norm of one element is |d|: the root of the op's exact square
    norms[single] = np.sqrt(sq[single]).astype(np.float32)
    if normalize:
        with np.errstate(divide="ignore", invalid="ignore"):
            if cuda:
                norms = norms * (np.float32(1.0) / numel)
            else:
                norms = norms / numel
    return norms.astype(np.float64)


Unsure = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def selection_drifts(
    names: list[str],
    xs: Sequence[Tensor],
    ys: Sequence[Tensor],
    normalize: bool,
    what: str,
    sharded: ShardedState | None,
    unsure: Unsure,
) -> list[float]:
    """Drifts for a selection, which compares them and returns none: ``drift_norms``' values, or where
    the torch backend bounds the squared sums (``ops.drift_sq_bounds``, large CPU tensors) values
    that the selection's comparisons treat exactly as those. ``unsure(lo, hi, estimated)`` marks the
    estimated entries whose drift bounds [lo, hi] do not settle what the selection asks of them; they
    get their exact drifts (one more op, on them alone). The drift function is monotone in the
    squared sum, so bounds on the sum bound the drift."""
    bounds = None
    if sharded is None:
        try:
            bounds = ops.drift_sq_bounds(xs, ys)
        except (RuntimeError, ValueError, TypeError) as exc:
            explain_failure(exc, names, xs, ys, what)
    if bounds is None:
        return drift_norms(names, xs, ys, normalize, what, sharded)
    est, err = (b.cpu().numpy() for b in bounds)
    numel = np.array(ops.numels(xs), dtype=np.float32)
    drifts = _norms(est, numel, normalize, False)
    with np.errstate(invalid="ignore"):
        lo = _norms(est * (1 - err), numel, normalize, False)
        hi = _norms(est * (1 + err), numel, normalize, False)
    estimated = (err > 0) & (lo != hi)  # bounds that meet are the exact drift (a frozen layer's 0, say)
    redo = np.flatnonzero(estimated & (~np.isfinite(est) | unsure(lo, hi, estimated)))
    if redo.size:
        exact = ops.drift_sq_norms(ops.take(xs, redo), ops.take(ys, redo)).cpu().numpy()
        drifts[redo] = _norms(exact, numel[redo], normalize, False)
    return drifts.tolist()


def unsure_against(threshold: float) -> Unsure:
    """Entries whose bounds lie on both sides of ``threshold`` (``drift > threshold`` is the question)."""
    return lambda lo, hi, estimated: (lo > threshold) != (hi > threshold)


def unsure_in_order(lo: np.ndarray, hi: np.ndarray, estimated: np.ndarray) -> np.ndarray:
    """Estimated entries whose bounds meet another entry's: the others' order is settled by the bounds
    (an estimate, or an exact drift, lies inside its own), and equal drifts, ties kept in state_dict
    order, are exact values on both sides."""
    n = len(lo)
    if not estimated.any():
        return np.zeros(n, dtype=bool)
    # In the order of the lower bounds (n log n, no n x n matrix on a model of many large tensors), an
    # entry meets an earlier one when the highest upper bound before it reaches its lower bound, and a
    # later one when the next lower bound is within its upper bound.
    order = np.argsort(lo, kind="stable")
    los, his = lo[order], hi[order]
    before = np.concatenate([[-np.inf], np.maximum.accumulate(his)[:-1]])
    after = np.concatenate([los[1:] <= his[:-1], [False]])
    meets = np.empty(n, dtype=bool)
    meets[order] = (before >= los) | after
    return meets & estimated


def selected_to_numpy(
    names: list[str], xs: Sequence[Tensor], keep: list[int], sharded: ShardedState | None
) -> tuple[NDArrays, list[str]]:
    """The kept layers as numpy arrays; sharded ones gathered to full size (one collective for all)."""
    kept_names = [names[i] for i in keep]
    kept = ops.take(xs, keep) if sharded is None else full_model_tensors(sharded, keep)
    return to_numpy(kept_names, kept), kept_names
