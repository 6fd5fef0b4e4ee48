"""FedPM clients are independent: without ``seed=``, the Philox key is derived from a draw of
torch's generator AND a fingerprint of the scores (csrc/common/fingerprint.h), so two clients
seeded alike (fl4health's examples seed every client with 42) but holding different scores sample
independent masks, while the same draw and the same scores reproduce the same masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import layersel_ext as L
from layersel_ext import _torch_ops, ops


class Scores(nn.Module):
    """A masked layer as FedPM sees it: it owns ``weight_scores``."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.weight_scores = nn.Parameter(scores.clone())


def client_masks(scores: torch.Tensor, torch_seed: int = 42) -> np.ndarray:
    torch.manual_seed(torch_seed)  # as fl4health's set_all_random_seeds(42) in every client
    return L.select_scores_and_sample_masks(Scores(scores), None)[0][0]


def agreement_bounds(pa: np.ndarray, pb: np.ndarray, sigmas: float = 6.0) -> tuple[float, float]:
    """Mean and half-width of the agreement rate of two independent Bernoulli mask vectors."""
    q = pa * pb + (1 - pa) * (1 - pb)
    n = q.size
    return float(q.mean()), sigmas * math.sqrt(float((q * (1 - q)).sum())) / n


def sigmoid(x: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(x.double()).numpy()


def test_equal_torch_seeds_different_scores_give_independent_masks(backend):
    # Two clients after local training from the same global scores: the scores differ a little.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200_000, generator=g)
    a = base + 0.01 * torch.randn(base.shape, generator=g)
    b = base + 0.01 * torch.randn(base.shape, generator=g)
    ma, mb = client_masks(a), client_masks(b)
    observed = float((ma == mb).mean())
    expected, width = agreement_bounds(sigmoid(a), sigmoid(b))
    # Common random numbers would agree on ~99% of elements; independence predicts ~60%.
    assert abs(observed - expected) < width, (observed, expected, width)


def test_equal_torch_seeds_and_scores_reproduce_the_masks(backend):
    scores = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(client_masks(scores), client_masks(scores))
    assert not np.array_equal(client_masks(scores, torch_seed=42), client_masks(scores, torch_seed=43))


def test_a_single_changed_score_changes_the_stream(backend):
    scores = torch.randn(3, 1000, generator=torch.Generator().manual_seed(2))
    changed = scores.clone()
    changed[2, 999] = torch.nextafter(changed[2, 999], torch.tensor(math.inf))  # one ulp, one element
    ma, mb = client_masks(scores), client_masks(changed)
    expected, width = agreement_bounds(sigmoid(scores), sigmoid(changed))
    assert abs(float((ma == mb).mean()) - expected) < width


def test_explicit_seed_is_the_philox_key_itself(backend):
    # seed= keeps its documented meaning (the key), whatever the scores.
    scores = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    masks = L.select_scores_and_sample_masks(Scores(scores), None, seed=7)[0][0]
    flat = _torch_ops.sample_masks([scores], 7, torch.int64).numpy()
    assert np.array_equal(masks, flat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_compiled_fingerprint_key_equals_the_torch_twin(dtype):
    if ops.backend() != "compiled":
        pytest.skip("compiled module not loaded")
    g = torch.Generator().manual_seed(4)
    # Tensor and 64-element block boundaries anywhere, several chunks.
    scores = [torch.randn(n, generator=g).to(dtype) for n in (1, 63, 65, 1 << 16, (1 << 16) + 3, 1000)]
    for seed in (0, 5, 2**63 + 11):
        signed = seed - 2**64 if seed >= 2**63 else seed
        got = torch.ops.layersel.sample_masks(scores, signed, torch.int64, True)
        want = _torch_ops.sample_masks(scores, seed, torch.int64, key_by_scores=True)
        assert torch.equal(got, want)
        key = _torch_ops.key_from_scores(seed, _torch_ops.score_fingerprint(scores), sum(s.numel() for s in scores))
        assert torch.equal(got, _torch_ops.sample_masks(scores, key, torch.int64))


def test_fingerprint_definition_by_hand():
    scores = [torch.tensor([1.5, -2.0], dtype=torch.float32), torch.tensor([3.0], dtype=torch.float64)]
    mask64 = (1 << 64) - 1

    def w(lane: int, mul: int, xor: int) -> int:
        return (((lane * mul) & 0xFFFFFFFF) ^ xor) | 1

    bits = [
        int(torch.tensor([1.5]).view(torch.int32)) & 0xFFFFFFFF,
        int(torch.tensor([-2.0]).view(torch.int32)) & 0xFFFFFFFF,
        int(torch.tensor([3.0], dtype=torch.float64).view(torch.int64)) & mask64,
    ]
    want = 0
    for g, v in enumerate(bits):
        term = (v & 0xFFFFFFFF) * w(g, 0x9E3779B9, 0x85EBCA6B) + (v >> 32) * w(g, 0xC2B2AE35, 0x27D4EB2F)
        want = (want + term * (2 * (g // 64) + 1)) & mask64
    assert _torch_ops.score_fingerprint(scores) == want


def test_thread_count_does_not_change_unseeded_masks():
    if ops.backend() != "compiled":
        pytest.skip("compiled module not loaded")
    scores = [torch.randn(5 * (1 << 16) + 17, generator=torch.Generator().manual_seed(5))]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = torch.ops.layersel.sample_masks(scores, 3, torch.uint8, True)
        torch.set_num_threads(max(2, previous))
        b = torch.ops.layersel.sample_masks(scores, 3, torch.uint8, True)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(a, b)
