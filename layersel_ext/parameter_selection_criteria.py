"""Drop-in replacement for ``fl4health.parameter_exchange.parameter_selection_criteria``.

Same names, signatures, return types and answers as fl4health 0.4.2 (see README for the few
deliberate differences), computed by fused kernels: one pass over all layers, one device sync.
Change ``from fl4health.parameter_exchange.parameter_selection_criteria import X`` to
``from layersel_ext.parameter_selection_criteria import X``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Optional

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from . import ops
from ._checks import explain_failure
from ._drift import drift_norms, selected_to_numpy, selection_drifts, unsure_against, unsure_in_order
from ._masks import MaskDtype, mask_arrays, sample_flat_masks
from ._model_state import paired_state, single_state
from ._score_kinds import ScoreKind, uses_initial
from ._shard_layout import has_dtensor, sharded_state
from ._sharded_scores import scores as sharded_scores

NDArrays = list[NDArray[Any]]
LayerSelectionFunction = Callable[[nn.Module, Optional[nn.Module]], tuple[NDArrays, list[str]]]

# The six score functions, in score-kind order (csrc/common/scores.h).
SCORE_FUNCTION_NAMES = (
    "largest_final_magnitude_scores",
    "smallest_final_magnitude_scores",
    "largest_magnitude_change_scores",
    "smallest_magnitude_change_scores",
    "largest_increase_in_magnitude_scores",
    "smallest_increase_in_magnitude_scores",
)

__all__ = [
    "SCORE_FUNCTION_NAMES",
    "LayerSelectionFunctionConstructor",
    "largest_final_magnitude_scores",
    "largest_increase_in_magnitude_scores",
    "largest_magnitude_change_scores",
    "layer_drift_norms",
    "select_layers_by_percentage",
    "select_layers_by_threshold",
    "select_scores_and_sample_masks",
    "smallest_final_magnitude_scores",
    "smallest_increase_in_magnitude_scores",
    "smallest_magnitude_change_scores",
]


class LayerSelectionFunctionConstructor:
    def __init__(
        self, norm_threshold: float, exchange_percentage: float, normalize: bool = True, select_drift_more: bool = True
    ) -> None:
        """
        This class leverages ``functools.partial`` to construct layer selection functions, which are meant to be used
        by the ``DynamicLayerExchanger`` class.

        Args:
            norm_threshold (float): A positive real number used to select those layers whose drift in l2 norm
                exceeds (or falls short of) it.
            exchange_percentage (float): Indicates the percentage of layers that are selected, in (0, 1].
            normalize (bool, optional): Indicates whether when calculating the norm of a layer, we also divide by the
                number of parameters in that layer. Defaults to True.
            select_drift_more (bool, optional): Indicates whether layers with larger drift norm are selected.
                Defaults to True.

        Raises:
            ValueError: ``exchange_percentage`` outside (0, 1] or ``norm_threshold`` <= 0 (fl4health: AssertionError).
        """
        if not 0 < exchange_percentage <= 1:
            raise ValueError(f"exchange_percentage must be in (0, 1], got {exchange_percentage}")
        if not norm_threshold > 0:
            raise ValueError(f"norm_threshold must be > 0, got {norm_threshold}")
        self.norm_threshold = norm_threshold
        self.exchange_percentage = exchange_percentage
        self.normalize = normalize
        self.select_drift_more = select_drift_more

    def select_by_threshold(self) -> LayerSelectionFunction:
        return partial(select_layers_by_threshold, self.norm_threshold, self.normalize, self.select_drift_more)

    def select_by_percentage(self) -> LayerSelectionFunction:
        return partial(select_layers_by_percentage, self.exchange_percentage, self.normalize, self.select_drift_more)


# ---------------------------------------------------------------------------------------------- drift norms


def layer_drift_norms(model: nn.Module, initial_model: nn.Module, normalize: bool = True) -> dict[str, float]:
    """
    Drift of every state_dict entry in one call (one fused pass, one device sync).

    Args:
        model (nn.Module): Model after training/modification.
        initial_model (nn.Module): Model that we started with.
        normalize (bool, optional): Divide each norm by the entry's number of elements. Defaults to True.

    Returns:
        (dict[str, float]): state_dict name -> the float fl4health's ``_calculate_drift_norm`` gives
        (the L2 norm of ``(t1 - t2).float()``, in float32, optionally divided by numel), in state_dict order.
    """
    what = "layer_drift_norms"
    names, xs, ys = paired_state(model, initial_model, what)
    sharded = sharded_state(names, xs, ys, what, [("normalize", normalize)])
    return dict(zip(names, drift_norms(names, xs, ys, normalize, what, sharded)))


def select_layers_by_threshold(
    threshold: float,
    normalize: bool,
    select_drift_more: bool,
    model: nn.Module,
    initial_model: nn.Module,
) -> tuple[NDArrays, list[str]]:
    """
    Return those layers of model that deviate (in l2 norm) away from corresponding layers of
    ``initial_model`` by more than (or at most) ``threshold``.

    Args:
        threshold (float): Drift threshold to be used for selection. It is an fixed value.
        normalize (bool): Whether to divide the difference between the tensors by their number of elements.
        select_drift_more (bool): Whether we are selecting parameters that have drifted further (True) or less far
            from their comparison values
        model (nn.Module): Model after training/modification.
        initial_model (nn.Module): Model that we started with to which we are comparing parameters.

    Returns:
        (tuple[NDArrays, list[str]]): Layers selected by the process and their corresponding names in the model's
        ``state_dict``.
    """
    what = "select_layers_by_threshold"
    names, xs, ys = paired_state(model, initial_model, what)
    arguments = [("threshold", threshold), ("normalize", normalize), ("select_drift_more", select_drift_more)]
    sharded = sharded_state(names, xs, ys, what, arguments)
    drifts = selection_drifts(names, xs, ys, normalize, what, sharded, unsure_against(threshold))
    if select_drift_more:
        keep = [i for i, d in enumerate(drifts) if d > threshold]
    else:
        keep = [i for i, d in enumerate(drifts) if d <= threshold]
    return selected_to_numpy(names, xs, keep, sharded)


def select_layers_by_percentage(
    exchange_percentage: float,
    normalize: bool,
    select_drift_more: bool,
    model: nn.Module,
    initial_model: nn.Module,
) -> tuple[NDArrays, list[str]]:
    """
    Return the ``ceil(n * exchange_percentage)`` layers of model that drifted most (or least) from
    ``initial_model``; ties keep state_dict order (a stable sort, as fl4health's).

    Returns:
        (tuple[NDArrays, list[str]]): Layers selected by the process and their corresponding names in the model's
        ``state_dict``.
    """
    what = "select_layers_by_percentage"
    names, xs, ys = paired_state(model, initial_model, what)
    arguments = [("exchange_percentage", exchange_percentage), ("normalize", normalize),
                 ("select_drift_more", select_drift_more)]  # fmt: skip
    sharded = sharded_state(names, xs, ys, what, arguments)
    drifts = selection_drifts(names, xs, ys, normalize, what, sharded, unsure_in_order)
    count = math.ceil(len(names) * exchange_percentage)
    order = sorted(range(len(names)), key=lambda i: drifts[i], reverse=select_drift_more)[:count]
    return selected_to_numpy(names, xs, order, sharded)


# ---------------------------------------------------------------------------------------------- scores


def _score_dict(kind: int, model: nn.Module, initial_model: nn.Module | None, what: str) -> dict[str, Tensor]:
    if uses_initial(kind):
        names, xs, y_list = paired_state(model, initial_model, what)
        ys: list[Tensor] | None = y_list
    else:
        (names, xs), ys = single_state(model, what), None
    if has_dtensor(xs, ys):  # a DTensor entry gives a DTensor of local-shard scores
        return dict(zip(names, sharded_scores(names, xs, ys, kind, what)))
    try:
        return dict(zip(names, ops.scores(xs, ys, kind)))
    except (RuntimeError, ValueError, TypeError) as exc:
        explain_failure(exc, names, xs, ys, what)


def largest_final_magnitude_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, Tensor]:
    """``|x|`` for every state_dict entry (``initial_model`` may be None)."""
    return _score_dict(ScoreKind.LARGEST_FINAL_MAGNITUDE, model, initial_model, "largest_final_magnitude_scores")


def smallest_final_magnitude_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, Tensor]:
    """``-|x|`` for every state_dict entry (``initial_model`` may be None)."""
    return _score_dict(ScoreKind.SMALLEST_FINAL_MAGNITUDE, model, initial_model, "smallest_final_magnitude_scores")


def largest_magnitude_change_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, Tensor]:
    """``|x - x0|`` for every state_dict entry."""
    return _score_dict(ScoreKind.LARGEST_MAGNITUDE_CHANGE, model, initial_model, "largest_magnitude_change_scores")


def smallest_magnitude_change_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, Tensor]:
    """``-|x - x0|`` for every state_dict entry."""
    return _score_dict(ScoreKind.SMALLEST_MAGNITUDE_CHANGE, model, initial_model, "smallest_magnitude_change_scores")


def largest_increase_in_magnitude_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, Tensor]:
    """``|x| - |x0|`` for every state_dict entry."""
    return _score_dict(
        ScoreKind.LARGEST_INCREASE_IN_MAGNITUDE, model, initial_model, "largest_increase_in_magnitude_scores"
    )


def smallest_increase_in_magnitude_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, Tensor]:
    """``-(|x| - |x0|)`` for every state_dict entry."""
    return _score_dict(
        ScoreKind.SMALLEST_INCREASE_IN_MAGNITUDE, model, initial_model, "smallest_increase_in_magnitude_scores"
    )


# ---------------------------------------------------------------------------------------------- FedPM masks


def select_scores_and_sample_masks(
    model: nn.Module,
    initial_model: nn.Module | None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    mask_dtype: MaskDtype = np.int64,
) -> tuple[NDArrays, list[str]]:
    """
    Selection function that first selects the ``weight_scores`` and ``bias_scores`` parameters for the masked layers,
    and then samples binary masks based on those scores to send to the server. This function is meant to be used for
    the FedPM algorithm.

    Args:
        model (nn.Module): The model (a masked layer itself, or a model containing masked layers).
        initial_model (nn.Module | None): Unused (FedPM passes None).
        seed (int, optional): Philox key; the same seed gives the same masks on CPU and CUDA.
        generator (torch.Generator, optional): Where to draw a seed from when ``seed`` is None
            (default: torch's default generator, so ``torch.manual_seed`` reproduces a round). The
            key is then derived from that draw and a fingerprint of the scores, so that clients
            seeded alike (fl4health's examples seed every client with 42) but holding different
            scores sample independent masks.
        mask_dtype (optional): Integer dtype of the masks (numpy or torch). Defaults to int64, as fl4health.

    Returns:
        (tuple[NDArrays, list[str]]): One 0/1 mask per score tensor, with the score's exact shape, and its
        state_dict name.
    """
    names, scores, flat = sample_flat_masks(model, seed=seed, generator=generator, dtype=mask_dtype)
    if flat is None:
        return [], []
    return mask_arrays(scores, flat, mask_dtype), names
