"""Make an installed fl4health use layersel_ext everywhere it binds the selection criteria.

    import layersel_ext.fl4health as lf
    lf.patch()            # or: with lf.patched(): ...
    ...                   # build fl4health clients / exchangers and run as usual
    lf.unpatch()

``patch()`` replaces the nine criteria functions (and ``LayerSelectionFunctionConstructor``) in
``fl4health.parameter_exchange.parameter_selection_criteria`` and in every loaded fl4health module
that imported them by name (the FedPM exchanger binds ``select_scores_and_sample_masks`` at import
time), and routes ``SparseCooParameterExchanger.select_parameters`` through the fused sparse
selection. It is idempotent and ``unpatch()`` restores every binding it changed, and every binding
to our functions in an fl4health module first imported while patched (it imported them by name from
the patched criteria module). ``patch()`` is atomic: it imports and resolves everything first and
only then rebinds, so when an import fails it raises with nothing changed. Patching and unpatching
hold one lock: of two threads patching with different wires, the first to take it wins and the
other raises ``ValueError`` ("already patched with wire=..."), never a mix of both. Objects built
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

``patch(wire="coded")`` is ``"compact"`` with FedPM's masks coded below one bit per element
(``layersel_ext.wire_coded``): the client codes each mask bit with the probability the θ it last
received gives it, and the server decodes with the θ it sent; the first round (no θ yet) goes as
bitmaps. Client and server must both use it.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from types import ModuleType
from typing import Any

from . import parameter_selection_criteria as ours
from .sparse_coo import select_sparse_offsets, select_sparse_parameters
from .wire import CompactMaskPacker, sample_masks_packed
from .wire_coded import CodedMaskPacker, sample_masks_coded
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
WIRES = ("fl4health", "compact", "coded")

_lock = threading.RLock()  # held by patch() and unpatch() for all they read and write
_patched: list[tuple[Any, str, Any]] = []  # (owner, attribute, original), in the order applied
_wire: str | None = None  # the wire format of the current patch
# Our criteria functions and the fl4health ones they replace: what unpatch() restores in fl4health
# modules imported while patched, which bound ours by name.
_original_of: dict[int, tuple[Any, Any]] = {}  # id(ours) -> (ours, fl4health's)


def _import_fl4health() -> tuple[ModuleType, ModuleType]:
    try:
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
    with _lock:
        return bool(_patched)


_INHERITED = object()  # an attribute the class itself did not define: unpatch() deletes it again


def _class_binding(owner: type, attr: str, value: Any) -> tuple[Any, str, Any, Any]:
    """(owner, attribute, original, new value) for a class attribute."""
    return owner, attr, owner.__dict__.get(attr, _INHERITED), value


def _with_packer(init: Any, packer: Callable[[], Any]) -> Any:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.parameter_packer = packer()

    return __init__


def _packed_masks(self: Any, model: Any, initial_model: Any = None, config: Any = None) -> Any:
    return sample_masks_packed(model)


def _coded_masks(self: Any, model: Any, initial_model: Any = None, config: Any = None) -> Any:
    return sample_masks_coded(model, self.parameter_packer)


def _push_offsets(cls: type) -> Any:
    """``cls.push_parameters`` (fl4health's ``SparseCooParameterExchanger``) for the compact wire: the
    selection's flat offsets go straight to the encoder, never as int64 [nnz, ndim] indices (the same
    stream); an exchanger whose class selects or packs its own way keeps fl4health's push."""
    push, pack = cls.__dict__["push_parameters"], cls.pack_parameters

    def push_parameters(self: Any, model: Any, initial_model: Any = None, config: Any = None) -> Any:
        kind = type(self)
        if (
            kind.select_parameters is _fused_select_parameters
            and kind.pack_parameters is pack
            and isinstance(self.parameter_packer, CompactCooPacker)
        ):
            selection = select_sparse_offsets(model, initial_model, self.sparsity_level, self.score_gen_function)
            return self.parameter_packer.pack_offsets(*selection)
        return push(self, model, initial_model, config)

    return push_parameters


def _wire_bindings(wire: str) -> list[tuple[Any, str, Any, Any]]:
    """The class attributes ``wire="compact"`` or ``"coded"`` replaces (imports fl4health's modules;
    binds nothing)."""
    fedpm_exchanger = importlib.import_module(_FEDPM_EXCHANGER_MODULE).FedPmExchanger
    sparse_exchanger = importlib.import_module(_SPARSE_MODULE).SparseCooParameterExchanger
    if wire == "coded":
        client_masks, server_masks, push = (
            partial(CodedMaskPacker, "client"),
            partial(CodedMaskPacker, "server"),
            _coded_masks,
        )
    else:
        client_masks, server_masks, push = CompactMaskPacker, CompactMaskPacker, _packed_masks
    bindings = [_class_binding(sparse_exchanger, "push_parameters", _push_offsets(sparse_exchanger))]
    for cls, packer in (
        (fedpm_exchanger, client_masks),
        (importlib.import_module(_FEDPM_STRATEGY_MODULE).FedPm, server_masks),
        (sparse_exchanger, CompactCooPacker),
        (importlib.import_module(_SPARSE_STRATEGY_MODULE).FedAvgSparseCooTensor, CompactCooPacker),
    ):
        bindings.append(_class_binding(cls, "__init__", _with_packer(cls.__dict__["__init__"], packer)))
    bindings.append(_class_binding(fedpm_exchanger, "push_parameters", push))
    return bindings


def _fl4health_modules() -> list[ModuleType]:
    return [
        module
        for name, module in list(sys.modules.items())
        if module is not None and (name == "fl4health" or name.startswith("fl4health."))
    ]


def patch(wire: str = "fl4health") -> None:
    """Make fl4health use layersel_ext's criteria (idempotent); ``wire="compact"``: FedPM masks as
    bitmaps and compact sparse COO too; ``wire="coded"``: the masks coded against θ (see the module
    docstring). Objects built before the patch keep their packers.

    Atomic: every fl4health module is imported and every binding resolved before the first is
    changed, so an error (an fl4health module that fails to import) leaves nothing patched. Raises
    ``ValueError`` when already patched with another wire (``unpatch()`` first)."""
    global _wire
    if wire not in WIRES:
        raise ValueError(f"wire must be one of {WIRES}, got {wire!r}")
    with _lock:
        if _patched:
            if wire != _wire:
                raise ValueError(f"already patched with wire={_wire!r}; unpatch() first to use wire={wire!r}")
            return
        # Imports first (the compact wire's too): a module they load binds fl4health's criteria,
        # which the scan below then finds.
        criteria, sparse = _import_fl4health()
        bindings = _wire_bindings(wire) if wire != "fl4health" else []
        bindings.append(
            _class_binding(sparse.SparseCooParameterExchanger, "select_parameters", _fused_select_parameters)
        )
        replacements = {id(getattr(criteria, name)): getattr(ours, name) for name in CRITERIA}
        for module in _fl4health_modules():
            for attr, value in list(vars(module).items()):
                new = replacements.get(id(value))
                if new is not None:
                    bindings.append((module, attr, value, new))
        originals = {id(getattr(ours, name)): (getattr(ours, name), getattr(criteria, name)) for name in CRITERIA}
        try:
            for owner, attr, original, value in bindings:
                _patched.append((owner, attr, original))
                setattr(owner, attr, value)
        except BaseException:  # setattr on a module or class does not fail; if one did, undo the rest
            _unpatch_locked()
            raise
        _original_of.update(originals)
        _wire = wire


def _unpatch_locked() -> None:
    global _wire
    while _patched:
        owner, attr, original = _patched.pop()
        if original is _INHERITED:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)
    if _original_of:
        # fl4health modules imported while patched bound ours by name from the criteria module
        for module in _fl4health_modules():
            for attr, value in list(vars(module).items()):
                pair = _original_of.get(id(value))
                if pair is not None and pair[0] is value:
                    setattr(module, attr, pair[1])
    _original_of.clear()
    _wire = None


def unpatch() -> None:
    """Restore every binding ``patch()`` changed, and fl4health's criteria in fl4health modules
    imported while patched (a no-op when not patched)."""
    with _lock:
        _unpatch_locked()


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
