"""fl4health's sparse COO selection, fused: ``select_sparse_parameters`` and a drop-in
``SparseCooParameterExchanger`` (importable without fl4health).

fl4health scores every parameter, concatenates all scores, sorts them (13.8 s for 108M floats on a
2-core machine), runs ``torch.unique`` per tensor and extracts COO entries tensor by tensor. Here,
with one of the six score functions (ours or fl4health's), scoring, the exact k-th largest score
(radix select) and the extraction are fused kernels that never materialise the scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import reduce
from typing import Any, Optional

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from . import _sharded_select, ops
from . import parameter_selection_criteria as psc
from ._checks import explain_failure
from ._host import to_numpy
from ._model_state import paired_state, single_state, state_items
from ._score_kinds import ScoreKind, uses_initial
from ._shard_layout import ShardedState, sharded_state

NDArrays = list[NDArray[Any]]
ScoreGenFunction = Callable[[nn.Module, Optional[nn.Module]], dict[str, Tensor]]
SparseSelection = tuple[NDArrays, tuple[NDArrays, NDArrays, list[str]]]
# (values, flat offsets, shapes, names): select_sparse_offsets, the compact wire's form.
FlatSelection = tuple[list[Tensor], list[Tensor], list[tuple[int, ...]], list[str]]

_FL4HEALTH_MODULE = "fl4health.parameter_exchange.parameter_selection_criteria"


def fused_kind(score_gen_function: Callable[..., Any]) -> ScoreKind | None:
    """The score formula when the function is one of the six (ours or fl4health's), else None."""
    name = getattr(score_gen_function, "__name__", None)
    if name not in psc.SCORE_FUNCTION_NAMES:
        return None
    kind = ScoreKind(psc.SCORE_FUNCTION_NAMES.index(name))
    if score_gen_function is getattr(psc, name) or getattr(score_gen_function, "__module__", "") == _FL4HEALTH_MODULE:
        return kind
    return None


def _comparison_threshold(threshold: float, score_dtype: torch.dtype) -> float | int:
    """The value torch compares with in ``scores >= threshold``: the threshold cast to the score dtype
    (floating scores) or to float32 (integer scores against a float threshold); an integer threshold
    against integer scores (all-integer models) is compared exactly."""
    if isinstance(threshold, int) and not score_dtype.is_floating_point:
        return threshold
    dtype = score_dtype if score_dtype.is_floating_point else torch.float32
    return float(torch.tensor(threshold, dtype=torch.float64).to(dtype).item())


def _threshold_then_extract(
    kind: int,
    top: int,
    xs: list[Tensor],
    ys: list[Tensor] | None,
    sharded: ShardedState | None,
    promoted: torch.dtype,
    score_dtypes: list[torch.dtype],
) -> tuple[list[Tensor], list[Tensor]]:
    """The k-th largest score (over every rank's shards when sharded), then the extraction against it,
    compared in each tensor's score dtype as torch compares."""
    if sharded is not None:
        kth = _sharded_select.kth_largest_score(sharded, kind, top, promoted)
    elif kind != ScoreKind.GIVEN:
        kth = ops.kth_largest_score(xs, ys, kind, top, promoted)
    else:
        # Custom scores as given; bool ones (fl4health sorts them too) as their 0/1 bytes.
        given = [y.view(torch.uint8) if y.dtype == torch.bool else y for y in ys]  # type: ignore[union-attr]
        kth_dtype = torch.uint8 if promoted == torch.bool else promoted
        kth = ops.kth_largest_score(given, given, kind, top, kth_dtype)
    threshold = kth.item()
    if promoted == torch.bool:
        threshold = bool(threshold)
    # Once per distinct dtype (a host round trip through torch each), not once per tensor.
    by_dtype = {dt: _comparison_threshold(threshold, dt) for dt in set(score_dtypes)}
    thresholds = [by_dtype[dt] for dt in score_dtypes]
    if sharded is not None:
        return _sharded_select.sparse_extract(sharded, kind, thresholds)
    return ops.sparse_extract(xs, ys, kind, thresholds)


def select_sparse_parameters(
    model: nn.Module,
    initial_model: nn.Module | None,
    sparsity_level: float,
    score_gen_function: ScoreGenFunction,
) -> SparseSelection:
    """
    Exactly what fl4health's ``SparseCooParameterExchanger.select_parameters`` returns.

    Keeps every parameter whose score is >= the k-th largest score over all state_dict entries
    (k = ceil(N * sparsity_level); ties at the threshold included), drops kept values that are
    exactly 0, and drops 0-d tensors and tensors left with nothing.

    Returns:
        (values, (indices, shapes, names)): per kept tensor its kept values (1-D, the tensor's dtype),
        their indices (N x ndim, int64, row-major), its shape (int64) and its state_dict name.
    """
    names, xs, values, indices, _ = _select(model, initial_model, sparsity_level, score_gen_function, flat=False)
    kept = [i for i, v in enumerate(values) if v.numel() > 0 and xs[i].dim() > 0]
    kept_names = [names[i] for i in kept]
    # Values and indices of every kept tensor to the host together: zero-copy on the CPU, one
    # batched transfer (one sync) from a GPU instead of two per tensor.
    host = to_numpy(kept_names * 2, [values[i] for i in kept] + [indices[i] for i in kept])
    return (
        host[: len(kept)],
        (host[len(kept) :], [np.array(list(xs[i].shape)) for i in kept], kept_names),
    )


def select_sparse_offsets(
    model: nn.Module,
    initial_model: nn.Module | None,
    sparsity_level: float,
    score_gen_function: ScoreGenFunction,
) -> FlatSelection:
    """
    ``select_sparse_parameters``' selection in the compact COO wire's form (``wire_coo``'s
    ``CompactCooPacker.pack_offsets``): the same tensors, entries and order, with flat row-major
    offsets in place of the int64 [N, ndim] indices.

    On the CPU with the compiled backend (a fused score function over one floating dtype) one kernel
    writes the offsets, never the indices, and every tensor's values into one buffer in the wire's
    order (``ops.sparse_select_offsets``); elsewhere the offsets are the indices flattened on their
    device before they come to the host.

    Returns:
        (values, offsets, shapes, names): per kept tensor its kept values (1-D CPU tensor, the
        tensor's dtype), their flat offsets (1-D int64 CPU tensor), its shape and its state_dict name.
    """
    names, xs, values, positions, flat = _select(model, initial_model, sparsity_level, score_gen_function, flat=True)
    kept = [i for i, v in enumerate(values) if v.numel() > 0 and xs[i].dim() > 0]
    kept_names = [names[i] for i in kept]
    shapes = [tuple(xs[i].shape) for i in kept]
    if flat:
        return [values[i] for i in kept], [positions[i] for i in kept], shapes, kept_names
    offsets = [_flatten(positions[i], shape) for i, shape in zip(kept, shapes)]
    host = to_numpy(kept_names * 2, [values[i] for i in kept] + offsets)
    return (
        [torch.from_numpy(a) for a in host[: len(kept)]],
        [torch.from_numpy(a) for a in host[len(kept) :]],
        shapes,
        kept_names,
    )


def _flatten(indices: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Flat row-major offsets (int64 [N]) of int64 [N, ndim] indices inside ``shape``, on their device."""
    if indices.shape[1] == 1:
        return indices[:, 0]
    strides = torch.tensor([math.prod(shape[d + 1 :]) for d in range(len(shape))], dtype=torch.int64)
    return (indices * strides.to(indices.device)).sum(1)


def _select(
    model: nn.Module,
    initial_model: nn.Module | None,
    sparsity_level: float,
    score_gen_function: ScoreGenFunction,
    flat: bool,
) -> tuple[list[str], Any, list[Tensor], list[Tensor], bool]:
    """(names, the model's tensors, per tensor its kept values and positions, whether the positions are
    flat offsets): int64 [N, ndim] indices, or with ``flat`` where one kernel writes them, int64 [N]
    offsets. Every tensor of the state (or of the custom scores), kept ones or not."""
    if not 0 < sparsity_level <= 1:
        raise ValueError(f"sparsity_level must be in (0, 1], got {sparsity_level}")
    what = "select_sparse_parameters"
    fused = fused_kind(score_gen_function)
    # Scores come from formula `kind` of (xs, ys): one of the six on (model, initial), or, for a
    # custom score function, ScoreKind.GIVEN with ys the scores it returned.
    if fused is not None:
        kind = fused
        if uses_initial(kind):
            names, xs, y_list = paired_state(model, initial_model, what)
            ys: list[Tensor] | None = y_list
        else:
            (names, xs), ys = single_state(model, what), None
        score_dtypes = ops.dtypes(xs)
    else:
        kind = ScoreKind.GIVEN
        score_dict = score_gen_function(model, initial_model)
        names = list(score_dict)
        states = dict(state_items(model))
        missing = [n for n in names if n not in states]
        if missing:
            raise KeyError(f"{what}: score for {missing[0]!r}, which is not in the model's state_dict")
        xs = [states[n] for n in names]
        ys = [score_dict[n] for n in names]
        for n, x, sc in zip(names, xs, ys):
            if x.shape != sc.shape:
                raise ValueError(f"layer {n!r}: shape {tuple(x.shape)} in model but its scores have {tuple(sc.shape)}")
        score_dtypes = [sc.dtype for sc in ys]

    total = sum(ops.numels(xs))
    top = math.ceil(total * sparsity_level)
    if top < 1:
        raise ValueError(f"{what}: no parameter would be selected ({total} scores, sparsity {sparsity_level})")
    try:
        promoted = reduce(torch.promote_types, score_dtypes)  # the dtype torch.cat gives the scores
    except RuntimeError as exc:  # a quantized dtype has no promotion: name its layer, as the kernels' checks do
        explain_failure(exc, names, xs, ys if fused is None or uses_initial(kind) else None, what, given=fused is None)
    # Sharded state (FSDP2, DTensor): the same two steps across ranks (_sharded_select), every rank gets every array.
    function = fused.name if fused is not None else getattr(score_gen_function, "__qualname__", "a custom function")
    arguments = [("sparsity_level", sparsity_level), ("score_gen_function", function), ("k", top)]
    sharded = sharded_state(names, xs, ys, what, arguments)
    if sharded is not None and sharded.mesh.world == 1:  # one rank: its local tensors are the whole model
        xs, ys, sharded = sharded.local_x, sharded.local_y, None
    try:
        # Fused scores of one floating dtype (float32 beside integer buffers too), one process: the k-th
        # largest and the extraction in one kernel where there is one (a large model read once); else two steps.
        one_go = None
        if fused is not None and sharded is None:
            offsets = ops.sparse_select_offsets(xs, ys, kind, top) if flat else None
            if offsets is not None:
                return names, xs, offsets[0], offsets[1], True
            one_go = ops.sparse_select(xs, ys, kind, top)
        values, indices = one_go or _threshold_then_extract(kind, top, xs, ys, sharded, promoted, score_dtypes)
    except (RuntimeError, ValueError, TypeError) as exc:
        explain_failure(exc, names, xs, ys if fused is not None and uses_initial(kind) else None, what)
    return names, xs, values, indices, False


class SparseCooParameterExchanger:
    """Drop-in for ``fl4health.parameter_exchange.sparse_coo_parameter_exchanger.SparseCooParameterExchanger``:
    same constructor, ``select_parameters``, ``push_parameters``, ``pull_parameters`` and packing format."""

    def __init__(self, sparsity_level: float, score_gen_function: ScoreGenFunction) -> None:
        if not 0 < sparsity_level <= 1:
            raise ValueError(f"sparsity_level must be in (0, 1], got {sparsity_level}")
        self.sparsity_level = sparsity_level
        self.score_gen_function = score_gen_function

    def generate_parameter_scores(self, model: nn.Module, initial_model: nn.Module | None) -> dict[str, Tensor]:
        return self.score_gen_function(model, initial_model)

    def select_parameters(self, model: nn.Module, initial_model: nn.Module | None = None) -> SparseSelection:
        return select_sparse_parameters(model, initial_model, self.sparsity_level, self.score_gen_function)

    @staticmethod
    def pack_parameters(
        model_weights: NDArrays, additional_parameters: tuple[NDArrays, NDArrays, list[str]]
    ) -> NDArrays:
        indices, shapes, names = additional_parameters
        return model_weights + indices + shapes + [np.array(names)]

    @staticmethod
    def unpack_parameters(packed_parameters: NDArrays) -> tuple[NDArrays, tuple[NDArrays, NDArrays, list[str]]]:
        if len(packed_parameters) % 3 != 1:
            raise ValueError(f"packed sparse parameters must have 3n + 1 arrays, got {len(packed_parameters)}")
        n = (len(packed_parameters) - 1) // 3
        names = packed_parameters[3 * n :][0].tolist()
        return packed_parameters[:n], (packed_parameters[n : 2 * n], packed_parameters[2 * n : 3 * n], names)

    def push_parameters(self, model: nn.Module, initial_model: nn.Module | None = None, config: Any = None) -> NDArrays:
        values, additional = self.select_parameters(model, initial_model)
        return self.pack_parameters(values, additional)

    def pull_parameters(self, parameters: NDArrays, model: nn.Module, config: Any = None) -> None:
        values, (indices, shapes, names) = self.unpack_parameters(parameters)
        if not (len(values) == len(indices) == len(shapes) == len(names) and len(names) > 0):
            raise ValueError("packed sparse parameters are empty or inconsistent")
        state = model.state_dict()
        for v, idx, shape, name in zip(values, indices, shapes, names):
            coo = torch.sparse_coo_tensor(indices=torch.tensor(idx.T), values=torch.tensor(v), size=torch.Size(shape))
            state[name] = coo.to_dense()
        model.load_state_dict(state, strict=True)
