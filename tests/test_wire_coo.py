"""layersel_ext.wire_coo: the compact sparse COO format is lossless, small, robust, and refuses a foreign peer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fl4health_criteria, fl4health_strategies
from test_wire import assert_same_arrays

from layersel_ext import ops, wire, wire_coo
from layersel_ext.wire_coo import CompactCooPacker

# (fl4health's extract_coo_info_from_dense fails on a 0-d tensor, so its messages never hold one;
# a hand-made 0-d entry is in test_zero_dim_entry_round_trips)
SHAPES = [(3, 5), (7,), (2, 3, 4, 5), (0,), (2, 0, 3), (1,), (300, 200), (40, 40, 3, 3)]


def coo_of(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return CompactCooPacker.extract_coo_info_from_dense(x)


def random_message(rng: np.random.Generator, density: float, dtype=torch.float32):
    values, indices, shapes, names = [], [], [], []
    for i, shape in enumerate(SHAPES):
        x = torch.from_numpy(np.asarray(rng.standard_normal(shape) * 10)).to(dtype)
        x[torch.from_numpy(np.asarray(rng.random(shape) >= density))] = 0
        v, idx, s = coo_of(x)
        values.append(v), indices.append(idx), shapes.append(s), names.append(f"t{i}.weight")
    return values, (indices, shapes, names)


def assert_same_message(got, want) -> None:
    (gv, (gi, gs, gn)), (wv, (wi, ws, wn)) = got, want
    assert gn == wn
    assert_same_arrays(gv, wv)
    assert_same_arrays(gi, wi)
    assert_same_arrays(gs, ws)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.01, 0.1, 0.4, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64])
def test_round_trip_equals_fl4health_message(density, dtype):
    rng = np.random.default_rng(int(density * 1000) + 7)
    message = random_message(rng, density, dtype)
    packed = CompactCooPacker().pack_parameters(message[0], message[1])
    assert packed[0][5] == wire.FORM_COO and len(packed) == 6
    assert_same_message(CompactCooPacker().unpack_parameters(packed), message)


def test_every_position_encoding_round_trips():
    cases = {
        wire_coo.POS_BITMAP: np.arange(0, 1000, 2),  # dense: a bitmap
        wire_coo.POS_GAP8: np.arange(0, 100000, 97),  # gaps < 256
        wire_coo.POS_GAP16: np.arange(16384, 10**7, 20000),  # gaps of 3 varint bytes, 2 fixed
        wire_coo.POS_U32: np.array([9, 3, 7, 3]),  # not increasing: offsets as they are
    }
    for code, offsets in cases.items():
        numel = int(offsets.max()) + 1 if code != wire_coo.POS_BITMAP else 1000
        got_code, payload = wire_coo._encode_positions(offsets.astype(np.uint64), numel)
        assert got_code == code
        back = wire_coo._decode_positions(got_code, payload, offsets.size, numel, "t")
        assert np.array_equal(back, offsets.astype(np.uint64))
    rng = np.random.default_rng(3)
    gaps = np.concatenate([rng.integers(0, 2**20, 500), [2**40, 0, 2**62 - 2**41]]).astype(np.uint64)
    payload = wire_coo._varint_encode(gaps)
    assert np.array_equal(wire_coo._varint_decode(payload, gaps.size, "t"), gaps)
    offsets = np.cumsum(gaps + np.uint64(1)) - np.uint64(1)
    code, payload = wire_coo._encode_positions(offsets, 2**62 - 1)
    assert code == wire_coo.POS_VARINT
    assert np.array_equal(wire_coo._decode_positions(code, payload, offsets.size, 2**62 - 1, "t"), offsets)


def test_zero_dim_entry_round_trips():
    message = (
        [np.array([2.5], np.float32)],
        ([np.zeros((1, 0), np.int64)], [np.array([])], ["s"]),
    )  # fl4health: np.array(list(x.shape))
    packed = CompactCooPacker().pack_parameters(*message)
    assert packed[0][5] == wire.FORM_COO
    assert_same_message(CompactCooPacker().unpack_parameters(packed), message)


def test_unusual_messages_go_plain_and_still_round_trip():
    v, i, s = coo_of(torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
    for message in (
        ([v], ([i.astype(np.int32)], [s], ["a"])),  # int32 indices
        ([v], ([i], [s.astype(np.int32)], ["a"])),  # a shape array fl4health would not build
        ([v], ([i[::-1] + 5], [s], ["a"])),  # out of range
    ):
        packed = CompactCooPacker().pack_parameters(*message)
        assert packed[0][5] == wire.FORM_COO_PLAIN and len(packed) % 3 == 0
        assert_same_message(CompactCooPacker().unpack_parameters(packed), message)


def test_bytes_at_fl4health_sparsity_levels():
    # bert-like 2-D weights: fl4health sends 4 + 16 bytes per selected fp32 value
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((768, 3072)).astype(np.float32))
    for density, want_ratio in ((0.01, 2.5), (0.1, 2.5), (0.4, 1.0)):
        y = x.clone()
        y[torch.from_numpy(rng.random(y.shape) >= density)] = 0
        v, i, s = coo_of(y)
        reference = v.nbytes + i.nbytes + s.nbytes
        compact = sum(a.nbytes for a in CompactCooPacker().pack_parameters([v], ([i], [s], ["w"])))
        assert reference / compact >= want_ratio, (density, reference / compact)
        assert compact <= y.numel() * 4 + 256, (density, compact)  # never more than the dense tensor


def test_a_peer_in_the_other_format_fails():
    fl4health_criteria()
    from fl4health.parameter_exchange.parameter_packer import SparseCooParameterPacker

    message = random_message(np.random.default_rng(1), 0.1)
    with pytest.raises(ValueError, match="no LSXW header"):
        CompactCooPacker().unpack_parameters(SparseCooParameterPacker().pack_parameters(*message))
    with pytest.raises(AssertionError):  # fl4health's packer stops at once on a compact stream
        SparseCooParameterPacker().unpack_parameters(CompactCooPacker().pack_parameters(*message))
    masks = wire.CompactMaskPacker().pack_parameters([np.ones(3, np.int64)], ["m"])
    with pytest.raises(ValueError, match="mask stream"):
        CompactCooPacker().unpack_parameters(masks)
    with pytest.raises(ValueError, match="COO stream"):
        wire.unpack(CompactCooPacker().pack_parameters(*message))


def test_fl4health_server_aggregation_is_bitwise_unchanged():
    fl4health_strategies()
    from fl4health.parameter_exchange.parameter_packer import SparseCooParameterPacker
    from fl4health.strategies.fedavg_sparse_coo_tensor import FedAvgSparseCooTensor

    messages = [random_message(np.random.default_rng(s), 0.1) for s in (1, 2)]
    out = {}
    for name, packer in (("fl4health", SparseCooParameterPacker()), ("compact", CompactCooPacker())):
        strategy = FedAvgSparseCooTensor()
        strategy.parameter_packer = packer
        out[name] = strategy.aggregate([(packer.pack_parameters(*m), 10 + k) for k, m in enumerate(messages)])
    assert list(out["fl4health"]) == list(out["compact"])
    for key in out["fl4health"]:
        a, b = out["fl4health"][key], out["compact"][key]
        assert a.dtype == b.dtype and torch.equal(a, b)


def _mutations(rng: np.random.Generator, packed: list[np.ndarray]):
    i = int(rng.integers(0, len(packed)))
    a = packed[i]
    yield packed[: rng.integers(0, len(packed))]
    yield [packed[j] for j in rng.permutation(len(packed))]
    yield packed[:i] + [a[: rng.integers(0, max(a.size, 1))] if a.ndim else a] + packed[i + 1 :]
    if a.dtype.kind in "iu" and a.size:
        for _ in range(3):
            b = a.copy()
            k = int(rng.integers(0, b.size))
            new = rng.choice([-1, 0, 1, 2, 7, 255, 2**31, 2**62, -(2**62), int(b.flat[k]) + 1, int(b.flat[k]) ^ 0x80])
            b.flat[k] = np.array(new).astype(b.dtype)
            yield packed[:i] + [b] + packed[i + 1 :]
        yield packed[:i] + [a.astype(np.float32)] + packed[i + 1 :]
    yield packed[:i] + [np.frombuffer(rng.bytes(int(rng.integers(0, 64))), np.uint8)] + packed[i + 1 :]


def _unpack_with(backend: str, stream: list[np.ndarray]):
    """("error", message) or ("ok", the decoded message), decoded by one codec."""
    previous = ops.backend()
    ops.set_backend(backend)
    try:
        return "ok", wire_coo.unpack_coo(stream)
    except ValueError as exc:
        return "error", str(exc)
    finally:
        ops.set_backend(previous)


def _pack_with(backend: str, message) -> list[np.ndarray]:
    """The compact stream of a message, packed by one codec."""
    previous = ops.backend()
    ops.set_backend(backend)
    try:
        return CompactCooPacker().pack_parameters(*message)
    finally:
        ops.set_backend(previous)


def assert_both_decode(packed: dict[str, list[np.ndarray]], message) -> None:
    """Both codecs packed the same bytes, and each decodes them to the message."""
    assert len(packed["compiled"]) == len(packed["torch"])
    for a, b in zip(packed["compiled"], packed["torch"]):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    for codec in _codecs():
        kind, got = _unpack_with(codec, packed["torch"])
        assert kind == "ok", got
        assert_same_message(got, message)


def _arrays(message) -> list[np.ndarray]:
    values, (indices, shapes, _) = message
    return [*values, *indices, *shapes]


def _codecs() -> list[str]:
    return ["torch", "compiled"] if ops.COMPILED is not None else ["torch"]


def test_fuzzed_streams_give_value_errors_never_anything_else():
    """Thousands of mutated streams: each codec (numpy; compiled) gives a ValueError or a message
    that is in range, and both give the same one (the same error text, or the same arrays)."""
    rng = np.random.default_rng(2027)
    cases = 0
    for round_ in range(240):
        density = [0.0, 0.01, 0.2, 0.7, 1.0][round_ % 5]
        message = random_message(rng, density)
        k = 1 + round_ % len(message[0])
        message = (message[0][:k], (message[1][0][:k], message[1][1][:k], message[1][2][:k]))
        valid = CompactCooPacker().pack_parameters(*message)
        for stream in _mutations(rng, valid):
            cases += 1
            outcomes = [_unpack_with(codec, stream) for codec in _codecs()]
            kind, got = outcomes[0]
            for other_kind, other in outcomes[1:]:
                assert other_kind == kind, (got, other)
                if kind == "error":
                    assert other == got
                else:  # byte for byte: a mutated value may be a NaN
                    flat = [[a.dtype, a.shape, a.tobytes()] for part in (got, other) for a in _arrays(part)]
                    assert flat[: len(flat) // 2] == flat[len(flat) // 2 :]
            if kind == "error":
                continue
            values, (indices, shapes, _) = got
            for v, i, s in zip(values, indices, shapes):  # accepted: self-consistent and in range
                assert i.shape == (v.size, s.size)
                if i.size:
                    assert i.min() >= 0 and np.all(i < s.astype(np.int64))
    assert cases >= 1500


def message_of_offsets(rng: np.random.Generator, cases) -> tuple[list[np.ndarray], tuple[list, list, list[str]]]:
    """An fl4health message with entries at the given flat offsets (in their order) of each shape."""
    values, indices, shapes, names = [], [], [], []
    dtypes = [np.float32, np.float16, np.float64, np.int8, np.bool_, np.int64]
    for t, (offsets, shape) in enumerate(cases):
        offsets = np.asarray(offsets, np.int64)
        dtype = dtypes[t % len(dtypes)]
        values.append((rng.standard_normal(offsets.size) * 50).astype(dtype))
        idx = np.stack(np.unravel_index(offsets, shape), axis=1) if shape else np.zeros((offsets.size, 0))
        indices.append(np.ascontiguousarray(idx, np.int64))
        shapes.append(np.array(list(shape)))
        names.append(f"t{t}")
    return values, (indices, shapes, names)


def test_compiled_codec_writes_the_numpy_codecs_bytes():
    """Every position code, tensors of several 65,536-entry ranges (bitmap bytes and varints that
    straddle two ranges), 1-4-D shapes with size-1 dimensions, offsets past 2**32, odd value dtypes:
    the compiled codec writes the numpy codec's bytes, and each decodes the other's stream."""
    if ops.COMPILED is None:
        pytest.skip("compiled module not loaded")
    rng = np.random.default_rng(11)

    def increasing(numel: int, gaps: np.ndarray) -> np.ndarray:
        offsets = np.cumsum(gaps.astype(np.int64) + 1) - 1
        return offsets[offsets < numel]

    cases = [
        (np.flatnonzero(rng.random(512 * 1024) < 0.4), (512, 1024)),  # bitmap, 4 ranges
        (increasing(16_000_000, rng.integers(0, 200, 160_000)), (4000, 4000)),  # gap8, 3 ranges
        (increasing(2**32, rng.integers(256, 65536, 70_000)), (2**16, 2**16)),  # gap16, 2 ranges
        (increasing(2**41, rng.integers(2**28, 2**32, 2_000)), (2**31, 2**10)),  # gap32
        (increasing(2**42, (2.0 ** rng.uniform(0, 25, 100_000)).astype(np.int64)), (2**21, 2**21)),  # varint
        (rng.permutation(300 * 700)[:100_000], (300, 700)),  # u32: not increasing, 2 ranges
        (rng.integers(0, 2**33, 1_000), (2**17, 2**16)),  # u64
        (np.flatnonzero(rng.random(40 * 40 * 9) < 0.3), (40, 40, 3, 3)),
        (np.flatnonzero(rng.random(7 * 5 * 3) < 0.5), (7, 1, 5, 1, 3)),
        (np.flatnonzero(rng.random(131_073) < 0.999), (131_073,)),  # almost dense, odd length
        ([], (0,)),
        ([], (4, 0, 2)),
        ([0], ()),
        ([], (3, 3)),
    ]
    message = message_of_offsets(rng, cases)
    packed = {codec: _pack_with(codec, message) for codec in _codecs()}
    assert packed["torch"][0][5] == wire.FORM_COO
    codes = wire_coo._read_coo_meta(packed["torch"][1])
    assert {e[3] for e in codes} == set(range(1, 8))  # every position code is exercised
    assert_both_decode(packed, message)


def test_both_codecs_agree_on_huge_and_empty_shapes():
    """Shapes near the 2**62-element bound whose sizes do not divide it, and an empty tensor whose
    other sizes multiply past it: the same stream from both codecs, decoded exactly."""
    if ops.COMPILED is None:
        pytest.skip("compiled module not loaded")
    cases = [([0, 5, 2**61], (2**61 + 1,)), ([7, 2**61], (3, (2**62 - 1) // 3)), ([], (0, 2**40, 2**40))]
    message = message_of_offsets(np.random.default_rng(3), cases)
    packed = {codec: _pack_with(codec, message) for codec in _codecs()}
    assert packed["torch"][0][5] == wire.FORM_COO
    assert_both_decode(packed, message)


def test_compiled_decoder_refuses_what_the_numpy_decoder_refuses():
    """Hand-made bad payloads, one per check, with a good tensor before and after the bad one: both
    codecs name the same tensor and the same fault."""
    rng = np.random.default_rng(12)
    good = (np.flatnonzero(rng.random(200_000) < 0.3), (200_000,))
    message = message_of_offsets(rng, [good, (np.arange(0, 90_000, 20), (300, 300)), good])
    valid = CompactCooPacker().pack_parameters(*message)
    meta = valid[1].copy()
    entries = wire_coo._read_coo_meta(meta)
    start = entries[0][4]
    end = start + entries[1][4]
    assert entries[1][3] == wire_coo.POS_GAP8

    def with_payload(code: int, payload: np.ndarray, nnz: int | None = None) -> list[np.ndarray]:
        m = meta.copy()
        # tensor #1's entry: [dtype, ndim, 300, 300, nnz, code, bytes] after tensor #0's seven numbers
        base = 1 + 5 + 1 + 2
        m[base + 2], m[base + 3], m[base + 4] = entries[1][2] if nnz is None else nnz, code, payload.size
        positions = np.concatenate([valid[2][:start], payload, valid[2][end:]])
        return [valid[0], m, positions, *valid[3:]]

    gaps = valid[2][start:end]
    u32 = np.arange(0, 90_000, 20, dtype="<u4")
    bad_streams = [
        with_payload(wire_coo.POS_U32, np.append(u32[:-1], np.uint32(90_000)).view(np.uint8)),  # offset past
        with_payload(wire_coo.POS_U32, u32.view(np.uint8)[:-1]),  # short
        with_payload(wire_coo.POS_GAP8, gaps[:-1]),  # short
        with_payload(wire_coo.POS_GAP8, np.full(gaps.size, 255, np.uint8)),  # runs past the tensor
        with_payload(wire_coo.POS_GAP16, np.full(gaps.size, 0xFFFF, "<u2").view(np.uint8)),  # a gap past
        with_payload(wire_coo.POS_VARINT, np.append(gaps, np.uint8(0x80))),  # unterminated
        with_payload(wire_coo.POS_VARINT, np.append(gaps, np.uint8(1))),  # one gap too many
        with_payload(wire_coo.POS_VARINT, np.concatenate([np.full(11, 0x81, np.uint8), gaps[1:]])),  # 12 bytes
        with_payload(wire_coo.POS_VARINT, np.concatenate([np.full(9, 0x80, np.uint8), [2], gaps[1:]]).astype(np.uint8)),
        with_payload(wire_coo.POS_BITMAP, np.zeros(90_000 // 8, np.uint8)),  # marks 0, not 4,500
        with_payload(wire_coo.POS_BITMAP, np.zeros(90_000 // 8 + 1, np.uint8)),  # too long
        with_payload(9, gaps),  # unknown code
        with_payload(2**32 + 1, gaps),  # unknown code that truncates to a known one
    ]
    for stream in bad_streams:
        outcomes = [_unpack_with(codec, stream) for codec in _codecs()]
        assert outcomes[0][0] == "error" and "tensor #1 ('t1')" in outcomes[0][1], outcomes[0]
        assert all(o == outcomes[0] for o in outcomes), outcomes


def test_decoders_refuse_two_byte_varints_past_a_small_tensor():
    """Varints of at most two bytes (the compiled decoder's vectorised first pass) in a tensor of
    10,000 elements: a gap past it, and gaps whose sum runs past it, are refused by both codecs with
    the same words; a stream that fits decodes."""
    rng = np.random.default_rng(14)
    good = (np.flatnonzero(rng.random(200_000) < 0.3), (200_000,))
    message = message_of_offsets(rng, [good, (np.arange(0, 10_000, 3000), (100, 100)), good])
    valid = CompactCooPacker().pack_parameters(*message)
    entries = wire_coo._read_coo_meta(valid[1])
    start = entries[0][4]
    end = start + entries[1][4]

    def with_varints(payload: list[int]) -> list[np.ndarray]:  # four gaps, as the 4 entries' values need
        m = valid[1].copy()
        base = 1 + 5 + 1 + 2  # tensor #1's code and bytes, after tensor #0's entry and its own shape
        m[base + 3], m[base + 4] = wire_coo.POS_VARINT, len(payload)
        positions = np.concatenate([valid[2][:start], np.array(payload, np.uint8), valid[2][end:]])
        return [valid[0], m, positions, *valid[3:]]

    # 12,000 = 0x2EE0: bytes 0xE0, 0x5D; 9,000 = 0x2328: 0xA8, 0x46; 1,500 = 0x5DC: 0xDC, 0x0B
    cases = {
        "a gap is past": with_varints([5, 0xE0, 0x5D, 0, 0]),
        "the gaps run past": with_varints([0xA8, 0x46, 0xDC, 0x0B, 0, 0]),
        "ok": with_varints([0xA8, 0x46, 0x7F, 0, 0]),
    }
    for want, stream in cases.items():
        outcomes = [_unpack_with(codec, stream) for codec in _codecs()]
        if want == "ok":
            assert outcomes[0][0] == "ok", outcomes[0]
            for _, got in outcomes:
                assert got[1][0][1].tolist() == [[90, 0], [91, 28], [91, 29], [91, 30]]
        else:
            assert outcomes[0][0] == "error" and want in outcomes[0][1], outcomes[0]
        assert all(o[0] == outcomes[0][0] for o in outcomes), outcomes
        if want != "ok":
            assert all(o == outcomes[0] for o in outcomes), outcomes


def test_patch_compact_wire_installs_the_coo_packers_and_unpatch_restores():
    fl4health_strategies()
    from fl4health.parameter_exchange.parameter_packer import SparseCooParameterPacker
    from fl4health.parameter_exchange.sparse_coo_parameter_exchanger import SparseCooParameterExchanger
    from fl4health.strategies.fedavg_sparse_coo_tensor import FedAvgSparseCooTensor

    import layersel_ext as L
    import layersel_ext.fl4health as lf

    lf.unpatch()
    torch.manual_seed(0)
    model, initial = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2)), None
    initial = __import__("copy").deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    try:
        lf.patch(wire="compact")
        exchanger = SparseCooParameterExchanger(0.3, L.largest_magnitude_change_scores)
        strategy = FedAvgSparseCooTensor()
        assert isinstance(exchanger.parameter_packer, CompactCooPacker)
        assert isinstance(strategy.parameter_packer, CompactCooPacker)
        pushed = exchanger.push_parameters(model, initial)
        assert pushed[0][:4].tobytes() == wire.MAGIC
        want = exchanger.select_parameters(model, initial)
        assert_same_message(CompactCooPacker().unpack_parameters(pushed), want)
        # the client's push (flat offsets straight to the encoder) sends pack_parameters' very bytes
        assert [a.tobytes() for a in pushed] == [a.tobytes() for a in CompactCooPacker().pack_parameters(*want)]
        aggregated = strategy.aggregate([(pushed, 1)])
        reply = [strategy.parameter_packer.extract_coo_info_from_dense(t) for t in aggregated.values()]
        packed = strategy.parameter_packer.pack_parameters(
            [r[0] for r in reply], ([r[1] for r in reply], [r[2] for r in reply], list(aggregated))
        )
        exchanger.pull_parameters(packed, initial)
    finally:
        lf.unpatch()
    assert isinstance(SparseCooParameterExchanger(0.3, L.largest_magnitude_change_scores).parameter_packer,
                      SparseCooParameterPacker)  # fmt: skip
    assert isinstance(FedAvgSparseCooTensor().parameter_packer, SparseCooParameterPacker)


def test_server_extraction_equals_fl4health():
    fl4health_criteria()
    from fl4health.parameter_exchange.parameter_packer import SparseCooParameterPacker

    torch.manual_seed(1)
    for x in (torch.randn(5, 4).relu(), torch.zeros(3), torch.zeros(0, 3), torch.randn(2, 3, 4).relu().half(),
              torch.randint(0, 2, (3, 3))):  # fmt: skip
        assert_same_arrays(
            list(CompactCooPacker.extract_coo_info_from_dense(x)),
            list(SparseCooParameterPacker.extract_coo_info_from_dense(x)),
        )
    for x in (torch.tensor(2.0), torch.tensor(0.0)):  # fl4health fails on a 0-d tensor; so does this
        with pytest.raises(IndexError):
            SparseCooParameterPacker.extract_coo_info_from_dense(x)
        with pytest.raises(IndexError):
            CompactCooPacker.extract_coo_info_from_dense(x)


def _offsets_model() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Rows of 64 and 70 elements, a 4-D kernel, biases and an int64 buffer, drifted from the start."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(70, 64), torch.nn.BatchNorm1d(64),
        torch.nn.Linear(64, 130),
    )  # fmt: skip
    initial = __import__("copy").deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model, initial


@pytest.mark.parametrize("level", [0.01, 0.3, 1.0])
def test_offsets_selection_packs_the_same_stream(backend, level):
    """select_sparse_offsets + pack_offsets (the compact client, without [nnz, ndim] indices) gives the
    entries of select_sparse_parameters and the very bytes pack_parameters makes of them, with a fused
    score function (one kernel on the CPU) and with a custom one (the indices flattened)."""
    import layersel_ext as L
    from layersel_ext.sparse_coo import select_sparse_offsets, select_sparse_parameters

    def custom(model, initial):
        return {n: p.detach().abs() for n, p in model.named_parameters()}

    model, initial = _offsets_model()
    for score in (L.largest_magnitude_change_scores, L.largest_final_magnitude_scores, custom):
        values, (indices, shapes, names) = select_sparse_parameters(model, initial, level, score)
        flat_values, offsets, flat_shapes, flat_names = select_sparse_offsets(model, initial, level, score)
        assert flat_names == names and [list(s) for s in flat_shapes] == [s.tolist() for s in shapes]
        assert_same_arrays([v.numpy() for v in flat_values], values)
        want = [np.ravel_multi_index(tuple(i.T), tuple(s)) if i.size else np.zeros(0, np.int64)
                for i, s in zip(indices, shapes)]  # fmt: skip
        assert_same_arrays([o.numpy() for o in offsets], [w.astype(np.int64) for w in want])
        got = CompactCooPacker().pack_offsets(flat_values, offsets, flat_shapes, flat_names)
        ref = CompactCooPacker().pack_parameters(values, (indices, shapes, names))
        assert len(got) == len(ref) and all(a.dtype == b.dtype and a.tobytes() == b.tobytes() for a, b in zip(got, ref))


def test_pack_offsets_refuses_what_is_not_a_selection():
    packer = CompactCooPacker()
    v, o = torch.ones(3), torch.tensor([0, 5, 9])
    with pytest.raises(ValueError, match="outside"):
        packer.pack_offsets([v], [o], [(3, 3)], ["w"])
    with pytest.raises(ValueError, match="flat offsets"):
        packer.pack_offsets([v], [o.int()], [(3, 4)], ["w"])
    with pytest.raises(ValueError, match="flat offsets"):
        packer.pack_offsets([v], [o[:2]], [(3, 4)], ["w"])
    with pytest.raises(ValueError, match="2 names"):
        packer.pack_offsets([v], [o], [(3, 4)], ["w", "b"])
