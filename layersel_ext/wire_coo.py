"""A compact, lossless wire format for fl4health's sparse COO messages (both directions).

fl4health's ``SparseCooParameterPacker`` sends, per tensor, the selected values, their ``[nnz, ndim]``
int64 indices and the shape: 4 + 8 * ndim bytes per float32 value (20 B for a 2-D weight). The
packer here sends the values in their own dtype and the positions as flat row-major offsets, in the
smallest of these encodings, chosen per tensor and recorded in the stream:

====  ==========================================================================================
code  positions
====  ==========================================================================================
1     uint32 offsets (numel < 2**32), any order
2     uint64 offsets, any order
3-5   strictly increasing offsets as gaps ``offset[i] - offset[i-1] - 1`` (the first: ``offset[0]``)
      in 1, 2 or 4 bytes each (whichever holds the largest gap)
6     the same gaps as LEB128 varints (7 bits a byte, low bits first, high bit = more bytes)
7     strictly increasing offsets as a bitmap over the tensor (numel bits, little bit order)
====  ==========================================================================================

and decodes to exactly fl4health's ``(values, (indices, shapes, names))``: int64 ``[nnz, ndim]``
indices (``np.unravel_index`` of the offsets, row-major) and the shapes as fl4health builds them,
``np.array(list(shape))``; the values are views of the stream's value bytes where each is aligned
for its dtype (fl4health's own packer returns its input's arrays too), else copies. The client's
selection can hand over flat offsets instead of indices (``pack_offsets``, what
``patch(wire="compact")`` sends): the same stream, without the ``[nnz, ndim]`` arrays. A message that does not have that form (indices of another dtype or out
of range, a shape array fl4health would not make) is sent in the plain form: fl4health's arrays as
they are, with the header. So decoding always returns what was packed.

Stream (``wire.py`` has the header, the names and the hint): ``[header, meta, positions, values,
names, hint]``; meta (int64): ``[n, then per tensor: value dtype code, ndim, *shape, nnz, position
code, position bytes]``; positions: every tensor's encoded positions, concatenated (uint8); values:
every tensor's values as raw little-endian bytes, concatenated (uint8). Plain form: ``[header,
*values, *indices, *shapes, names, hint]``. Both have a multiple of three arrays, so fl4health's own
packer, given one, stops at once (its ``assert len(packed_parameters) % 3 == 1``); this packer,
given fl4health's stream, raises a ``ValueError`` naming the format. Decoding checks every length,
code, offset and padding bit before it allocates, and refuses a stream whose output would take more
than ``DecodeLimits`` allow (``wire.py``'s "Bounded decoding"): here the output is every tensor's
values (at 64-byte multiples, as the compiled codec allocates them) and int64 ``[nnz, ndim]``
indices, its shape array, its name and a fixed charge for its objects, and the allowance beside
``max_expansion`` times the message is the index rows of at most ``INDEX_NDIM_ALLOWANCE`` (8)
dimensions: a 64-dimension tensor of 2**20 one-byte entries (a 1.1 MB stream that would decode to
512 MB of indices) is refused, a 2-D weight of any density is not.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ._host import from_numpy, to_numpy
from .ops import compiled_helpers
from .wire import (
    _DTYPE_CODES,
    _MAX_NDIM,
    _MAX_NUMEL,
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_EXPANSION,
    FORM_COO,
    FORM_COO_PLAIN,
    INDEX_NDIM_ALLOWANCE,
    TENSOR_OVERHEAD_BYTES,
    DecodeLimits,
    _count_names,
    _fail,
    _header,
    _measure_names,
    _meta_count,
    _read_header,
    _read_meta,
    _split_names,
    _trailer,
)

POS_U32, POS_U64, POS_GAP8, POS_GAP16, POS_GAP32, POS_VARINT, POS_BITMAP = 1, 2, 3, 4, 5, 6, 7
_GAP_WIDTHS = {POS_GAP8: np.uint8, POS_GAP16: np.uint16, POS_GAP32: np.uint32}

# One tensor of a COO stream's meta: value dtype, shape, nnz, position code, position bytes.
_Entry = tuple[np.dtype, tuple[int, ...], int, int, int]
CooParts = tuple[list[np.ndarray], tuple[list[np.ndarray], list[np.ndarray], list[str]]]


# ------------------------------------------------------------------------------------------ encoding


def _varint_lengths(gaps: np.ndarray) -> np.ndarray:
    """Bytes of each gap's LEB128 form (1..10)."""
    lengths = np.ones(gaps.size, np.int64)
    top = int(gaps.max()) if gaps.size else 0
    for k in range(1, 10):
        if top < 1 << (7 * k):
            break
        lengths += gaps >= np.uint64(1 << (7 * k))
    return lengths


def _varint_encode(gaps: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """LEB128 of each uint64 gap, concatenated: byte k of every gap long enough, in one pass per k."""
    lengths = _varint_lengths(gaps) if lengths is None else lengths
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), np.uint8)
    for k in range(int(lengths.max()) if lengths.size else 0):
        rows = slice(None) if k == 0 else np.flatnonzero(lengths > k)
        group = ((gaps[rows] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        out[starts[rows] + k] = group | ((lengths[rows] > k + 1).astype(np.uint8) << 7)
    return out


def _encode_positions(offsets: np.ndarray, numel: int) -> tuple[int, np.ndarray]:
    """The smallest encoding of a tensor's flat offsets (uint64, in the message's order): every
    candidate's size is computed first, only the winner is built."""
    nnz = offsets.size
    sizes = {POS_U32 if numel < 2**32 else POS_U64: (4 if numel < 2**32 else 8) * nnz}
    gaps = lengths = None
    if nnz == 0 or bool(np.all(offsets[1:] > offsets[:-1])):
        gaps = np.diff(offsets, prepend=np.uint64(0)) - np.uint64(1)
        if nnz:
            gaps[0] = offsets[0]
        top = int(gaps.max()) if nnz else 0
        for code, width in _GAP_WIDTHS.items():
            if top <= np.iinfo(width).max:
                sizes[code] = np.dtype(width).itemsize * nnz
                break
        lengths = _varint_lengths(gaps)
        sizes[POS_VARINT] = int(lengths.sum())
        sizes[POS_BITMAP] = -(-numel // 8)
    code = min(sizes, key=lambda c: (sizes[c], c))
    if code == POS_U32:
        payload = offsets.astype("<u4")
    elif code == POS_U64:
        payload = offsets.astype("<u8")
    elif code in _GAP_WIDTHS:
        payload = gaps.astype(np.dtype(_GAP_WIDTHS[code]).newbyteorder("<"))
    elif code == POS_VARINT:
        payload = _varint_encode(gaps, lengths)
    else:
        bits = np.zeros(numel, np.uint8)
        bits[offsets.astype(np.int64)] = 1
        payload = np.packbits(bits, bitorder="little")
    return code, _raw_bytes(payload)


def _raw_bytes(a: np.ndarray) -> np.ndarray:
    """A 1-D array's little-endian bytes as uint8 (a view when it already is contiguous little-endian)."""
    return np.ascontiguousarray(a, a.dtype.newbyteorder("<")).view(np.uint8).reshape(-1)


def _coo_dims(values: np.ndarray, indices: np.ndarray, shape: np.ndarray) -> tuple[int, ...] | None:
    """The tensor's shape when its message has the form decoding rebuilds (int64 [nnz, ndim] indices,
    the shape array fl4health builds, at most one entry in a 0-d tensor), else None; whether every
    index is inside the shape is the codec's check."""
    if values.ndim != 1 or values.dtype not in _DTYPE_CODES or shape.ndim != 1:
        return None
    if shape.size and shape.dtype.kind not in "iu":
        return None
    dims = tuple(int(d) for d in shape.tolist())
    if any(d < 0 for d in dims) or len(dims) > _MAX_NDIM or math.prod(dims) >= _MAX_NUMEL:
        return None
    like_fl4health = np.array(list(dims))
    if like_fl4health.dtype != shape.dtype or not np.array_equal(like_fl4health, shape):
        return None
    if indices.dtype != np.int64 or indices.shape != (values.size, len(dims)):
        return None
    if not dims and values.size > 1:
        return None
    return dims


def _flat_offsets(indices: np.ndarray, dims: tuple[int, ...]) -> np.ndarray | None:
    """The entries' flat row-major offsets (uint64), or None when an index is outside the shape;
    ``indices``: int64 [nnz, ndim] rows, or int64 [nnz] flat offsets already."""
    if indices.ndim == 1:
        inside = not indices.size or (int(indices.min()) >= 0 and int(indices.max()) < math.prod(dims))
        return indices.astype(np.uint64) if inside else None
    if not dims or not indices.shape[0]:  # a 0-d tensor (its one element, at offset 0), or no entries
        return np.zeros(indices.shape[0], np.uint64)
    try:  # raises on a negative or out-of-range index
        return np.ravel_multi_index(tuple(indices.T), dims).astype(np.uint64)
    except ValueError:
        return None


def _encode_numpy(
    values: list[np.ndarray], indices: list[np.ndarray], dims: list[tuple[int, ...]]
) -> tuple[list[int], list[int], np.ndarray, np.ndarray] | None:
    """(position codes, their byte counts, the payloads and the value bytes, each concatenated), or
    None when an index is outside its shape: the twin of the compiled ``_C.coo_encode``. ``indices``:
    per tensor int64 [nnz, ndim] rows or int64 [nnz] flat offsets (the same payload)."""
    codes, sizes, positions = [], [], []
    for i, shape in zip(indices, dims):
        offsets = _flat_offsets(i, shape)
        if offsets is None:
            return None
        code, payload = _encode_positions(offsets, math.prod(shape))
        codes.append(code)
        sizes.append(payload.size)
        positions.append(payload)
    raw = [_raw_bytes(v) for v in values]
    return (
        codes,
        sizes,
        np.concatenate(positions) if positions else np.zeros(0, np.uint8),
        np.concatenate(raw) if raw else np.zeros(0, np.uint8),
    )


def _encode(
    values: Sequence[np.ndarray | Tensor], indices: Sequence[np.ndarray | Tensor], dims: list[tuple[int, ...]]
) -> tuple[list[int], list[int], np.ndarray, np.ndarray] | None:
    """``_encode_numpy`` of numpy arrays or CPU tensors; compiled, values that lie one after the other
    in one tensor storage (``select_sparse_offsets``' output) are sent from there without a copy."""
    compiled = compiled_helpers()
    if compiled is None:
        as_numpy = [[a.numpy() if isinstance(a, Tensor) else a for a in arrays] for arrays in (values, indices)]
        return _encode_numpy(as_numpy[0], as_numpy[1], dims)
    bad, codes, sizes, positions, raw = compiled.coo_encode(
        [i.contiguous() if isinstance(i, Tensor) else from_numpy(np.ascontiguousarray(i)) for i in indices],
        [list(d) for d in dims],
        [v.contiguous().view(torch.uint8) if isinstance(v, Tensor) else from_numpy(_raw_bytes(v)) for v in values],
    )
    return None if bad >= 0 else (codes, sizes, positions.numpy(), raw.numpy())


class CompactCooPacker:
    """Drop-in for fl4health's ``SparseCooParameterPacker`` (client exchanger and server strategy).

    Args:
        max_decoded_bytes: refuse (``ValueError``) a stream whose decoding would allocate more
            (default ``DEFAULT_MAX_DECODED_BYTES``, 4 GiB).
        max_expansion: refuse a stream whose decoding would allocate more than this many times its
            own bytes, besides the int64 index rows (of at most 8 dimensions) fl4health's format
            needs (default 16).
    """

    def __init__(
        self, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES, max_expansion: int = DEFAULT_MAX_EXPANSION
    ) -> None:
        self.limits = DecodeLimits(max_decoded_bytes, max_expansion)

    def pack_parameters(
        self, model_parameters: Sequence[np.ndarray], additional_parameters: tuple[Sequence, Sequence, Sequence[str]]
    ) -> list[np.ndarray]:
        indices, shapes, names = additional_parameters
        values = [np.asarray(v) for v in model_parameters]
        indices, shapes, names = [np.asarray(i) for i in indices], [np.asarray(s) for s in shapes], list(names)
        if not len(values) == len(indices) == len(shapes) == len(names):
            raise ValueError(f"{len(values)} values, {len(indices)} indices, {len(shapes)} shapes, {len(names)} names")
        dims = [_coo_dims(v, i, s) for v, i, s in zip(values, indices, shapes)]
        encoded = None if any(d is None for d in dims) else _encode(values, indices, dims)  # type: ignore[arg-type]
        if encoded is None:
            return [_header(FORM_COO_PLAIN), *values, *indices, *shapes, *_trailer(names)]
        codes, sizes, positions, raw = encoded
        meta = [len(values)]
        for v, shape, code, size in zip(values, dims, codes, sizes):  # type: ignore[arg-type]
            meta += [_DTYPE_CODES[v.dtype], len(shape), *shape, v.size, code, size]
        return [_header(FORM_COO), np.asarray(meta, np.int64), positions, raw, *_trailer(names)]

    def pack_offsets(
        self, values: Sequence[Tensor], offsets: Sequence[Tensor], shapes: Sequence[tuple[int, ...]], names: list[str]
    ) -> list[np.ndarray]:
        """The stream ``pack_parameters`` makes of the same selection, from flat row-major offsets
        (``sparse_coo.select_sparse_offsets``: per tensor its values, 1-D CPU tensors, their int64 [nnz]
        offsets, its shape and name) without the int64 [nnz, ndim] indices. ``ValueError`` when an
        offset is outside its shape or the arrays do not match (the selection never gives either)."""
        names = list(names)
        if not len(values) == len(offsets) == len(shapes) == len(names):
            raise ValueError(f"{len(values)} values, {len(offsets)} offsets, {len(shapes)} shapes, {len(names)} names")
        arrays = to_numpy(names, list(values))  # zero-copy; refuses a dtype numpy has not, as the selection does
        dims = [tuple(int(d) for d in shape) for shape in shapes]
        for t, (v, o, shape) in enumerate(zip(arrays, offsets, dims)):
            if (
                v.ndim != 1
                or v.dtype not in _DTYPE_CODES
                or o.dtype != torch.int64
                or o.shape != (v.size,)
                or not shape
                or len(shape) > _MAX_NDIM
                or any(d < 0 for d in shape)
                or math.prod(shape) >= _MAX_NUMEL
            ):
                raise ValueError(f"tensor #{t} ({names[t]!r}): not values and flat offsets of a tensor of {shape}")
        encoded = _encode(list(values), list(offsets), dims)
        if encoded is None:
            raise ValueError("an offset is outside its tensor's shape")
        codes, sizes, positions, raw = encoded
        meta = [len(values)]
        for v, shape, code, size in zip(arrays, dims, codes, sizes):
            meta += [_DTYPE_CODES[v.dtype], len(shape), *shape, v.size, code, size]
        return [_header(FORM_COO), np.asarray(meta, np.int64), positions, raw, *_trailer(names)]

    def unpack_parameters(self, packed_parameters: Sequence[np.ndarray]) -> CooParts:
        return unpack_coo(packed_parameters, self.limits)

    @staticmethod
    def extract_coo_info_from_dense(x: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """fl4health's ``SparseCooParameterPacker.extract_coo_info_from_dense`` (the server's reply)."""
        selected = torch.nonzero(x, as_tuple=True)  # once (fl4health computes it twice); same errors
        values = x[selected]
        return values.cpu().numpy(), torch.stack(selected, dim=1).cpu().numpy(), np.array(list(x.shape))


# ------------------------------------------------------------------------------------------ decoding


# Varints decoded a block at a time: the temporaries (about 40 bytes a payload byte) stay a few MB.
_VARINT_BLOCK = 2**14
# Bitmap bytes unpacked at a time (one byte an element while unpacked).
_BITMAP_BLOCK = 2**16
_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], np.uint8)


def _varint_decode(payload: np.ndarray, count: int, what: str) -> np.ndarray:
    if (payload.size and payload[-1] >= 0x80) or int(np.count_nonzero(payload < 0x80)) != count:
        raise _fail(f"{what}: {payload.size} varint bytes do not hold {count} gaps")
    if count == 0:
        return np.zeros(0, np.uint64)
    ends = np.flatnonzero(payload < 0x80)  # count entries: counted above, so no larger than the gaps
    lengths = np.diff(ends, prepend=-1)
    if lengths.max() > 10:
        raise _fail(f"{what}: a varint longer than 10 bytes")
    gaps = np.empty(count, np.uint64)
    for b in range(0, count, _VARINT_BLOCK):
        first = 0 if b == 0 else int(ends[b - 1]) + 1
        block_ends, block_lengths = ends[b : b + _VARINT_BLOCK] - first, lengths[b : b + _VARINT_BLOCK]
        chunk = payload[first : first + int(block_ends[-1]) + 1]
        starts = block_ends - block_lengths + 1
        position = np.arange(chunk.size) - np.repeat(starts, block_lengths)
        terms = (chunk.astype(np.uint64) & np.uint64(0x7F)) << (position.astype(np.uint64) * np.uint64(7))
        tenth = chunk[block_ends[block_lengths == 10]]
        if tenth.size and tenth.max() > 1:
            raise _fail(f"{what}: a varint above 2**64 - 1")
        gaps[b : b + _VARINT_BLOCK] = np.add.reduceat(terms, starts)
    return gaps


def _bitmap_offsets(payload: np.ndarray, nnz: int) -> np.ndarray:
    """The marked elements' offsets (``nnz`` of them, checked by the caller), a block at a time."""
    offsets = np.empty(nnz, np.uint64)
    at = 0
    for first in range(0, payload.size, _BITMAP_BLOCK):
        marked = np.flatnonzero(np.unpackbits(payload[first : first + _BITMAP_BLOCK], bitorder="little"))
        offsets[at : at + marked.size] = marked + 8 * first
        at += marked.size
    return offsets


def _decode_positions(code: int, payload: np.ndarray, nnz: int, numel: int, what: str) -> np.ndarray:
    if code in (POS_U32, POS_U64):
        width = 4 if code == POS_U32 else 8
        if payload.size != width * nnz:
            raise _fail(f"{what}: {nnz} offsets need {width * nnz} bytes, got {payload.size}")
        offsets = payload.view("<u4" if width == 4 else "<u8").astype(np.uint64)
        if offsets.size and int(offsets.max()) >= numel:
            raise _fail(f"{what}: an offset is past the tensor's {numel} elements")
        return offsets
    if code == POS_BITMAP:
        if payload.size != -(-numel // 8) or (numel % 8 and payload[-1] >> (numel % 8)):
            raise _fail(f"{what}: a bitmap of {numel} elements needs {-(-numel // 8)} bytes and zero padding")
        marked = int(_POPCOUNT[payload].sum(dtype=np.int64))  # the padding bits are zero: checked
        if marked != nnz:
            raise _fail(f"{what}: the bitmap marks {marked} elements, the meta says {nnz}")
        return _bitmap_offsets(payload, nnz)
    if code in _GAP_WIDTHS:
        width = np.dtype(_GAP_WIDTHS[code]).itemsize
        if payload.size != width * nnz:
            raise _fail(f"{what}: {nnz} gaps need {width * nnz} bytes, got {payload.size}")
        gaps = payload.view(np.dtype(_GAP_WIDTHS[code]).newbyteorder("<")).astype(np.uint64)
    elif code == POS_VARINT:
        gaps = _varint_decode(payload, nnz, what)
    else:
        raise _fail(f"{what}: unknown position code {code}")
    if gaps.size == 0:
        return gaps
    # offsets = cumsum(gaps + 1) - 1. Each gap < numel < 2**62, so a sum that wrapped around 2**64
    # would show as a decrease: strictly increasing and the last < numel means none did.
    if int(gaps.max()) >= numel:
        raise _fail(f"{what}: a gap is past the tensor's {numel} elements")
    offsets = np.add(gaps, np.uint64(1), out=gaps)  # in place (gaps is this function's own copy)
    np.cumsum(offsets, out=offsets)
    np.subtract(offsets, np.uint64(1), out=offsets)
    if int(offsets[-1]) >= numel or bool(np.any(offsets[1:] <= offsets[:-1])):
        raise _fail(f"{what}: the gaps run past the tensor's {numel} elements")
    return offsets


def _read_coo_meta(meta: np.ndarray) -> list[_Entry]:
    out = []
    for t, (dtype, shape, (nnz, pcode, pbytes)) in enumerate(_read_meta(meta, trailing=3, kinds="iufb")):
        if not 0 <= nnz <= math.prod(shape) or pbytes < 0:
            raise _fail(f"tensor #{t}: {nnz} entries in a tensor of {math.prod(shape)} elements ({pbytes} bytes)")
        out.append((dtype, shape, nnz, pcode, pbytes))
    return out


def _unravel(offsets: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """fl4health's int64 ``[nnz, ndim]`` row-major indices of flat offsets, written in place column by
    column (one divmod per dimension, no temporaries the size of the result)."""
    idx = np.empty((offsets.size, len(shape)), np.int64)
    if shape:
        rest = offsets.view(np.int64)  # offsets < 2**62: the same numbers; divided in place, so consumed
        for d in range(len(shape) - 1, 0, -1):
            np.divmod(rest, shape[d], out=(rest, idx[:, d]))
        idx[:, 0] = rest
    return idx


def _bytes(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim != 1:
        raise _fail(f"{what} must be a 1-D uint8 array, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def decoded_bytes(entries: list[_Entry]) -> int:
    """The bytes the codec's outputs take (``coo::decoded_bytes`` in csrc/common/coo_codec.h, which the
    compiled ``coo_decode`` checks too): every tensor's int64 [nnz, ndim] indices and its value bytes
    at a multiple of 64 (the numpy twin allocates no more)."""
    return sum(nnz * len(shape) * 8 + -(-nnz * dtype.itemsize // 64) * 64 for dtype, shape, nnz, _, _ in entries)


def unpack_coo(packed: Sequence[np.ndarray], limits: DecodeLimits | None = None) -> CooParts:
    """fl4health's ``(values, (indices, shapes, names))`` from a compact COO stream (``ValueError``
    otherwise, or when decoding would allocate more than ``limits`` allow: default ``DecodeLimits()``)."""
    limits = limits or DecodeLimits()
    form = _read_header(packed)
    if form not in (FORM_COO, FORM_COO_PLAIN):
        raise _fail(f"a mask stream (form {form}) where a sparse COO stream was expected")
    if form == FORM_COO_PLAIN:
        body = [np.asarray(a) for a in packed[1:-2]]
        k = _count_names(packed[-2], packed[-1])
        if len(body) != 3 * k:
            raise _fail(f"a plain COO stream of {k} tensors has {3 * k} arrays, got {len(body)}")
        limits.check(packed, _measure_names(packed[-2], packed[-1], k, "tensors"), 0, "arrays")
        return body[:k], (body[k : 2 * k], body[2 * k :], _split_names(packed[-2]))
    if len(packed) != 6:
        raise _fail(f"a COO stream has 6 arrays, got {len(packed)}")
    n = _meta_count(packed[1])
    raw = np.asarray(packed[3])
    # Before the meta is parsed: n tensors cost at least their objects, and index rows are allowed for
    # at most one entry a value byte.
    allowance = 8 * INDEX_NDIM_ALLOWANCE * raw.nbytes
    limits.check(packed, n * TENSOR_OVERHEAD_BYTES, allowance, "int64 indices at most")
    names_need = _measure_names(packed[-2], packed[-1], n, "tensors")
    entries = _read_coo_meta(packed[1])
    positions, raw = _bytes(packed[2], "positions"), _bytes(raw, "values")
    if sum(e[4] for e in entries) != positions.size:
        raise _fail(f"the meta's position bytes add up to {sum(e[4] for e in entries)}, got {positions.size}")
    if sum(e[2] * e[0].itemsize for e in entries) != raw.size:
        raise _fail(f"the values need {sum(e[2] * e[0].itemsize for e in entries)} bytes, got {raw.size}")
    shapes_need = sum(8 * len(shape) for _, shape, _, _, _ in entries)
    codec_need = decoded_bytes(entries)
    need = codec_need + shapes_need + names_need + n * TENSOR_OVERHEAD_BYTES
    allowance = sum(nnz * min(len(shape), INDEX_NDIM_ALLOWANCE) * 8 for _, shape, nnz, _, _ in entries)
    limits.check(packed, need, allowance, f"int64 indices (at most {INDEX_NDIM_ALLOWANCE} dimensions counted)")
    names = _split_names(packed[-2])
    values, indices = _decode(entries, names, positions, raw, codec_need)
    return values, (indices, [np.array(list(shape)) for _, shape, _, _, _ in entries], names)


def _value_views(entries: list[_Entry], raw: np.ndarray) -> list[np.ndarray] | None:
    """Every tensor's values as views of the stream's value bytes (no copy: fl4health's own packer
    returns its input's arrays too), or None when one would not be aligned for its dtype (values of
    dtypes of several sizes) or the host is big-endian (the stream's values are little-endian): then
    the codecs copy them. The views have the native dtype, as fl4health's arrays (not an explicit
    ``<f4``, which numpy prints and hashes differently)."""
    if sys.byteorder != "little":
        return None
    views, r = [], 0
    for dtype, _, nnz, _, _ in entries:
        if (raw.ctypes.data + r) % dtype.itemsize:
            return None
        views.append(raw[r : r + nnz * dtype.itemsize].view(dtype))
        r += nnz * dtype.itemsize
    return views


def _decode_numpy(
    entries: list[_Entry], names: list[str], positions: np.ndarray, raw: np.ndarray, copy_values: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every tensor's values (copied, or none with ``copy_values=False``) and int64 [nnz, ndim]
    indices (``ValueError`` at the first bad tensor): the twin of the compiled ``_C.coo_decode``."""
    values, indices = [], []
    p = r = 0
    for t, (dtype, shape, nnz, pcode, pbytes) in enumerate(entries):
        what = f"tensor #{t} ({names[t]!r})"
        offsets = _decode_positions(pcode, positions[p : p + pbytes], nnz, math.prod(shape), what)
        p += pbytes
        if copy_values:
            values.append(raw[r : r + nnz * dtype.itemsize].view(dtype.newbyteorder("<")).astype(dtype))
        r += nnz * dtype.itemsize
        indices.append(_unravel(offsets, shape))
    return values, indices


def _decode(
    entries: list[_Entry], names: list[str], positions: np.ndarray, raw: np.ndarray, max_bytes: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Both codecs' outputs; ``max_bytes``: what they may allocate (the caller's limit, which
    ``decoded_bytes`` met: the compiled codec checks it again before it allocates)."""
    compiled = compiled_helpers()
    if decoded_bytes(entries) > max_bytes:  # as either codec would copy the values: the same refusal
        raise _fail(f"decoding needs {decoded_bytes(entries)} bytes, more than the {max_bytes} allowed")
    views = _value_views(entries, raw)
    if compiled is None:
        values, indices = _decode_numpy(entries, names, positions, raw, copy_values=views is None)
        return views if views is not None else values, indices
    # With views the codec copies no value bytes (it is handed none).
    nbytes = [0 if views is not None else nnz * dtype.itemsize for dtype, _, nnz, _, _ in entries]
    try:
        bad, why, index_tensors, buffer, starts = compiled.coo_decode(
            [e[3] for e in entries],
            [list(e[1]) for e in entries],
            [e[2] for e in entries],
            from_numpy(positions),
            [e[4] for e in entries],
            from_numpy(raw if views is None else raw[:0]),
            nbytes,
            max_bytes,
        )
    except ValueError as exc:  # the codec's checks of what the caller checked, its limit among them
        raise _fail(str(exc)) from None
    if bad >= 0:
        raise _fail(f"tensor #{bad} ({names[bad]!r}): {why}")
    if views is None:
        buffer = buffer.numpy()
        views = [buffer[s : s + n].view(e[0]) for e, s, n in zip(entries, starts, nbytes)]
    return views, [t.numpy() for t in index_tensors]
