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

``patch(wire="compact")`` also changes what goes over the network, losslessly, in both directions:
FedPM's masks as bitmaps (``layersel_ext.wire``: one bit per element instead of an int64; the FedPM
client exchanger samples and packs in one step, the ``FedPm`` strategy reads the bitmaps and sends
its probabilities back in the same framing), and sparse COO messages with compact positions
(``layersel_ext.wire_coo``: values in their dtype, positions as the smallest of offsets, gaps or a
bitmap; ``SparseCooParameterExchanger`` and ``FedAvgSparseCooTensor``, the server's reply included).
Each side decodes to exactly the arrays fl4health's packers give, so every model is bitwise what it
was. Client and server must both use it; a peer that does not fails in its first round.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from . import parameter_selection_criteria as ours
from .sparse_coo import select_sparse_parameters
from .wire import CompactMaskPacker, sample_masks_packed
from .wire_coo import CompactCooPacker

CRITERIA = (
    "LayerSelectionFunctionConstructor",
    "select_layers_by_threshold",
    "select_layers_by_percentage",
    *ours.SCORE_FUNCTION_NAMES,
    "select_scores_and_sample_masks",
)
_CRITERIA_MODULE = "fl4health.parameter_exchange.parameter_selection_criteria"
_SPARSE_MODULE = "fl4health.parameter_exchange.sparse_coo_parameter_exchanger"
_FEDPM_EXCHANGER_MODULE = "fl4health.parameter_exchange.fedpm_exchanger"
_FEDPM_STRATEGY_MODULE = "fl4health.strategies.fedpm"
_SPARSE_STRATEGY_MODULE = "fl4health.strategies.fedavg_sparse_coo_tensor"
WIRES = ("fl4health", "compact")

_patched: list[tuple[Any, str, Any]] = []  # (owner, attribute, original), in the order applied
_wire: str | None = None  # the wire format of the current patch


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


_INHERITED = object()  # an attribute the class itself did not define: unpatch() deletes it again


def _replace(owner: type, attr: str, value: Any) -> None:
    _patched.append((owner, attr, owner.__dict__.get(attr, _INHERITED)))
    setattr(owner, attr, value)


def _with_packer(init: Any, packer: type) -> Any:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.parameter_packer = packer()

    return __init__


def _packed_masks(self: Any, model: Any, initial_model: Any = None, config: Any = None) -> Any:
    return sample_masks_packed(model)


def _install_compact_wire() -> None:
    import importlib

    fedpm_exchanger = importlib.import_module(_FEDPM_EXCHANGER_MODULE).FedPmExchanger
    for cls, packer in (
        (fedpm_exchanger, CompactMaskPacker),
        (importlib.import_module(_FEDPM_STRATEGY_MODULE).FedPm, CompactMaskPacker),
        (importlib.import_module(_SPARSE_MODULE).SparseCooParameterExchanger, CompactCooPacker),
        (importlib.import_module(_SPARSE_STRATEGY_MODULE).FedAvgSparseCooTensor, CompactCooPacker),
    ):
        _replace(cls, "__init__", _with_packer(cls.__dict__["__init__"], packer))
    _replace(fedpm_exchanger, "push_parameters", _packed_masks)


def patch(wire: str = "fl4health") -> None:
    """Make fl4health use layersel_ext's criteria (idempotent); ``wire="compact"``: FedPM masks as
    bitmaps too (see the module docstring). Objects built before the patch keep their packers."""
    global _wire
    if wire not in WIRES:
        raise ValueError(f"wire must be one of {WIRES}, got {wire!r}")
    if _patched:
        if wire != _wire:
            raise ValueError(f"already patched with wire={_wire!r}; unpatch() first to use wire={wire!r}")
        return
    _wire = wire
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
    _replace(sparse.SparseCooParameterExchanger, "select_parameters", _fused_select_parameters)
    if wire == "compact":
        _install_compact_wire()


def unpatch() -> None:
    """Restore every binding ``patch()`` changed (a no-op when not patched)."""
    global _wire
    _wire = None
    while _patched:
        owner, attr, original = _patched.pop()
        if original is _INHERITED:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)


@contextmanager
def patched(wire: str = "fl4health") -> Iterator[None]:
    """``with patched(): ...`` runs the block with fl4health using layersel_ext."""
    was_patched = is_patched()
    patch(wire)
    try:
        yield
    finally:
        if not was_patched:
            unpatch()
