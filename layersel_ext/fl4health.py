"""Make an installed fl4health use layersel_ext everywhere it binds the selection criteria.

    import layersel_ext.fl4health as lf
    lf.patch()            # or: with lf.patched(): ...
    ...                   # build fl4health clients / exchangers and run as usual
    lf.unpatch()

``patch()`` replaces the nine criteria functions (and ``LayerSelectionFunctionConstructor``) in
``fl4health.parameter_exchange.parameter_selection_criteria`` and in every loaded fl4health module
that imported them by name (the FedPM exchanger binds ``select_scores_and_sample_masks`` at import
time), and routes ``SparseCooParameterExchanger.select_parameters`` through the fused sparse
selection. It is idempotent and ``unpatch()`` restores every binding it changed. Objects built
before ``patch()`` keep what they captured (a ``DynamicLayerExchanger`` holding an old partial):
patch first, then build. Importing layersel_ext never imports fl4health; this module does so only
when ``patch()`` is called.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from . import parameter_selection_criteria as ours
from .sparse_coo import select_sparse_parameters

CRITERIA = (
    "LayerSelectionFunctionConstructor",
    "select_layers_by_threshold",
    "select_layers_by_percentage",
    *ours.SCORE_FUNCTION_NAMES,
    "select_scores_and_sample_masks",
)
_CRITERIA_MODULE = "fl4health.parameter_exchange.parameter_selection_criteria"
_SPARSE_MODULE = "fl4health.parameter_exchange.sparse_coo_parameter_exchanger"

_patched: list[tuple[Any, str, Any]] = []  # (owner, attribute, original), in the order applied


def _import_fl4health() -> tuple[ModuleType, ModuleType]:
    try:
        import importlib

        criteria = importlib.import_module(_CRITERIA_MODULE)
        sparse = importlib.import_module(_SPARSE_MODULE)
    except ImportError as exc:
        raise ImportError(
            f"layersel_ext.fl4health.patch() needs fl4health installed ({exc}); "
            "layersel_ext itself works without it: import the criteria from layersel_ext instead"
        ) from exc
    return criteria, sparse


def _fused_select_parameters(self: Any, model: Any, initial_model: Any = None) -> Any:
    return select_sparse_parameters(model, initial_model, self.sparsity_level, self.score_gen_function)


def is_patched() -> bool:
    return bool(_patched)


def patch() -> None:
    """Make fl4health use layersel_ext's criteria (idempotent)."""
    if _patched:
        return
    criteria, sparse = _import_fl4health()
    originals = {id(getattr(criteria, name)): name for name in CRITERIA}
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "fl4health" or module_name.startswith("fl4health.")):
            continue
        for attr, value in list(vars(module).items()):
            name = originals.get(id(value))
            if name is not None:
                _patched.append((module, attr, value))
                setattr(module, attr, getattr(ours, name))
    cls = sparse.SparseCooParameterExchanger
    _patched.append((cls, "select_parameters", cls.__dict__["select_parameters"]))
    cls.select_parameters = _fused_select_parameters


def unpatch() -> None:
    """Restore every binding ``patch()`` changed (a no-op when not patched)."""
    while _patched:
        owner, attr, original = _patched.pop()
        setattr(owner, attr, original)


@contextmanager
def patched() -> Iterator[None]:
    """``with patched(): ...`` runs the block with fl4health using layersel_ext."""
    was_patched = is_patched()
    patch()
    try:
        yield
    finally:
        if not was_patched:
            unpatch()
