"""layersel_ext.fl4health: patch()/unpatch() make an installed fl4health use our implementations."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fl4health_criteria
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
