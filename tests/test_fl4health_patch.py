"""layersel_ext.fl4health: patch()/unpatch() make an installed fl4health use our implementations."""

from __future__ import annotations

import copy
import importlib
import logging
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fl4health_criteria, fl4health_strategies
from models import make_pair, model_zoo
from torch import nn

import layersel_ext
import layersel_ext.fl4health as lf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def always_unpatched():
    lf.unpatch()
    yield
    lf.unpatch()


def test_patch_replaces_every_binding_and_unpatch_restores():
    F = fl4health_criteria()
    from fl4health.parameter_exchange import fedpm_exchanger, sparse_coo_parameter_exchanger

    originals = {name: getattr(F, name) for name in lf.CRITERIA}
    original_fedpm = fedpm_exchanger.select_scores_and_sample_masks
    original_select = sparse_coo_parameter_exchanger.SparseCooParameterExchanger.select_parameters
    lf.patch()
    lf.patch()  # idempotent
    for name in lf.CRITERIA:
        assert getattr(F, name) is getattr(layersel_ext.parameter_selection_criteria, name), name
    assert fedpm_exchanger.select_scores_and_sample_masks is layersel_ext.select_scores_and_sample_masks
    assert sparse_coo_parameter_exchanger.SparseCooParameterExchanger.select_parameters is not original_select
    lf.unpatch()
    lf.unpatch()  # a no-op
    for name in lf.CRITERIA:
        assert getattr(F, name) is originals[name], name
    assert fedpm_exchanger.select_scores_and_sample_masks is original_fedpm
    assert sparse_coo_parameter_exchanger.SparseCooParameterExchanger.select_parameters is original_select


def test_context_manager():
    F = fl4health_criteria()
    original = F.select_layers_by_threshold
    with lf.patched():
        assert F.select_layers_by_threshold is layersel_ext.select_layers_by_threshold
    assert F.select_layers_by_threshold is original


def test_fl4health_exchangers_give_the_same_answers_patched():
    F = fl4health_criteria()
    from fl4health.parameter_exchange.layer_exchanger import DynamicLayerExchanger
    from fl4health.parameter_exchange.sparse_coo_parameter_exchanger import SparseCooParameterExchanger

    logging.disable(logging.WARNING)
    model, initial = make_pair(model_zoo(0)[0][1], 0)

    def run() -> list[list[np.ndarray]]:
        out = []
        ctor = F.LayerSelectionFunctionConstructor(0.001, 0.4, normalize=True, select_drift_more=True)
        for fn in (ctor.select_by_threshold(), ctor.select_by_percentage()):
            out.append(DynamicLayerExchanger(fn).push_parameters(model, initial))
        out.append(SparseCooParameterExchanger(0.05, F.largest_magnitude_change_scores).push_parameters(model, initial))
        return out

    reference = run()
    with lf.patched():
        patched = run()
    logging.disable(logging.NOTSET)
    for a, b in zip(reference, patched):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_fedpm_exchanger_uses_our_masks():
    fl4health_criteria()
    from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear
    from fl4health.parameter_exchange.fedpm_exchanger import FedPmExchanger

    model = nn.Sequential(MaskedLinear(7, 1), nn.ReLU(), MaskedLinear(1, 3))
    with lf.patched():
        torch.manual_seed(0)
        packed = FedPmExchanger().push_parameters(model, copy.deepcopy(model))
    masks, names = packed[:-1], packed[-1].tolist()
    assert names == ["0.weight_scores", "0.bias_scores", "2.weight_scores", "2.bias_scores"]
    assert [m.shape for m in masks] == [(1, 7), (1,), (3, 1), (3,)]  # exact shapes (fl4health squeezes)
    assert all(m.dtype == np.int64 for m in masks)


def test_patch_without_fl4health_is_a_clear_error():
    code = (
        "import sys\n"
        "for m in ['fl4health', 'fl4health.parameter_exchange', "
        "'fl4health.parameter_exchange.parameter_selection_criteria']: sys.modules[m] = None\n"
        "import layersel_ext.fl4health as lf\n"
        "try:\n    lf.patch()\nexcept ImportError as e:\n    print('ImportError', e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert r.returncode == 0, r.stderr
    assert "ImportError" in r.stdout and "needs fl4health installed" in r.stdout


# ------------------------------------------------------------------------------ atomic patch()


_MODULES: list = []  # fl4health's modules, imported once (a test hides one of them from imports)


def _bindings() -> tuple:
    """Which of patch()'s bindings are in place: the criteria, the fused selection, the packers."""
    if not _MODULES:
        fl4health_strategies()
        from fl4health.parameter_exchange import fedpm_exchanger, sparse_coo_parameter_exchanger
        from fl4health.strategies import fedpm

        _MODULES.extend([fl4health_criteria(), fedpm_exchanger, sparse_coo_parameter_exchanger, fedpm.FedPm])
    F, fedpm_exchanger, sparse_coo_parameter_exchanger, FedPm = _MODULES
    ours = layersel_ext.parameter_selection_criteria
    exchanger = sparse_coo_parameter_exchanger.SparseCooParameterExchanger
    return (
        tuple(getattr(F, name) is getattr(ours, name) for name in lf.CRITERIA),
        fedpm_exchanger.select_scores_and_sample_masks is ours.select_scores_and_sample_masks,
        exchanger.select_parameters is lf._fused_select_parameters,
        getattr(vars(fedpm_exchanger.FedPmExchanger).get("push_parameters"), "__name__", None),
        vars(FedPm)["__init__"].__module__ == lf.__name__,
        vars(exchanger)["__init__"].__module__ == lf.__name__,
    )


def _states() -> dict[str | None, tuple]:
    """_bindings() unpatched and under each wire."""
    out = {None: _bindings()}
    for wire in lf.WIRES:
        with lf.patched(wire):
            out[wire] = _bindings()
    assert len(set(out.values())) == len(out)
    return out


def test_a_failed_import_leaves_nothing_patched(monkeypatch):
    states = _states()
    monkeypatch.setitem(sys.modules, "fl4health.strategies.fedpm", None)  # its import now fails
    for _ in range(2):
        with pytest.raises(ImportError, match="fedpm"):
            lf.patch(wire="compact")
        assert not lf.is_patched()
        assert _bindings() == states[None]
    monkeypatch.undo()
    lf.patch(wire="compact")  # the retry patches everything
    assert lf.is_patched() and _bindings() == states["compact"]


def test_unpatch_restores_modules_imported_while_patched(monkeypatch):
    """A module first imported while patched binds ours by name from the criteria module: unpatch()
    gives it fl4health's again; so for the FedPM exchanger when the compact wire first imports it."""
    F = fl4health_criteria()
    import fl4health.parameter_exchange as parent

    original = F.select_scores_and_sample_masks
    name = "fl4health.parameter_exchange.fedpm_exchanger"
    monkeypatch.setitem(sys.modules, name, sys.modules.get(name))  # restored after the test
    monkeypatch.setattr(parent, "fedpm_exchanger", getattr(parent, "fedpm_exchanger", None), raising=False)
    del sys.modules[name]
    lf.patch(wire="compact")  # imports the FedPM exchanger afresh
    fresh = sys.modules[name]
    assert fresh.select_scores_and_sample_masks is layersel_ext.select_scores_and_sample_masks
    late = types.ModuleType("fl4health._layersel_late_import")
    monkeypatch.setitem(sys.modules, late.__name__, late)
    # what `from ...parameter_selection_criteria import select_scores_and_sample_masks,
    # select_layers_by_percentage as by_percentage` binds in a module imported now
    criteria = importlib.import_module("fl4health.parameter_exchange.parameter_selection_criteria")
    late.select_scores_and_sample_masks = criteria.select_scores_and_sample_masks
    late.by_percentage = criteria.select_layers_by_percentage
    assert late.select_scores_and_sample_masks is layersel_ext.select_scores_and_sample_masks
    lf.unpatch()
    assert fresh.select_scores_and_sample_masks is original
    assert late.select_scores_and_sample_masks is original
    assert late.by_percentage is F.select_layers_by_percentage
    assert "push_parameters" not in vars(fresh.FedPmExchanger)


def test_concurrent_patches_with_different_wires_never_mix():
    """1,000 races of threads patching with different wires (one a wire): the first to take the lock
    wins, the others raise ValueError; every state afterwards is one of the whole ones."""
    states = _states()
    barrier = threading.Barrier(len(lf.WIRES) + 1, timeout=60)  # a racer a wire, and this thread
    outcome: dict[str, str] = {}

    def racer(wire: str) -> None:
        for _ in range(1000):
            barrier.wait()
            try:
                lf.patch(wire)
                outcome[wire] = "patched"
            except ValueError as exc:
                outcome[wire] = "refused" if "already patched with wire=" in str(exc) else str(exc)
            barrier.wait()  # the main thread checks and unpatches
            barrier.wait()

    threads = [threading.Thread(target=racer, args=(w,)) for w in lf.WIRES]
    for t in threads:
        t.start()
    try:
        wins = {w: 0 for w in lf.WIRES}
        for _ in range(1000):
            barrier.wait()
            barrier.wait()
            winners = [w for w in lf.WIRES if outcome[w] == "patched"]
            assert len(winners) == 1 and all(v in ("patched", "refused") for v in outcome.values()), outcome
            assert _bindings() == states[winners[0]] and lf._wire == winners[0]
            wins[winners[0]] += 1
            lf.unpatch()
            assert _bindings() == states[None]
            barrier.wait()
    except BaseException:
        barrier.abort()  # the racers stop waiting too
        raise
    finally:
        for t in threads:
            t.join()
    assert sum(wins.values()) == 1000
