"""layersel_ext: fused C++/CUDA drop-in for ``fl4health.parameter_exchange.parameter_selection_criteria``.

Same names, signatures and answers as fl4health 0.4.2; see README.md for the deliberate differences.
"""

from __future__ import annotations

from . import _dtensor_ops  # hands ops its DTensor handlers' installer (ops.enable_dtensor_ops)
from ._loader import LOAD_REASON, build_record
from ._masks import is_masked_module
from .ops import backend, set_backend
from .parameter_selection_criteria import (
    SCORE_FUNCTION_NAMES,
    LayerSelectionFunctionConstructor,
    largest_final_magnitude_scores,
    largest_increase_in_magnitude_scores,
    largest_magnitude_change_scores,
    layer_drift_norms,
    select_layers_by_percentage,
    select_layers_by_threshold,
    select_scores_and_sample_masks,
    smallest_final_magnitude_scores,
    smallest_increase_in_magnitude_scores,
    smallest_magnitude_change_scores,
)
from .sparse_coo import SparseCooParameterExchanger, select_sparse_parameters

__version__ = "0.1.0"

# DTensor exists already: its handlers for our ops (else nothing: they follow when a DTensor turns up).
_dtensor_ops.install()

__all__ = [
    "LOAD_REASON",
    "SCORE_FUNCTION_NAMES",
    "LayerSelectionFunctionConstructor",
    "SparseCooParameterExchanger",
    "backend",
    "build_record",
    "is_masked_module",
    "largest_final_magnitude_scores",
    "largest_increase_in_magnitude_scores",
    "largest_magnitude_change_scores",
    "layer_drift_norms",
    "select_layers_by_percentage",
    "select_layers_by_threshold",
    "select_scores_and_sample_masks",
    "select_sparse_parameters",
    "set_backend",
    "smallest_final_magnitude_scores",
    "smallest_increase_in_magnitude_scores",
    "smallest_magnitude_change_scores",
]
