"""Blocking host syncs per public call on CUDA (README "Sync budget"): counted with torch's sync
debug mode, which warns on every synchronising copy or item(). Runs where a GPU exists."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import requires_cuda
from torch import nn

import layersel_ext as L
from layersel_ext.sparse_coo import select_sparse_parameters

pytestmark = [requires_cuda, pytest.mark.cuda]


def syncs(fn) -> int:
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64)) for _ in range(20)]).cuda()
    initial = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model, initial


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight_scores = nn.Parameter(torch.randn(300, 300))
        self.bias_scores = nn.Parameter(torch.randn(300))


def test_layer_selection_at_most_two_syncs():
    model, initial = pair()
    L.select_layers_by_percentage(0.3, True, True, model, initial)  # warm-up (allocator, kernels)
    assert syncs(lambda: L.select_layers_by_percentage(0.3, True, True, model, initial)) <= 2
    assert syncs(lambda: L.select_layers_by_threshold(1e-4, True, True, model, initial)) <= 2


def test_scores_do_not_sync():
    model, initial = pair()
    L.largest_magnitude_change_scores(model, initial)
    assert syncs(lambda: L.largest_magnitude_change_scores(model, initial)) == 0


def test_masks_one_sync():
    m = Masked().cuda()
    L.select_scores_and_sample_masks(m, None)
    assert syncs(lambda: L.select_scores_and_sample_masks(m, None)) <= 1


def test_sparse_selection_two_syncs():
    # A fused score kind, one floating dtype (float32 beside the int64 buffers here): the one-go op,
    # the k-th largest key never leaving the device; one sync for the chunk counts (they size the
    # outputs), one batched transfer of every kept tensor's values and indices.
    model, initial = pair()
    select_sparse_parameters(model, initial, 0.01, L.largest_magnitude_change_scores)
    assert syncs(lambda: select_sparse_parameters(model, initial, 0.01, L.largest_magnitude_change_scores)) <= 2
    model64, initial64 = copy.deepcopy(model).double(), copy.deepcopy(initial).double()  # 6 digits, same syncs
    select_sparse_parameters(model64, initial64, 0.01, L.largest_magnitude_change_scores)
    assert syncs(lambda: select_sparse_parameters(model64, initial64, 0.01, L.largest_magnitude_change_scores)) <= 2


def test_sparse_selection_of_given_scores_three_syncs():
    # Custom scores (or several dtypes): the two ops, the k-th largest comes to the host for the
    # per-dtype comparison thresholds: one sync more.
    model, initial = pair()

    def given(m: nn.Module, _: nn.Module | None) -> dict[str, torch.Tensor]:
        return {n: p.detach().abs() for n, p in m.named_parameters()}

    select_sparse_parameters(model, initial, 0.01, given)
    assert syncs(lambda: select_sparse_parameters(model, initial, 0.01, given)) <= 3
