"""FedPM masks: names and order as fl4health, dtype, exact shapes, statistics, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import fl4health_criteria, requires_cuda
from torch import nn

import layersel_ext as L


def masked_layers():
    from fl4health.model_bases.masked_layers import masked_conv, masked_linear
    from fl4health.model_bases.masked_layers import masked_normalization_layers as mn

    return [
        masked_linear.MaskedLinear(6, 4),
        masked_linear.MaskedLinear(6, 4, bias=False),
        masked_conv.MaskedConv1d(2, 3, 3),
        masked_conv.MaskedConv2d(2, 3, 3, bias=False),
        masked_conv.MaskedConv3d(2, 3, 2),
        masked_conv.MaskedConvTranspose1d(2, 3, 3),
        masked_conv.MaskedConvTranspose2d(2, 3, 3),
        masked_conv.MaskedConvTranspose3d(2, 3, 2, bias=False),
        mn.MaskedLayerNorm(5),
        mn.MaskedLayerNorm(5, bias=False),
        mn.MaskedBatchNorm1d(4),
        mn.MaskedBatchNorm2d(4),
        mn.MaskedBatchNorm3d(4),
    ]


def check_like_fl4health(model: nn.Module) -> None:
    F = fl4health_criteria()
    ref_masks, ref_names = F.select_scores_and_sample_masks(model, None)
    masks, names = L.select_scores_and_sample_masks(model, None)
    assert names == ref_names
    sd = model.state_dict()
    for m, r, n in zip(masks, ref_masks, names):
        assert isinstance(m, np.ndarray) and m.dtype == np.int64 and m.dtype == np.asarray(r).dtype, n
        assert m.shape == tuple(sd[n].shape), n  # exact score shape (fl4health may squeeze)
        assert m.size == np.asarray(r).size, n
        assert set(np.unique(m)) <= {0, 1}, n


def test_every_masked_layer_class_top_level_and_nested():
    fl4health_criteria()
    torch.manual_seed(0)
    for layer in masked_layers():
        check_like_fl4health(layer)  # the model is the masked layer: unprefixed names
        check_like_fl4health(nn.Sequential(nn.Linear(3, 3), layer, nn.ReLU()))


def test_wrapped_and_deeply_nested():
    fl4health_criteria()
    from fl4health.model_bases.masked_layers.masked_layers_utils import convert_to_masked_model

    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Conv2d(4, 4, 1), nn.LayerNorm([4, 2, 2])),
        nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip
    masked = convert_to_masked_model(net)
    check_like_fl4health(masked)

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = masked
            self.head = nn.Linear(2, 2)

    check_like_fl4health(Wrapper())


def test_leading_size_one_dims_kept():
    from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear

    layer = MaskedLinear(7, 1)  # weight_scores (1, 7), bias_scores (1,)
    masks, names = L.select_scores_and_sample_masks(layer, None)
    assert [m.shape for m in masks] == [(1, 7), (1,)]
    layer.load_state_dict({**layer.state_dict(), **{n: torch.from_numpy(m).float() for n, m in zip(names, masks)}})


def test_structural_detection_without_fl4health_classes():
    class MyMasked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2, 3), requires_grad=False)
            self.weight_scores = nn.Parameter(torch.zeros(2, 3))
            self.bias_scores = nn.Parameter(torch.zeros(2))

    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(MyMasked()), MyMasked())
    masks, names = L.select_scores_and_sample_masks(model, None, seed=0)
    assert names == ["1.0.weight_scores", "1.0.bias_scores", "2.weight_scores", "2.bias_scores"]
    assert [m.shape for m in masks] == [(2, 3), (2,), (2, 3), (2,)]


def test_reproducible_under_manual_seed_and_explicit_seed():
    from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear

    layer = MaskedLinear(100, 50)
    torch.manual_seed(3)
    a, _ = L.select_scores_and_sample_masks(layer, None)
    b, _ = L.select_scores_and_sample_masks(layer, None)  # the generator advanced: a fresh stream
    torch.manual_seed(3)
    c, _ = L.select_scores_and_sample_masks(layer, None)
    assert all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))
    d, _ = L.select_scores_and_sample_masks(layer, None, seed=42)
    e, _ = L.select_scores_and_sample_masks(layer, None, seed=42)
    assert all(np.array_equal(x, y) for x, y in zip(d, e))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    f, _ = L.select_scores_and_sample_masks(layer, None, generator=g1)
    h, _ = L.select_scores_and_sample_masks(layer, None, generator=g2)
    assert all(np.array_equal(x, y) for x, y in zip(f, h))


def test_mask_dtype_option_and_bool_refused():
    from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear

    layer = MaskedLinear(4, 4)
    masks, _ = L.select_scores_and_sample_masks(layer, None, seed=1, mask_dtype=np.uint8)
    assert all(m.dtype == np.uint8 for m in masks)
    masks32, _ = L.select_scores_and_sample_masks(layer, None, seed=1, mask_dtype=torch.int32)
    assert all(m.dtype == np.int32 for m in masks32)
    assert all(np.array_equal(a, b) for a, b in zip(masks, masks32))
    for bad in (np.bool_, torch.bool, bool):
        with pytest.raises(TypeError, match="bool"):
            L.select_scores_and_sample_masks(layer, None, mask_dtype=bad)


def test_argument_errors_in_their_order():
    # seed and generator together first, then the mask dtype, then the seed's value; an empty model too
    from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear

    from layersel_ext import wire

    for model in (MaskedLinear(4, 4), nn.Linear(2, 2)):
        with pytest.raises(ValueError, match="not both"):
            L.select_scores_and_sample_masks(model, None, seed=1, generator=torch.Generator(), mask_dtype=bool)
        with pytest.raises(ValueError, match="not both"):
            wire.sample_masks_packed(model, seed=1, generator=torch.Generator())
        with pytest.raises(TypeError, match="bool"):
            L.select_scores_and_sample_masks(model, None, seed=-1, mask_dtype=bool)
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
            L.select_scores_and_sample_masks(model, None, seed=-1)


class Scores(nn.Module):
    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.weight_scores = nn.Parameter(scores)


@pytest.mark.parametrize("p", [0.001, 0.03, 0.3, 0.5, 0.77, 0.97, 0.999])
def test_empirical_frequency_matches_sigmoid(p, backend):
    """Per-element frequency over many seeds, and the overall rate, within 5 sigma."""
    logit = math.log(p / (1 - p))
    n, rounds = 4099, 60  # crosses Philox block edges (not a multiple of 4)
    layer = Scores(torch.full((n,), logit))
    total = np.zeros(n)
    for seed in range(rounds):
        total += L.select_scores_and_sample_masks(layer, None, seed=1000 + seed)[0][0]
    overall = total.sum() / (n * rounds)
    assert abs(overall - p) < 5 * math.sqrt(p * (1 - p) / (n * rounds))
    if rounds * min(p, 1 - p) >= 10:  # where the per-element count is close enough to normal
        per_element = total / rounds
        sd = math.sqrt(p * (1 - p) / rounds)
        assert np.mean(np.abs(per_element - p) > 5 * sd) < 0.001


def test_extreme_and_nan_scores(backend):
    scores = torch.tensor([float("inf"), float("-inf"), float("nan"), 100.0, -100.0] * 200)
    m = L.select_scores_and_sample_masks(Scores(scores), None, seed=5)[0][0].reshape(200, 5)
    assert (m[:, 0] == 1).all() and (m[:, 1] == 0).all() and (m[:, 2] == 0).all()
    assert (m[:, 3] == 1).all() and (m[:, 4] == 0).all()


def test_no_correlation_between_neighbours(backend):
    n = 200_000
    m = L.select_scores_and_sample_masks(Scores(torch.zeros(n)), None, seed=77)[0][0].astype(np.float64)
    for lag in (1, 2, 3, 4, 5, 8):
        r = np.corrcoef(m[:-lag], m[lag:])[0, 1]
        assert abs(r) < 5 / math.sqrt(n), lag


def test_chunk_and_tensor_boundaries_are_seamless(backend):
    """One tensor, or the same values split into several tensors: identical masks (global index stream)."""
    scores = torch.randn((1 << 16) * 2 + 5)
    one = Scores(scores)
    masks_one = L.select_scores_and_sample_masks(one, None, seed=9)[0][0]
    parts = nn.Sequential(Scores(scores[:3].clone()), Scores(scores[3:70000].clone()), Scores(scores[70000:].clone()))
    masks_parts = L.select_scores_and_sample_masks(parts, None, seed=9)[0]
    assert np.array_equal(masks_one, np.concatenate(masks_parts))


def test_backends_give_the_same_masks():
    if L._loader.COMPILED is None:
        pytest.skip("compiled module not loaded")
    from layersel_ext import ops

    layer = Scores(torch.randn(3, 70001))
    ops.set_backend("torch")
    try:
        a = L.select_scores_and_sample_masks(layer, None, seed=31)[0][0]
    finally:
        ops.set_backend("compiled")
    b = L.select_scores_and_sample_masks(layer, None, seed=31)[0][0]
    assert np.array_equal(a, b)


@requires_cuda
def test_cuda_masks_equal_cpu_masks():
    layer = Scores(torch.randn(5, 70001))
    cpu = L.select_scores_and_sample_masks(layer, None, seed=8)[0][0]
    gpu = L.select_scores_and_sample_masks(layer.cuda(), None, seed=8)[0][0]
    assert gpu.dtype == np.int64 and np.array_equal(cpu, gpu)
