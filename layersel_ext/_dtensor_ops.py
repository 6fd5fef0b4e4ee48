"""``torch.ops.layersel.*`` called directly on DTensors: each op returns, on every rank, what it returns
for the unsharded tensors (plain tensors, the same on every rank), computed by the sharded paths
(``_sharded_scores``, ``_sharded_masks``, ``_sharded_select``: local kernels and a few small
collectives; what each op communicates is in the README).

Why handlers and not sharding strategies: every op takes lists of tensors and returns results that
mix them (per-dtype concatenations of scores, one flat mask vector, per-entry sums, a k-th largest
over all tensors). None of these is a DTensor placement of its inputs, so DTensor's sharding
propagation (``register_sharding``: output placements derived from input placements, then the op
on local shards) cannot express them; a handler runs the same reductions the public functions run.
The handlers sit in DTensor's op-dispatcher table (``_custom_op_handlers``, the hook torch's own
loss-parallel and convolution support use), installed by ``install`` once ``torch.distributed.tensor``
is imported (layersel_ext never imports it): at import of layersel_ext when it already is, when a
public function first meets a DTensor, or by ``layersel_ext.ops.enable_dtensor_ops()``. This module
sits above ``ops`` (the handlers call its wrappers on the local shards), so it hands ``install`` to
``ops`` when imported (the package imports it) instead of ``ops`` importing it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _checks, _sharded_masks, _sharded_scores, _sharded_select, ops
from ._bits import pack_bits
from ._collectives import gather_full
from ._score_kinds import ScoreKind, uses_initial
from ._shard_layout import ShardedState, meta_like

_installed = False


def _names(n: int) -> list[str]:
    return [f"#{i}" for i in range(n)]


def _what(op: str) -> str:
    return f"layersel::{op} (DTensor)"


def _initial(initial: Sequence[Tensor]) -> list[Tensor] | None:
    return list(initial) if len(initial) else None


def _state(
    op: str,
    model: Sequence[Tensor],
    initial: Sequence[Tensor],
    needs_initial: bool,
    layout: str = "either",
    arguments: Sequence[tuple[str, object]] = (),
) -> ShardedState:
    """The sharded state of an op's lists, after the op's own length checks (the same on every rank,
    before any collective), with the ranks' agreement on the call (``arguments``: the op's own)."""
    if needs_initial or len(initial):
        _checks.check_lengths(op, model, initial)
    return ShardedState(_names(len(model)), list(model), _initial(initial), _what(op), layout, arguments)


def _refuse_counters(op: str, counters: object) -> None:
    if counters is not None:
        raise NotImplementedError(
            f"layersel::{op}: counters place local tensors in a stream; with DTensors leave them out "
            "(each shard takes its unsharded indices by itself)"
        )


def drift_sq_norms(model: list[Tensor], initial: list[Tensor]) -> Tensor:
    state = _state("drift_sq_norms", model, initial, needs_initial=True)
    return torch.from_numpy(_sharded_scores.drift_sq_norms(state)).to(state.local_x[0].device)


def scores(model: list[Tensor], initial: list[Tensor], kind: int) -> list[Tensor]:
    """The unsharded op's per-dtype buffers: local scores, then ONE all-gather of the sharded entries'."""
    state = _state("scores", model, initial, uses_initial(kind), "model", [("kind", kind)])
    local = ops.scores(state.local_x, state.local_y, kind)
    carriers = [meta_like(x, s.dtype) for x, s in zip(state.xs, local)]
    full = gather_full(state.mesh, state.names, carriers, local, state.dims, state.plain)
    order = list(dict.fromkeys(s.dtype for s in full))  # dtypes in order of first appearance
    return [torch.cat([s.reshape(-1) for s in full if s.dtype == dt]) for dt in order]


def sample_masks(
    scores: list[Tensor], seed: int, dtype: torch.dtype, key_by_scores: bool = False, counters: object = None
) -> Tensor:
    _refuse_counters("sample_masks", counters)
    if dtype not in ops._KERNEL_MASK_DTYPES:  # the op's own rule (the wrappers widen other dtypes)
        raise TypeError(f"layersel::sample_masks: mask dtype must be uint8, int8, int16, int32 or int64, got {dtype}")
    flat = _sharded_masks.sample_masks(
        _names(len(scores)), list(scores), seed % 2**64, key_by_scores, _what("sample_masks"), [("dtype", dtype)]
    )
    return flat.to(dtype)


def sample_mask_bits(scores: list[Tensor], seed: int, key_by_scores: bool = False) -> Tensor:
    what = _what("sample_mask_bits")
    return pack_bits(_sharded_masks.sample_masks(_names(len(scores)), list(scores), seed % 2**64, key_by_scores, what))


def score_fingerprint(scores: list[Tensor], counters: object = None) -> Tensor:
    _refuse_counters("score_fingerprint", counters)
    return _sharded_masks.score_fingerprint(_names(len(scores)), list(scores), _what("score_fingerprint"))


def kth_largest_score(
    model: list[Tensor], initial: list[Tensor], kind: int, k: int, score_dtype: torch.dtype
) -> Tensor:
    needs = kind == ScoreKind.GIVEN or uses_initial(kind)
    arguments = [("kind", kind), ("k", k), ("score_dtype", score_dtype)]
    state = _state("kth_largest_score", model, initial, needs, arguments=arguments)
    return _sharded_select.kth_largest_score(state, kind, k, score_dtype)


def sparse_extract(
    model: list[Tensor], initial: list[Tensor], kind: int, thresholds: list[float]
) -> tuple[list[Tensor], list[Tensor]]:
    arguments = [("kind", kind), ("thresholds", tuple(thresholds))]
    state = _state("sparse_extract", model, initial, uses_initial(kind), arguments=arguments)
    return _sharded_select.sparse_extract(state, kind, thresholds)


def sparse_select(
    model: list[Tensor], initial: list[Tensor], kind: int, k: int, score_dtype: torch.dtype
) -> tuple[list[Tensor], list[Tensor]]:
    if not score_dtype.is_floating_point:  # the op's dtype rules (csrc/common/op_checks.h)
        raise TypeError(f"layersel::sparse_select: score dtype {score_dtype} is not floating point")
    for t, x in enumerate(model):
        integer = not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != torch.bool
        if x.dtype != score_dtype and not (score_dtype == torch.float32 and integer):
            also = " or an integer dtype" if score_dtype == torch.float32 else ""
            raise TypeError(
                f"layersel::sparse_select: tensor #{t} has dtype {x.dtype}; with {score_dtype} scores every tensor "
                f"must be {score_dtype}{also}"
            )
    # One state (one agreement check) for both steps.
    needs = kind == ScoreKind.GIVEN or uses_initial(kind)
    arguments = [("kind", kind), ("k", k), ("score_dtype", score_dtype)]
    state = _state("sparse_select", model, initial, needs, arguments=arguments)
    threshold = float(_sharded_select.kth_largest_score(state, kind, k, score_dtype))
    return _sharded_select.sparse_extract(state, kind, [threshold] * len(model))


_HANDLERS = {
    "drift_sq_norms": drift_sq_norms,
    "scores": scores,
    "sample_masks": sample_masks,
    "sample_mask_bits": sample_mask_bits,
    "score_fingerprint": score_fingerprint,
    "kth_largest_score": kth_largest_score,
    "sparse_extract": sparse_extract,
    "sparse_select": sparse_select,
}


def install() -> bool:
    """Put the handlers in DTensor's op-dispatcher table (once); False while ``torch.distributed.tensor``
    is not imported or the compiled ops are not loaded (then there is no op to call)."""
    global _installed
    if _installed:
        return True
    module = sys.modules.get("torch.distributed.tensor")
    if module is None or not hasattr(torch.ops, "layersel") or not hasattr(torch.ops.layersel, "scores"):
        return False
    table = module.DTensor._op_dispatcher._custom_op_handlers
    for name, fn in _HANDLERS.items():
        table[getattr(torch.ops.layersel, name).default] = lambda op_call, args, kwargs, fn=fn: fn(*args, **kwargs)
    _installed = True
    return True


ops.register_dtensor_installer(install)
