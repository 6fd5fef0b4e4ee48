"""Decoding a peer's stream allocates a bounded multiple of it (wire.py's "Bounded decoding").

Each hostile stream of the adversarial pass (issue 27) is refused before its output is allocated,
by both COO codecs with the same message; what decoding allocated (tracemalloc: numpy's buffers and
Python's objects) is measured against the stream's bytes and asserted to be at most 2x. Measured
worst ratio over the hostile streams (COO and masks): 1.0x, the names streams (counting the NULs
takes one byte a name byte); the 64-dimension, gap-coded and 100k-tensor streams allocate under
0.01x. Before these bounds the same streams allocated 456x, 256x, 30x and 30x. The accepted stream
nearest the bound (thousands of empty tensors with long names) stays under max_expansion (16x).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from layersel_ext import ops, wire, wire_coo
from layersel_ext.wire import FOREIGN_PEER_HINT, CompactMaskPacker
from layersel_ext.wire_coo import CompactCooPacker

COO_HEADER = np.frombuffer(b"LSXW\x01\x03\0\0", np.uint8)
HINT = np.array([FOREIGN_PEER_HINT])


def _codecs() -> list[str]:
    return ["torch", "compiled"] if ops.COMPILED is not None else ["torch"]


def _unpack_with(codec: str, stream: list[np.ndarray], packer=None):
    """("error", message) or ("ok", the decoded message), and the bytes decoding allocated at its peak."""
    previous = ops.backend()
    ops.set_backend(codec)
    tracemalloc.start()
    try:
        return ("ok", (packer or CompactCooPacker()).unpack_parameters(stream)), tracemalloc.get_traced_memory()[1]
    except ValueError as exc:
        return ("error", str(exc)), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        ops.set_backend(previous)


def _names(names: list[str]) -> np.ndarray:
    return np.frombuffer("".join(n + "\0" for n in names).encode(), np.uint8)


def deep_tensor(n: int, ndim: int, code: int, positions: np.ndarray) -> list[np.ndarray]:
    """One tensor of shape (n, 1, ..., 1), n uint8 entries (the adversarial pass's stream)."""
    meta = np.array([1, 5, ndim, n] + [1] * (ndim - 1) + [n, code, positions.size], np.int64)
    return [COO_HEADER, meta, positions, np.zeros(n, np.uint8), _names(["w"]), HINT]


def tiny_tensors(count: int, name_length: int) -> list[np.ndarray]:
    """``count`` 1-D tensors of one element and no entry, each named by ``name_length`` characters."""
    meta = np.concatenate([[count], np.tile([5, 1, 1, 0, 1, 0], count)]).astype(np.int64)
    names = _names([f"{i:0{name_length}d}"[-name_length:] for i in range(count)])
    return [COO_HEADER, meta, np.zeros(0, np.uint8), np.zeros(0, np.uint8), names, HINT]


HOSTILE = {
    # 2**20 entries of a 64-dimension tensor, a full bitmap: 512 MB of indices from 1.2 MB
    "64 dimensions": lambda: deep_tensor(2**20, 64, wire_coo.POS_BITMAP, np.full(2**17, 255, np.uint8)),
    # one byte of gap a uint8 entry, 32 dimensions: 256 index bytes an entry from 2
    "gap-coded": lambda: deep_tensor(2**18, 32, wire_coo.POS_GAP8, np.zeros(2**18, np.uint8)),
    # 3M names where the meta announces one tensor: counted, never split
    "names": lambda: (
        deep_tensor(4, 2, wire_coo.POS_U32, np.arange(4, dtype="<u4").view(np.uint8))[:4]
        + [_names(["a"] * 3_000_000), HINT]
    ),
    # 100k tensors of nothing: objects only
    "100k tiny tensors": lambda: tiny_tensors(100_000, 1),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_coo_streams_are_refused_before_allocating(case):
    stream = HOSTILE[case]()
    message = wire.message_bytes(stream)
    outcomes = [_unpack_with(codec, stream) for codec in _codecs()]
    for (kind, why), allocated in outcomes:
        assert kind == "error", case
        assert "decoding needs" in why or "names" in why, why
        assert allocated <= 2 * message, (case, allocated / message)
    assert all(o[0] == outcomes[0][0] for o in outcomes)  # the same message from both codecs


def test_the_64_dimension_stream_names_its_limit():
    stream = HOSTILE["64 dimensions"]()
    with pytest.raises(ValueError, match=r"more than the limit of .*max_expansion=16 x the message's 1,180,650 bytes"):
        CompactCooPacker().unpack_parameters(stream)
    # the same tensor in 8 dimensions is what fl4health's format needs: accepted
    n = 2**16
    ok = deep_tensor(n, 8, wire_coo.POS_BITMAP, np.full(n // 8, 255, np.uint8))
    _, (indices, _, names) = CompactCooPacker().unpack_parameters(ok)
    assert len(indices) == 1 and indices[0].shape == (n, 8) and names == ["w"]
    assert np.array_equal(indices[0][:, 0], np.arange(n))


def test_names_are_counted_before_they_are_split():
    stream = HOSTILE["names"]()
    with pytest.raises(ValueError, match="1 tensors but 3000000 names"):
        CompactCooPacker().unpack_parameters(stream)


def test_many_small_tensors_stay_under_the_bound():
    """The stream nearest the bound that decoding accepts: thousands of tensors holding nothing, with
    long names. What it allocates stays below max_expansion times its bytes."""
    stream = tiny_tensors(5_000, 100)
    message = wire.message_bytes(stream)
    for codec in _codecs():
        (kind, got), allocated = _unpack_with(codec, stream)
        assert kind == "ok", got
        assert len(got[1][2]) == 5_000
        assert allocated <= wire.DEFAULT_MAX_EXPANSION * message, (codec, allocated / message)
    with pytest.raises(ValueError, match="max_expansion=4"):
        CompactCooPacker(max_expansion=4).unpack_parameters(stream)


def test_absolute_cap_refuses_what_the_ratio_accepts():
    rng = np.random.default_rng(0)
    x = (rng.random((300, 200)) < 0.5) * rng.standard_normal((300, 200)).astype(np.float32)
    nz = np.flatnonzero(x)
    message = ([x.ravel()[nz]], ([np.stack(np.unravel_index(nz, x.shape), 1)], [np.array([300, 200])], ["w"]))
    stream = CompactCooPacker().pack_parameters(*message)
    CompactCooPacker().unpack_parameters(stream)
    for codec in _codecs():
        (kind, why), _ = _unpack_with(codec, stream, CompactCooPacker(max_decoded_bytes=100_000))
        assert kind == "error" and "more than max_decoded_bytes=100,000" in why, why
    with pytest.raises(ValueError, match="max_decoded_bytes must be a non-negative int"):
        CompactCooPacker(max_decoded_bytes=-1)


def test_both_codecs_check_their_own_limit():
    """The codec's own check (the compiled ``coo_decode`` and its numpy twin), for callers that
    bypass ``unpack_coo``: the same refusal, before anything is allocated."""
    stream = HOSTILE["gap-coded"]()
    entries = wire_coo._read_coo_meta(stream[1])
    need = wire_coo.decoded_bytes(entries)
    assert need == 2**18 * 32 * 8 + 2**18
    outcomes = []
    for codec in _codecs():
        previous = ops.backend()
        ops.set_backend(codec)
        try:
            with pytest.raises(ValueError) as info:
                wire_coo._decode(entries, ["w"], stream[2], stream[3], need - 1)
            outcomes.append(str(info.value))
            _, indices = wire_coo._decode(entries, ["w"], stream[2], stream[3], need)
            assert indices[0].shape == (2**18, 32)
        finally:
            ops.set_backend(previous)
    assert (
        outcomes[0]
        == f"layersel_ext compact wire format: decoding needs {need} bytes, more than the {need - 1} allowed"
    )
    assert all(o == outcomes[0] for o in outcomes)


# ------------------------------------------------------------------------------ masks


def mask_stream(shapes: list[tuple[int, ...]], names: list[str], dtype_code: int = 1) -> list[np.ndarray]:
    meta = [len(shapes)]
    for shape in shapes:
        meta += [dtype_code, len(shape), *shape]
    total = sum(int(np.prod(s)) for s in shapes)
    return [wire._header(wire.FORM_BITMAP), np.array(meta, np.int64), np.zeros(-(-total // 8), np.uint8),
            _names(names), HINT]  # fmt: skip


def test_mask_shape_numpy_cannot_make_names_the_codec_limit():
    stream = mask_stream([(0, 2**62)], ["m"])
    with pytest.raises(ValueError, match=r"compact wire format: entry #0: bad shape \(0, 4611686018427387904\)"):
        wire.unpack(stream)
    arrays, _ = wire.unpack(mask_stream([(0, 2**62)], ["m"], dtype_code=5))  # uint8: numpy makes it
    assert arrays[0].shape == (0, 2**62)


def test_hostile_mask_streams_are_refused_before_allocating():
    cases = {
        "100k tiny arrays": mask_stream([(0,)] * 100_000, ["a"] * 100_000),
        "names": mask_stream([(8,)], ["a"] * 3_000_000),
    }
    for case, stream in cases.items():
        message = wire.message_bytes(stream)
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match="decoding needs|names"):
                wire.unpack(stream)
            allocated = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert allocated <= 2 * message, (case, allocated / message)


def test_masks_are_bounded_by_their_own_arrays_and_the_cap():
    """A bitmap decodes to int64 masks, 64 bytes a bitmap byte: that is fl4health's format, allowed;
    the absolute cap still applies."""
    masks = [np.ones((1000, 100), np.int64)]
    stream = CompactMaskPacker().pack_parameters(masks, ["m"])
    arrays, _ = CompactMaskPacker().unpack_parameters(stream)
    assert np.array_equal(arrays[0], masks[0])
    with pytest.raises(ValueError, match="more than max_decoded_bytes=100,000"):
        CompactMaskPacker(max_decoded_bytes=100_000).unpack_parameters(stream)


# ------------------------------------------------------------------------------ the numpy twin's blocks


@pytest.mark.parametrize("blocks", [(1, 1), (3, 2), (7, 5)])
def test_numpy_twin_decodes_in_blocks_as_in_one(monkeypatch, blocks):
    """The twin decodes varints and bitmaps a block at a time (its temporaries stay small): tiny
    blocks give the offsets and the errors of one block, with varints and bitmap bytes that straddle
    block edges, and a faulty varint in a later block."""
    rng = np.random.default_rng(5)
    gaps = (2.0 ** rng.uniform(0, 30, 200)).astype(np.uint64)
    varints = wire_coo._varint_encode(gaps)
    bitmap = np.packbits(rng.random(203) < 0.4, bitorder="little")
    numel = 2**40
    cases = [
        (wire_coo.POS_VARINT, varints, gaps.size, numel),
        (wire_coo.POS_VARINT, np.concatenate([varints, np.full(11, 0x81, np.uint8), [1]]).astype(np.uint8), 201, numel),
        (wire_coo.POS_VARINT, np.concatenate([varints, np.full(9, 0x80, np.uint8), [2]]).astype(np.uint8), 201, numel),
        (wire_coo.POS_VARINT, varints, gaps.size - 1, numel),
        (wire_coo.POS_BITMAP, bitmap, int(np.unpackbits(bitmap).sum()), 203),
        (wire_coo.POS_BITMAP, bitmap, 3, 203),
    ]

    def outcomes() -> list:
        out = []
        for code, payload, nnz, n in cases:
            try:
                out.append(wire_coo._decode_positions(code, payload, nnz, n, "t").tolist())
            except ValueError as exc:
                out.append(str(exc))
        return out

    whole = outcomes()
    assert isinstance(whole[0], list) and isinstance(whole[4], list)
    assert [isinstance(o, str) for o in whole[1:4]] == [True, True, True]
    monkeypatch.setattr(wire_coo, "_VARINT_BLOCK", blocks[0])
    monkeypatch.setattr(wire_coo, "_BITMAP_BLOCK", blocks[1])
    assert outcomes() == whole
