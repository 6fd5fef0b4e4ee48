"""layersel_ext.wire: the compact FedPM mask format is lossless, fused, robust, and refuses a foreign peer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import DEVICES, fl4health_criteria, fl4health_strategies
from torch import nn

import layersel_ext as L
import layersel_ext.fl4health as lf
from layersel_ext import _bits, ops, wire

MASK_DTYPES = [np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint32, np.uint64]
# shapes with sizes that are not multiples of 8, 0-d and empty arrays among them
SHAPES = [(3, 5), (), (0,), (7,), (8,), (2, 0, 3), (4, 3, 3, 3), (1,), (129,)]


def masked_model(device: str = "cpu") -> nn.Module:
    fl4health_criteria()  # the masked layer classes are fl4health's
    from fl4health.model_bases.masked_layers.masked_conv import MaskedConv2d
    from fl4health.model_bases.masked_layers.masked_linear import MaskedLinear

    torch.manual_seed(3)
    model = nn.Sequential(MaskedConv2d(3, 5, 3), nn.Flatten(), MaskedLinear(5, 7), MaskedLinear(7, 3, bias=False))
    return model.to(device)


def random_masks(rng: np.random.Generator, dtype: type) -> list[np.ndarray]:
    return [rng.integers(0, 2, size=s).astype(dtype) for s in SHAPES]


def assert_same_arrays(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    """Equal arrays, down to how their dtypes print (an explicit ``<f4`` equals ``float32`` but
    prints, and so hashes in a digest, differently)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert repr(g.dtype) == repr(w.dtype) and g.shape == w.shape and np.array_equal(g, w)


@pytest.mark.parametrize("dtype", MASK_DTYPES)
def test_masks_round_trip_as_one_bitmap(dtype):
    rng = np.random.default_rng(0)
    masks = random_masks(rng, dtype)
    names = [f"layer{i}.weight_scores" for i in range(len(masks))]
    packed = wire.CompactMaskPacker().pack_parameters(masks, names)
    assert len(packed) == 5 and packed[0][:4].tobytes() == wire.MAGIC and packed[0][5] == wire.FORM_BITMAP
    total = sum(m.size for m in masks)
    assert packed[2].dtype == np.uint8 and packed[2].size == -(-total // 8)
    # the documented bit order: element i at bit i % 8 of byte i // 8
    flat = np.concatenate([m.ravel() for m in masks])
    assert all(((packed[2][i // 8] >> (i % 8)) & 1) == flat[i] for i in range(total))
    arrays, got_names = wire.CompactMaskPacker().unpack_parameters(packed)
    assert got_names == names
    assert_same_arrays(arrays, masks)


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.bool_])
def test_masks_unpack_the_same_without_the_compiled_module(monkeypatch, dtype):
    """The numpy expansion (no compiled module) gives what the compiled one gives."""
    rng = np.random.default_rng(1)
    masks = random_masks(rng, dtype)
    packed = wire.CompactMaskPacker().pack_parameters(masks, [f"m{i}" for i in range(len(masks))])
    compiled, _ = wire.CompactMaskPacker().unpack_parameters(packed)
    monkeypatch.setattr(ops, "COMPILED", None)
    plain, _ = wire.CompactMaskPacker().unpack_parameters(packed)
    assert_same_arrays(compiled, masks)
    assert_same_arrays(plain, masks)


def test_masks_unpack_from_a_strided_bitmap():
    """A bitmap handed over as a strided view (not off the wire, but a caller's array) decodes as its
    contiguous copy does."""
    masks = random_masks(np.random.default_rng(3), np.int64)
    packed = wire.CompactMaskPacker().pack_parameters(masks, [f"m{i}" for i in range(len(masks))])
    spread = np.zeros(2 * packed[2].size, np.uint8)
    spread[::2] = packed[2]
    arrays, _ = wire.CompactMaskPacker().unpack_parameters([*packed[:2], spread[::2], *packed[3:]])
    assert_same_arrays(arrays, masks)


def test_unpacked_masks_survive_later_unpacks():
    """Masks large enough to come from the output cache stay as decoded while the caller holds them,
    however many messages are decoded after them (the cache serves only buffers nobody holds)."""
    rng = np.random.default_rng(2)
    messages = [[rng.integers(0, 2, size=(600, 700)).astype(np.int64) for _ in range(3)] for _ in range(4)]
    packer = wire.CompactMaskPacker()
    held = [packer.unpack_parameters(packer.pack_parameters(m, ["a", "b", "c"]))[0] for m in messages]
    for _ in range(3):  # more decodes, whose results are dropped at once
        packer.unpack_parameters(packer.pack_parameters(messages[0][::-1], ["a", "b", "c"]))
    for got, want in zip(held, messages):
        assert_same_arrays(got, want)


def test_other_arrays_round_trip_plainly():
    rng = np.random.default_rng(1)
    arrays = [rng.random((3, 4)), rng.random(5).astype(np.float32), np.array(2.5), np.array([0, 1, 2], np.int64)]
    names = ["a", "b.é", "c", "d"]
    packed = wire.CompactMaskPacker().pack_parameters(arrays, names)
    assert packed[0][5] == wire.FORM_PLAIN
    got, got_names = wire.unpack(packed)
    assert got_names == names
    assert_same_arrays(got, arrays)
    assert wire.unpack(wire.CompactMaskPacker().pack_parameters([], [])) == ([], [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_dtype", [np.int64, np.uint8, torch.int32])
def test_fused_sampling_equals_packing_the_reference_masks(device, mask_dtype):
    model = masked_model(device)
    masks, names = L.select_scores_and_sample_masks(model, None, seed=11, mask_dtype=mask_dtype)
    want = wire.CompactMaskPacker().pack_parameters(masks, names)
    got = wire.sample_masks_packed(model, seed=11, mask_dtype=mask_dtype)
    assert_same_arrays(got, want)
    # without a seed: the same draw from the same generator state gives the same stream
    torch.manual_seed(5)
    masks, names = L.select_scores_and_sample_masks(model, None)
    torch.manual_seed(5)
    assert_same_arrays(wire.sample_masks_packed(model), wire.CompactMaskPacker().pack_parameters(masks, names))


def test_at_least_60_times_fewer_bytes_than_int64_masks():
    fl4health_criteria()
    from layersel_ext.bench import zoo

    torch.manual_seed(0)
    model = zoo.fedpm_example()
    masks, names = L.select_scores_and_sample_masks(model, None, seed=1)
    from fl4health.parameter_exchange.parameter_packer import ParameterPackerWithLayerNames

    reference = sum(a.nbytes for a in ParameterPackerWithLayerNames().pack_parameters(masks, names))
    compact = sum(a.nbytes for a in wire.sample_masks_packed(model, seed=1))
    assert reference / compact >= 60, (reference, compact)


def test_fedpm_server_aggregates_compact_masks_bit_for_bit():
    fl4health_strategies()
    from fl4health.parameter_exchange.parameter_packer import ParameterPackerWithLayerNames
    from fl4health.strategies.fedpm import FedPm

    model = masked_model()
    clients = [L.select_scores_and_sample_masks(model, None, seed=s) for s in (1, 2, 3)]
    results = {}
    for name, packer in (("fl4health", ParameterPackerWithLayerNames()), ("compact", wire.CompactMaskPacker())):
        strategy = FedPm()
        strategy.parameter_packer = packer
        sent = [(packer.pack_parameters(masks, names), 10) for masks, names in clients]
        results[name] = strategy.aggregate_bayesian(sent)
        back, back_names = packer.unpack_parameters(packer.pack_parameters(list(results[name].values()),
                                                                           list(results[name])))  # fmt: skip
        assert back_names == list(results[name])
        assert_same_arrays(back, list(results[name].values()))
    assert list(results["fl4health"]) == list(results["compact"])
    assert_same_arrays(list(results["compact"].values()), list(results["fl4health"].values()))


def test_a_peer_in_the_other_format_fails_naming_it():
    fl4health_criteria()
    from fl4health.parameter_exchange.parameter_packer import ParameterPackerWithLayerNames

    model = masked_model()
    masks, names = L.select_scores_and_sample_masks(model, None, seed=4)
    # fl4health's stream to a compact peer
    with pytest.raises(ValueError, match="no LSXW header.*patch\\(wire='compact'\\)"):
        wire.unpack(ParameterPackerWithLayerNames().pack_parameters(masks, names))
    # a compact stream to fl4health's packer: the one "layer" it sees is named by the hint, which
    # the client's load_state_dict(strict=True) reports when the server sends it back
    _, foreign_names = ParameterPackerWithLayerNames().unpack_parameters(wire.sample_masks_packed(model, seed=4))
    assert foreign_names == [wire.FOREIGN_PEER_HINT]
    state = model.state_dict()
    state[foreign_names[0]] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="patch\\(wire='compact'\\)"):
        copy.deepcopy(model).load_state_dict(state, strict=True)


def _mutations(rng: np.random.Generator, packed: list[np.ndarray]):
    """Streams derived from a valid one: truncated, reordered, retyped, with meta numbers and bytes changed."""
    yield packed[: rng.integers(0, len(packed))]
    i = int(rng.integers(0, len(packed)))
    yield [a for j, a in enumerate(packed) if j != i]
    yield [packed[j] for j in rng.permutation(len(packed))]
    a = packed[i]
    yield packed[:i] + [a[: rng.integers(0, max(a.size, 1))] if a.ndim else a] + packed[i + 1 :]
    if a.dtype.kind in "iu" and a.size:
        b = a.copy()
        k = int(rng.integers(0, b.size))
        b.flat[k] = np.array(rng.choice([-1, 0, 1, 2, 9, 2**31, 2**62, -(2**62), int(b.flat[k]) + 1])).astype(b.dtype)
        yield packed[:i] + [b] + packed[i + 1 :]
        yield packed[:i] + [b.astype(np.float64)] + packed[i + 1 :]
        yield packed[:i] + [b.reshape(1, -1)] + packed[i + 1 :]
    yield packed[:i] + [np.array(["x"])] + packed[i + 1 :]
    yield packed[:i] + [np.frombuffer(rng.bytes(int(rng.integers(0, 64))), np.uint8)] + packed[i + 1 :]


def test_fuzzed_streams_give_value_errors_never_anything_else():
    rng = np.random.default_rng(2026)
    cases = 0
    for round_ in range(300):
        dtype = MASK_DTYPES[round_ % len(MASK_DTYPES)]
        masks = [rng.integers(0, 2, size=s).astype(dtype) for s in SHAPES[: 1 + round_ % len(SHAPES)]]
        names = [f"n{i}" for i in range(len(masks))]
        valid = wire.CompactMaskPacker().pack_parameters(masks, names)
        for stream in _mutations(rng, valid):
            cases += 1
            try:
                arrays, got_names = wire.unpack(stream)
            except ValueError:
                continue
            # accepted: then it is a well-formed stream whose arrays match its own description
            assert len(arrays) == len(got_names)
            if stream[0][5] == wire.FORM_BITMAP:
                assert all(set(np.unique(a)) <= {0, 1} for a in arrays)
    assert cases >= 2000


def test_patch_compact_wire_installs_the_packers_and_unpatch_restores():
    fl4health_strategies()
    from fl4health.parameter_exchange.fedpm_exchanger import FedPmExchanger
    from fl4health.parameter_exchange.layer_exchanger import DynamicLayerExchanger
    from fl4health.parameter_exchange.parameter_packer import ParameterPackerWithLayerNames
    from fl4health.strategies.fedpm import FedPm

    lf.unpatch()
    init_exchanger, init_strategy = FedPmExchanger.__init__, FedPm.__init__
    model = masked_model()
    try:
        lf.patch(wire="compact")
        with pytest.raises(ValueError, match="already patched with wire='compact'"):
            lf.patch()
        exchanger, strategy = FedPmExchanger(), FedPm()
        assert isinstance(exchanger.parameter_packer, wire.CompactMaskPacker)
        assert isinstance(strategy.parameter_packer, wire.CompactMaskPacker)
        torch.manual_seed(9)
        pushed = exchanger.push_parameters(model)
        torch.manual_seed(9)
        assert_same_arrays(pushed, wire.sample_masks_packed(model))
        # the server reads it, aggregates, and the client pulls the answer back
        aggregated = strategy.aggregate_bayesian([(pushed, 1)])
        back = strategy.parameter_packer.pack_parameters(list(aggregated.values()), list(aggregated))
        exchanger.pull_parameters(back, model)
    finally:
        lf.unpatch()
    assert FedPmExchanger.__init__ is init_exchanger and FedPm.__init__ is init_strategy
    assert FedPmExchanger.push_parameters is DynamicLayerExchanger.push_parameters
    assert isinstance(FedPmExchanger().parameter_packer, ParameterPackerWithLayerNames)
    with pytest.raises(ValueError, match="wire must be one of"):
        lf.patch(wire="bits")
    assert not lf.is_patched()


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 65537])
def test_device_packer_equals_numpy_packbits(n):
    # _bits.pack_bits is what a CUDA model's masks go through; torch ops, so the CPU proves its bits
    flat = torch.randint(0, 2, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert np.array_equal(_bits.pack_bits(flat).numpy(), wire.pack_bits(flat.numpy()))


BIT_CASES = {
    "one tensor, several chunks, odd length": [(2 * 65536 + 5,)],
    "tiny tensors: bytes shared by chunks": [(k % 7 + 1,) for k in range(600)],
    "mixed": [(3, 70001), (5,), (1,), (64, 1000), (9, 9), (0,), (65536,), (13,)],
}


@pytest.mark.parametrize("case", list(BIT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("key_by_scores", [False, True])
def test_sample_mask_bits_are_the_packed_masks(case, dtype, key_by_scores, backend):
    """The fused CPU kernel (and the torch twin): sample_masks' masks, packed in the wire's bit order,
    whatever the chunk and byte boundaries; the last byte's spare bits zero."""
    g = torch.Generator().manual_seed(len(case) + len(BIT_CASES[case]))
    scores = [(torch.randn(shape, generator=g) * 3).to(dtype) for shape in BIT_CASES[case]]
    for seed in (0, 77, 2**64 - 5):
        bits = ops.sample_mask_bits(scores, seed, key_by_scores)
        masks = ops.sample_masks(scores, seed, torch.uint8, key_by_scores)
        assert bits.dtype == torch.uint8 and bits.shape == ((masks.numel() + 7) // 8,)
        assert np.array_equal(bits.numpy(), wire.pack_bits(masks.numpy()))


def test_sample_mask_bits_of_nothing():
    assert ops.sample_mask_bits([], 3).shape == (0,)
    assert ops.sample_mask_bits([torch.zeros(0)], 3).shape == (0,)


def test_fused_sampling_of_a_model_without_scores_equals_packing_nothing():
    assert_same_arrays(wire.sample_masks_packed(nn.Linear(2, 2)), wire.CompactMaskPacker().pack_parameters([], []))
