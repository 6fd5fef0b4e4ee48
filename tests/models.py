"""Randomised test models: what FL clients train, plus the awkward cases."""

from __future__ import annotations

import copy
import random

import torch
from torch import nn


class Tiny(nn.Module):
    """0-d and size-1 parameters, a 0-d buffer, and an empty one."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.one = nn.Parameter(torch.ones(1, 1, 1))
        self.lin = nn.Linear(3, 1)
        self.register_buffer("step", torch.tensor(3, dtype=torch.int64))
        self.register_buffer("empty", torch.zeros(0))
        self.register_buffer("not_saved", torch.ones(2), persistent=False)


def conv_bn_net(width: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )  # fmt: skip


def transformer(d: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Embedding(100, d),
        nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 2 * d, batch_first=True), num_layers=2),
        nn.LayerNorm(d),
        nn.Linear(d, 5),
    )


def many_small(n: int = 20) -> nn.Module:
    return nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(8, 8), nn.BatchNorm1d(8))])


def make_pair(
    base: nn.Module,
    seed: int,
    dtype: torch.dtype | None = None,
    frozen: float = 0.3,
    identical: bool = True,
    constant: bool = False,
    device: str = "cpu",
) -> tuple[nn.Module, nn.Module]:
    """(trained model, initial model): some layers frozen (zero drift), some with equal drift."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    model = base
    with torch.no_grad():
        if constant:
            for p in model.parameters():
                p.fill_(0.25)
        twins: dict[tuple[int, ...], torch.Tensor] = {}
        plan = []  # per parameter: "frozen", "twin" (same values and delta as an earlier one) or "random"
        for p in model.parameters():
            shape = tuple(p.shape)
            if rng.random() < frozen:
                plan.append("frozen")
            elif identical and shape in twins and rng.random() < 0.5:
                p.copy_(twins[shape])  # identical in both models, so the drifts tie bit for bit
                plan.append("twin")
            else:
                twins[shape] = p.detach().clone()
                plan.append("random")
    if dtype is not None:
        model = model.to(dtype)
    model = model.to(device)
    initial = copy.deepcopy(model)
    deltas: dict[tuple[int, ...], torch.Tensor] = {}
    with torch.no_grad():
        for kind, p in zip(plan, model.parameters()):
            shape = tuple(p.shape)
            if kind == "frozen":
                continue  # drift exactly 0: ties with every other frozen layer
            if constant:
                delta = torch.full(p.shape, float(rng.choice([0.5, 1.0, 2.0])))
            elif kind == "twin" and shape in deltas:
                delta = deltas[shape]
            else:
                delta = torch.randn(p.shape, generator=gen) * rng.choice([1e-3, 1e-2, 0.1, 1.0])
                deltas[shape] = delta
            p.add_(delta.to(device=p.device, dtype=p.dtype))
        for name, b in model.named_buffers():
            if b.dtype == torch.int64 and "num_batches" in name:
                b.add_(rng.randint(0, 5))
            elif b.is_floating_point() and rng.random() < 0.5:
                b.add_((torch.rand(b.shape, generator=gen) * 0.1).to(device=b.device, dtype=b.dtype))
    return model, initial


def model_zoo(seed: int) -> list[tuple[str, nn.Module]]:
    torch.manual_seed(seed)
    return [
        ("conv_bn", conv_bn_net()),
        ("transformer", transformer()),
        ("many_small", many_small()),
        ("tiny", Tiny()),
    ]
