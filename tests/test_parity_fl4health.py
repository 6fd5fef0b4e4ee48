"""Differential tests against the real fl4health 0.4.2: names, order, shapes, dtypes and values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import fl4health_criteria
from models import make_pair, model_zoo

import layersel_ext as L

SCORE_FUNCTIONS = list(L.SCORE_FUNCTION_NAMES)
DTYPES = [None, torch.float64, torch.float16]
CASES = [(seed, dt, name) for seed in range(3) for dt in DTYPES for name, _ in model_zoo(0)]


def _pair(seed: int, dtype: torch.dtype | None, name: str, constant: bool = False):
    base = dict(model_zoo(seed))[name]
    return make_pair(base, seed, dtype=dtype, constant=constant)


def assert_same_layers(ref: tuple, ours: tuple) -> None:
    ref_arrays, ref_names = ref
    arrays, names = ours
    assert names == ref_names
    assert len(arrays) == len(ref_arrays)
    for n, a, r in zip(names, arrays, ref_arrays):
        assert isinstance(a, np.ndarray), n
        assert a.dtype == r.dtype and a.shape == r.shape, n
        np.testing.assert_array_equal(a, r, err_msg=n)


def thresholds_for(drifts: list[float]) -> list[float]:
    """Midpoints between distinct drifts, below the smallest and above the largest."""
    vals = sorted({d for d in drifts if not math.isnan(d)})
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    return [
        v
        for v in [min(vals) / 2 if vals and vals[0] > 0 else 1e-9, *mids[:: max(1, len(mids) // 6)], 2 * max(vals) + 1]
    ]


@pytest.mark.parametrize("seed,dtype,name", CASES)
def test_layer_selection_matches(seed, dtype, name, backend):
    F = fl4health_criteria()
    model, initial = _pair(seed, dtype, name)
    for normalize in (True, False):
        drifts = list(L.layer_drift_norms(model, initial, normalize).values())
        n = len(drifts)
        percentages = sorted({0.01, 0.1, 0.25, 0.5, 0.75, 1.0, *[k / n for k in range(1, n + 1, max(1, n // 5))]})
        for more in (True, False):
            for t in thresholds_for(drifts):
                assert_same_layers(
                    F.select_layers_by_threshold(t, normalize, more, model, initial),
                    L.select_layers_by_threshold(t, normalize, more, model, initial),
                )
            for p in percentages:
                assert_same_layers(
                    F.select_layers_by_percentage(p, normalize, more, model, initial),
                    L.select_layers_by_percentage(p, normalize, more, model, initial),
                )


@pytest.mark.parametrize("name", [n for n, _ in model_zoo(0)])
def test_exact_tie_thresholds_on_constant_models(name, backend):
    """Constant-initialised models with power-of-two drifts: thresholds exactly at drift values."""
    F = fl4health_criteria()
    model, initial = _pair(1, None, name, constant=True)
    for normalize in (True, False):
        ref = {k: F._calculate_drift_norm(v, initial.state_dict()[k], normalize) for k, v in model.state_dict().items()}
        ours = L.layer_drift_norms(model, initial, normalize)
        exact = [v for k, v in ref.items() if ours[k] == v and v > 0]
        assert exact, "the constant model should have exactly representable drifts"
        for t in sorted(set(exact)):
            for more in (True, False):
                assert_same_layers(
                    F.select_layers_by_threshold(t, normalize, more, model, initial),
                    L.select_layers_by_threshold(t, normalize, more, model, initial),
                )
        for p in (0.2, 0.5, 0.8, 1.0):
            for more in (True, False):
                assert_same_layers(
                    F.select_layers_by_percentage(p, normalize, more, model, initial),
                    L.select_layers_by_percentage(p, normalize, more, model, initial),
                )


def test_constructor_partials_match(backend):
    F = fl4health_criteria()
    model, initial = _pair(0, None, "conv_bn")
    for args in [(0.01, 0.3, True, True), (0.5, 0.6, False, False), (1e-4, 1.0, True, False)]:
        ref, ours = F.LayerSelectionFunctionConstructor(*args), L.LayerSelectionFunctionConstructor(*args)
        assert_same_layers(ref.select_by_threshold()(model, initial), ours.select_by_threshold()(model, initial))
        assert_same_layers(ref.select_by_percentage()(model, initial), ours.select_by_percentage()(model, initial))


def test_cpu_arrays_share_memory_with_the_model(backend):
    model, initial = _pair(0, None, "conv_bn")
    arrays, names = L.select_layers_by_percentage(1.0, True, True, model, initial)
    sd = model.state_dict()
    for a, n in zip(arrays, names):
        assert np.shares_memory(a, sd[n].numpy()), n


@pytest.mark.parametrize("seed,dtype,name", CASES)
@pytest.mark.parametrize("fn", SCORE_FUNCTIONS)
def test_scores_match(seed, dtype, name, fn, backend):
    F = fl4health_criteria()
    model, initial = _pair(seed, dtype, name)
    ref = getattr(F, fn)(model, initial)
    ours = getattr(L, fn)(model, initial)
    assert list(ours) == list(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape and ours[k].device == ref[k].device, k
        assert torch.equal(ours[k], ref[k]), k


@pytest.mark.parametrize("fn", SCORE_FUNCTIONS[:2])
def test_final_magnitude_scores_accept_no_initial_model(fn, backend):
    F = fl4health_criteria()
    model, _ = _pair(0, None, "tiny")
    ref, ours = getattr(F, fn)(model, None), getattr(L, fn)(model, None)
    assert list(ref) == list(ours) and all(torch.equal(ref[k], ours[k]) for k in ref)


def test_integer_score_semantics_match_torch(backend):
    """uint8 / int8 wrap-around and abs(INT_MIN) exactly as torch computes them."""
    from torch import nn

    class Buffers(nn.Module):
        def __init__(self, values: dict[str, torch.Tensor]) -> None:
            super().__init__()
            for k, v in values.items():
                self.register_buffer(k, v)

    vals = {
        "u8": torch.tensor([0, 3, 250, 255], dtype=torch.uint8),
        "i8": torch.tensor([-128, -1, 0, 127], dtype=torch.int8),
        "i16": torch.tensor([-32768, 5, -7, 32767], dtype=torch.int16),
        "i32": torch.tensor([-(2**31), 9, -9, 2**31 - 1], dtype=torch.int32),
        "i64": torch.tensor([-(2**63), 1, -1, 2**63 - 1], dtype=torch.int64),
        "neg0": torch.tensor([-0.0, 0.0, -1.5, float("inf")]),
    }
    init = {k: v.flip(0).clone() for k, v in vals.items()}
    F = fl4health_criteria()
    model, initial = Buffers(vals), Buffers(init)
    for fn in SCORE_FUNCTIONS:
        ref, ours = getattr(F, fn)(model, initial), getattr(L, fn)(model, initial)
        for k in ref:
            assert ours[k].dtype == ref[k].dtype, (fn, k)
            assert torch.equal(ours[k], ref[k]), (fn, k, ours[k], ref[k])
            if ref[k].is_floating_point():  # the sign of zero too
                assert torch.equal(torch.signbit(ours[k]), torch.signbit(ref[k])), (fn, k)
    for normalize in (True, False):
        ref_d = {
            k: F._calculate_drift_norm(v, initial.state_dict()[k], normalize) for k, v in model.state_dict().items()
        }
        ours_d = L.layer_drift_norms(model, initial, normalize)
        for k, ref_value in ref_d.items():
            assert ours_d[k] == pytest.approx(ref_value, rel=1e-6, nan_ok=True), k
