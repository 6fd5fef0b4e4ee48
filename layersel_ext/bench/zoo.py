"""Benchmark models with synthetic weights (no downloads) and their 'start of round' copies."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def bert_like(layers: int = 12, d: int = 768, vocab: int = 30522) -> nn.Module:
    """BERT-base shape: 30522x768 embedding + 12 encoder layers (d=768, ff=3072): ~109M params, 149 tensors."""

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word = nn.Embedding(vocab, d)
            self.position = nn.Embedding(512, d)
            self.token_type = nn.Embedding(2, d)
            self.norm = nn.LayerNorm(d)
            layer = nn.TransformerEncoderLayer(d, max(1, d // 64), 4 * d, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    return Bert()


def many_small(n: int = 300) -> nn.Module:
    """300 x [Linear(64, 64), BatchNorm1d(64)]: 2100 tiny tensors, int64 counters included."""
    return nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(64, 64), nn.BatchNorm1d(64))])


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )


def resnet_like() -> nn.Module:
    """ResNet-18 layout with BatchNorm: ~11.2M params, 122 tensors."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
        cin = cout
    layers.append(nn.Linear(512, 1000))
    return nn.Sequential(*layers)


def big_stack(params: int = 1_000_000_000) -> nn.Module:
    """About `params` float32 parameters in 4096x4096 linears (for the 1B row, memory permitting)."""
    n = max(1, params // (4096 * 4096 + 4096))
    return nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(n)])


def _masked_classes():
    from fl4health.model_bases.masked_layers import masked_conv, masked_linear
    from fl4health.model_bases.masked_layers import masked_normalization_layers as mn

    return masked_conv, masked_linear, mn


def fedpm_example() -> nn.Module:
    """fl4health's FedPM example shape: 4 masked convs + 3 masked linears (~1.9M scores)."""
    conv, lin, _ = _masked_classes()
    return nn.Sequential(
        conv.MaskedConv2d(3, 64, 3), conv.MaskedConv2d(64, 64, 3), conv.MaskedConv2d(64, 128, 3),
        conv.MaskedConv2d(128, 128, 3), nn.Flatten(), lin.MaskedLinear(128 * 5 * 5, 256),
        lin.MaskedLinear(256, 256), lin.MaskedLinear(256, 10),
    )  # fmt: skip


def masked_mlp() -> nn.Module:
    """6 x [MaskedLinear(2048, 2048), MaskedLayerNorm(2048)]: 25.2M scores."""
    _, lin, mn = _masked_classes()
    return nn.Sequential(*[m for _ in range(6) for m in (lin.MaskedLinear(2048, 2048), mn.MaskedLayerNorm(2048))])


def masked_cnn() -> nn.Module:
    """12 x [MaskedConv2d(256, 256, 3), MaskedBatchNorm2d(256)]: 7.1M scores."""
    conv, _, mn = _masked_classes()
    return nn.Sequential(*[m for _ in range(12) for m in (conv.MaskedConv2d(256, 256, 3), mn.MaskedBatchNorm2d(256))])


def trained_pair(factory: Callable[[], nn.Module], device: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(model after a round, model at the start): a third of the tensors frozen, the rest drifted."""
    torch.manual_seed(seed)
    initial = factory().to(device)
    model = copy.deepcopy(initial)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if i % 3 != 2:
                p.add_(torch.randn_like(p), alpha=1e-3 * (1 + i % 5))
        for name, b in model.named_buffers():
            if b.dtype == torch.int64:
                b.add_(7)
            else:
                b.mul_(1.01)
    return model, initial


LAYER_MODELS: dict[str, Callable[[], nn.Module]] = {
    "bert_like": bert_like,
    "many_small": many_small,
    "resnet_like": resnet_like,
}
MASKED_MODELS: dict[str, Callable[[], nn.Module]] = {
    "fedpm_example": fedpm_example,
    "masked_mlp": masked_mlp,
    "masked_cnn": masked_cnn,
}
QUICK_LAYER_MODELS: dict[str, Callable[[], nn.Module]] = {
    "bert_tiny": lambda: bert_like(layers=2, d=128, vocab=2000),
    "many_small_30": lambda: many_small(30),
}
QUICK_MASKED_MODELS: dict[str, Callable[[], nn.Module]] = {"fedpm_example": fedpm_example}
