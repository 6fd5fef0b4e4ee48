"""A compact, lossless wire format for FedPM masks: one bit per mask element instead of eight bytes.

fl4health's FedPM client sends every mask as an int64 array (``ParameterPackerWithLayerNames``: the
arrays, then one array of layer names); the server sums them (``FedPm.aggregate_bayesian``). The
packer here sends the same masks as one bitmap and decodes them to exactly those int64 arrays, so the
server's aggregation, and every model after every round, stays bit for bit what it was.

Stream (a list of numpy arrays, as Flower's ``Parameters`` carry them), ``FORMAT_VERSION`` 1:

- ``[0]`` header, uint8[8]: ``b"LSXW"``, the version (1), the form (1: bitmap, 2: plain), two zeros.
- bitmap form, for 0/1 integer arrays (masks): ``[1]`` meta, int64: ``[n, then per array: dtype
  code, ndim, *shape]``; ``[2]`` bits, uint8: the arrays flattened in order (row-major) and
  concatenated, element ``i`` at bit ``i % 8`` of byte ``i // 8`` (numpy's ``bitorder="little"``),
  the unused high bits of the last byte zero.
- plain form, for anything else (the server's float probabilities going back): ``[1:-2]`` the arrays
  as they are.
- both forms end with ``[-2]`` the layer names, UTF-8, each followed by a zero byte (uint8), and
  ``[-1]`` a one-element unicode array, ``FOREIGN_PEER_HINT``.

A peer that does not speak this format fails in its first round with an error naming it: this
packer refuses a stream without the header (``ValueError``), and fl4health's own packer, given a
compact stream, takes the last array as the layer names, so the one "layer" it aggregates is named
by a sentence saying what to do, which the client's ``load_state_dict(strict=True)`` then reports
as an unexpected key. Decoding
checks every length, dtype code, dimension and padding bit before it allocates, so a truncated,
corrupted or hostile stream gives a ``ValueError``, never a wrong array.

Bounded decoding. A server decodes whatever any client sends, so before it allocates anything a
decoder (this module's and ``wire_coo``'s, the compiled codec included) computes the bytes its output
will take and refuses the stream with a ``ValueError`` naming the limit when they exceed either

- ``max_expansion`` (default ``DEFAULT_MAX_EXPANSION``, 16) times the message's bytes (every array's
  ``nbytes``) plus what fl4health's own format needs for that content: for sparse COO the int64
  ``[nnz, ndim]`` index rows, counted for at most ``INDEX_NDIM_ALLOWANCE`` (8) dimensions (realistic
  tensors have at most 5); for masks the mask arrays themselves (``numel`` times the dtype's size,
  at most 64 bytes per bitmap byte), plus ``RATIO_FREE_BYTES`` (1 MiB: a small message is never
  refused for its ratio, its fixed charges below would dominate it); or
- ``max_decoded_bytes`` (default ``DEFAULT_MAX_DECODED_BYTES``, 4 GiB): an absolute cap, whatever
  the message.

Both are arguments of the packers (``DecodeLimits`` for ``unpack``/``unpack_coo``). The legitimate
streams nearest the ratio hold only tensors of at most one entry, named in fewer than about 70
characters: their objects alone cost more than 16 times their bytes, so thousands of those need a
larger ``max_expansion``. The output counted is every
decoded array's data (exactly; the compiled COO codec's value buffer at 64-byte multiples), the
decoded names' characters twice (the joined text and its parts: ``2 * chars * (1, 2 or 4)`` bytes,
as Python stores the widest one), the bitmap's one-byte-per-element unpacking for masks, and a fixed
``TENSOR_OVERHEAD_BYTES`` (1.5 KiB) per tensor for the objects decoding makes (its arrays, its name,
its parsed meta entry, the compiled codec's table entry: about 1.3 KiB measured). Names are counted (their NUL bytes) and measured before they are
split, and the number of tensors the meta announces is checked against an upper bound of the limit
before the meta is parsed. So, whatever a peer sends, what decoding allocates is at most about
``max_expansion`` times the message plus fl4health's own arrays (and 1 MiB): the worst accepted sparse COO stream
(8-D uint8 tensors, dense bitmaps: 1.125 message bytes and 64 index bytes an entry) allocates about
``16 + 57 = 73`` times its size, a realistic one (float32 weights of at most 2 dimensions) at most
``16 + 4 = 20`` times; tests/test_bounded_decoding.py measures what hostile streams allocate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

MAGIC = b"LSXW"
FORMAT_VERSION = 1
FORM_BITMAP = 1
FORM_PLAIN = 2
FORM_COO = 3  # wire_coo.py
FORM_COO_PLAIN = 4
FORM_CODED = 6  # wire_coded.py
_FORM_CODED_BEFORE_LANES = 5  # its block layout before lanes: refused by name
# What an fl4health packer sees as the first layer name of a compact stream.
FOREIGN_PEER_HINT = (
    "<layersel_ext compact wire format v1: this peer must also call layersel_ext.fl4health.patch(wire='compact')>"
)
_MAX_NDIM = 64
_MAX_NUMEL = 2**62
# Bounded decoding (the module docstring): the packers' defaults and the fixed charges.
DEFAULT_MAX_EXPANSION = 16
DEFAULT_MAX_DECODED_BYTES = 2**32
INDEX_NDIM_ALLOWANCE = 8
TENSOR_OVERHEAD_BYTES = 1536
RATIO_FREE_BYTES = 2**20
# Array dtypes and their codes on the wire (the codes are the format: never renumber). Masks use
# the integer ones; COO values (wire_coo.py) any.
_DTYPE_CODES = {
    np.dtype(np.int64): 1,
    np.dtype(np.int32): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int8): 4,
    np.dtype(np.uint8): 5,
    np.dtype(np.uint16): 6,
    np.dtype(np.uint32): 7,
    np.dtype(np.uint64): 8,
    np.dtype(np.float16): 9,
    np.dtype(np.float32): 10,
    np.dtype(np.float64): 11,
    np.dtype(np.bool_): 12,
}
_CODE_DTYPES = {code: dt for dt, code in _DTYPE_CODES.items()}


def _header(form: int) -> np.ndarray:
    return np.frombuffer(MAGIC + bytes([FORMAT_VERSION, form, 0, 0]), dtype=np.uint8).copy()


def _names_bytes(names: Sequence[str]) -> np.ndarray:
    for name in names:
        if not isinstance(name, str) or "\0" in name:
            raise ValueError(f"layer name {name!r} cannot be sent: names are strings without NUL characters")
    return np.frombuffer("".join(n + "\0" for n in names).encode(), dtype=np.uint8).copy()


def _trailer(names: Sequence[str]) -> list[np.ndarray]:
    return [_names_bytes(names), np.array([FOREIGN_PEER_HINT])]


def _is_mask(a: np.ndarray) -> bool:
    if a.dtype not in _DTYPE_CODES or a.dtype.kind not in "iu":
        return False
    if a.size == 0:
        return True
    lo, hi = a.min(), a.max()
    return bool(lo >= 0 and hi <= 1)


def _meta(arrays: Sequence[np.ndarray] | Sequence[Tensor], dtype_code: int | None = None) -> np.ndarray:
    meta = [len(arrays)]
    for a in arrays:
        code = dtype_code if dtype_code is not None else _DTYPE_CODES[np.dtype(a.dtype)]
        meta += [code, len(a.shape), *a.shape]
    return np.asarray(meta, dtype=np.int64)


def pack_bits(flat01: np.ndarray) -> np.ndarray:
    """0/1 values (any integer dtype, one dimension) as a little-endian bitmap, uint8[ceil(n / 8)]."""
    return np.packbits(flat01.astype(np.uint8, copy=False), bitorder="little")


class CompactMaskPacker:
    """Drop-in for fl4health's ``ParameterPackerWithLayerNames`` on the FedPM flow (client and server).

    ``pack_parameters`` sends 0/1 integer arrays as one bitmap (dtype and shape kept) and anything
    else plainly; ``unpack_parameters`` returns exactly the arrays and names that were packed.

    Args:
        max_decoded_bytes: refuse (``ValueError``) a stream whose decoding would allocate more
            (default ``DEFAULT_MAX_DECODED_BYTES``, 4 GiB).
        max_expansion: refuse a stream whose decoding would allocate more than this many times its
            own bytes, besides the mask arrays fl4health's format itself needs (default 16).
    """

    def __init__(
        self, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES, max_expansion: int = DEFAULT_MAX_EXPANSION
    ) -> None:
        self.limits = DecodeLimits(max_decoded_bytes, max_expansion)

    def pack_parameters(self, model_weights: Sequence[np.ndarray], weights_names: Sequence[str]) -> list[np.ndarray]:
        if len(model_weights) != len(weights_names):
            raise ValueError(f"{len(model_weights)} arrays but {len(weights_names)} names")
        arrays = [np.asarray(a) for a in model_weights]
        if arrays and all(_is_mask(a) for a in arrays):
            flat = np.concatenate([a.ravel() for a in arrays])
            return [_header(FORM_BITMAP), _meta(arrays), pack_bits(flat), *_trailer(weights_names)]
        return [_header(FORM_PLAIN), *arrays, *_trailer(weights_names)]

    def unpack_parameters(self, packed_parameters: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[str]]:
        return unpack(packed_parameters, limits=self.limits)


def _fail(why: str) -> ValueError:
    return ValueError(f"layersel_ext compact wire format: {why}")


class DecodeLimits:
    """What decoding one stream may allocate (the module docstring's "Bounded decoding")."""

    def __init__(
        self, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES, max_expansion: int = DEFAULT_MAX_EXPANSION
    ) -> None:
        for name, value in (("max_decoded_bytes", max_decoded_bytes), ("max_expansion", max_expansion)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.max_decoded_bytes = max_decoded_bytes
        self.max_expansion = max_expansion

    def check(self, packed: Sequence[np.ndarray], need: int, allowance: int, allowance_what: str) -> None:
        """Refuses a stream whose decoding needs ``need`` bytes: over the absolute cap, or over
        ``max_expansion`` times the stream's bytes plus ``allowance`` (what fl4health's format itself
        needs: ``allowance_what``)."""
        if need > self.max_decoded_bytes:
            raise _fail(
                f"decoding needs {need:,} bytes, more than max_decoded_bytes={self.max_decoded_bytes:,} "
                "(a packer argument: raise it to accept larger messages)"
            )
        message = message_bytes(packed)
        limit = self.max_expansion * message + allowance + RATIO_FREE_BYTES
        if need > limit:
            raise _fail(
                f"decoding needs {need:,} bytes, more than the limit of {limit:,}: max_expansion={self.max_expansion} "
                f"x the message's {message:,} bytes + {allowance:,} bytes of {allowance_what} + {RATIO_FREE_BYTES:,}"
            )


def message_bytes(packed: Sequence[np.ndarray]) -> int:
    """A stream's bytes, as decoding's limit counts them: every array's ``nbytes``."""
    return sum(np.asarray(a).nbytes for a in packed)


def _read_header(packed: Sequence[np.ndarray]) -> int:
    if len(packed) < 3:
        raise _fail(f"a stream has at least a header, the names and the hint, got {len(packed)} array(s)")
    h = np.asarray(packed[0])
    if h.dtype != np.uint8 or h.shape != (8,) or h[:4].tobytes() != MAGIC:
        raise _fail(
            "the stream has no LSXW header: the peer sent fl4health's own format; both client and server must "
            "call layersel_ext.fl4health.patch(wire='compact') (or both neither)"
        )
    if int(h[4]) != FORMAT_VERSION:
        raise _fail(f"version {int(h[4])} is not supported (this layersel_ext reads version {FORMAT_VERSION})")
    form = int(h[5])
    if form == _FORM_CODED_BEFORE_LANES:
        raise _fail(
            f"coded masks in form {form}, which an older layersel_ext writes (this one writes form {FORM_CODED}): "
            "client and server must run the same layersel_ext version"
        )
    if form not in (FORM_BITMAP, FORM_PLAIN, FORM_COO, FORM_COO_PLAIN, FORM_CODED) or h[6] or h[7]:
        raise _fail(f"unknown form {form} (header bytes {h.tolist()})")
    return form


# Charged per decoded name besides its characters: the string object and its slot in the list.
_NAME_OVERHEAD_BYTES = 64


def _count_names(names: np.ndarray, hint: np.ndarray) -> int:
    """Checks the hint and the names' framing; the number of names, without splitting them."""
    hint = np.asarray(hint)
    if hint.shape != (1,) or hint.dtype.kind != "U" or str(hint[0]) != FOREIGN_PEER_HINT:
        raise _fail(f"the last array must be the one-element format hint, got {hint.dtype} {hint.shape}")
    names = np.asarray(names)
    if names.dtype != np.uint8 or names.ndim != 1 or (names.size and names[-1] != 0):
        raise _fail(f"the layer names must be NUL-terminated UTF-8 bytes, got {names.dtype} {names.shape}")
    return int(np.count_nonzero(names == 0))


def _measure_names(names: np.ndarray, hint: np.ndarray, count: int, what: str) -> int:
    """Checks that ``names`` holds ``count`` names (``_count_names``), without splitting them; returns
    the bytes the decoded names take (the joined text and its parts, each character at the widest
    width Python may store it in, and each name's object)."""
    found = _count_names(names, hint)
    if found != count:
        raise _fail(f"{count} {what} but {found} names")
    names = np.asarray(names)
    # UTF-8 lead bytes: below 0xC4 a character fits one byte in Python's str, below 0xF0 two, else four.
    top = int(names.max()) if names.size else 0
    width = 1 if top < 0xC4 else 2 if top < 0xF0 else 4
    chars = names.size - found - int(np.count_nonzero((names & 0xC0) == 0x80))
    return 2 * chars * width + count * _NAME_OVERHEAD_BYTES


def _split_names(names: np.ndarray) -> list[str]:
    """The names of an array ``_measure_names`` accepted."""
    try:
        text = np.asarray(names).tobytes().decode()
    except UnicodeDecodeError as exc:
        raise _fail(f"the layer names are not UTF-8 ({exc})") from None
    return text.split("\0")[:-1]


def _meta_count(meta: np.ndarray) -> int:
    """The number of entries a meta array announces (checked against its size), before it is parsed."""
    meta = np.asarray(meta)
    if meta.dtype != np.int64 or meta.ndim != 1 or meta.size < 1:
        raise _fail(f"meta must be a 1-D int64 array, got {meta.dtype} {meta.shape}")
    n = int(meta[0])
    if not 0 <= n <= meta.size:
        raise _fail(f"meta announces {n} entries in {meta.size} numbers")
    return n


def _read_meta(
    meta: np.ndarray, trailing: int = 0, kinds: str = "iu"
) -> list[tuple[np.dtype, tuple[int, ...], list[int]]]:
    """Entries of a meta array ``[n, then per entry: dtype code, ndim, *shape, *trailing numbers]``
    (dtype codes of ``kinds`` only, shapes of fewer than 2**62 elements), checked number by number."""
    n = _meta_count(meta)
    values = np.asarray(meta).tolist()
    pos, out = 1, []
    for i in range(n):
        if pos + 2 > len(values):
            raise _fail(f"meta ends inside entry #{i}")
        code, ndim = values[pos], values[pos + 1]
        if code not in _CODE_DTYPES or _CODE_DTYPES[code].kind not in kinds:
            raise _fail(f"entry #{i}: unknown dtype code {code}")
        if not 0 <= ndim <= _MAX_NDIM or pos + 2 + ndim + trailing > len(values):
            raise _fail(f"entry #{i}: bad number of dimensions {ndim}")
        shape = tuple(values[pos + 2 : pos + 2 + ndim])
        if any(d < 0 for d in shape) or math.prod(shape) >= _MAX_NUMEL:  # Python ints: no overflow
            raise _fail(f"entry #{i}: bad shape {shape}")
        out.append((_CODE_DTYPES[code], shape, values[pos + 2 + ndim : pos + 2 + ndim + trailing]))
        pos += 2 + ndim + trailing
    if pos != len(values):
        raise _fail(f"meta has {len(values) - pos} number(s) after the last entry")
    return out


def _check_bitmap(bits: np.ndarray, total: int) -> None:
    """A bitmap of exactly ``total`` elements: 1-D uint8, ``ceil(total / 8)`` bytes, zero padding bits."""
    if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != -(-total // 8):
        raise _fail(f"{total} mask elements need {-(-total // 8)} bitmap bytes, got {bits.dtype} {bits.shape}")
    if total % 8 and bits[-1] >> (total % 8):
        raise _fail("padding bits after the last element are not zero")


def expand_bits(
    entries: Sequence[tuple[np.dtype, tuple[int, ...], object]], source: Sequence[tuple[Tensor, int]]
) -> list[np.ndarray]:
    """The mask arrays of ``entries`` (dtype, shape, ...), entry ``i`` from bit ``source[i][1]`` of the
    bitmap tensor ``source[i][0]`` (uint8), as 0/1 of its dtype. Compiled: on all threads, into
    buffers from the output cache (a server expands every client's masks every round, and fresh
    pages cost it more than the writing); numpy without the compiled module, or for a dtype that is
    not an integer or bool one."""
    from .ops import COMPILED

    if COMPILED is not None and hasattr(COMPILED, "bits_expand") and all(d.kind in "iub" for d, _, _ in entries):
        return [
            COMPILED.bits_expand(src, offset, math.prod(shape), dtype.itemsize).numpy().view(dtype).reshape(shape)
            for (dtype, shape, _), (src, offset) in zip(entries, source)
        ]
    flat: dict[int, np.ndarray] = {}
    arrays = []
    for (dtype, shape, _), (src, offset) in zip(entries, source):
        if id(src) not in flat:
            flat[id(src)] = np.unpackbits(src.numpy(), bitorder="little")
        arrays.append(flat[id(src)][offset : offset + math.prod(shape)].astype(dtype).reshape(shape))
    return arrays


def _check_numpy_sizes(entries: list[tuple[np.dtype, tuple[int, ...], list[int]]]) -> None:
    """Every entry's array can exist: numpy sizes an array by its non-empty dimensions, even when
    another one is 0, and refuses 2**63 bytes or more."""
    for i, (dtype, shape, _) in enumerate(entries):
        if math.prod(d for d in shape if d) * dtype.itemsize >= 2**63:
            raise _fail(
                f"entry #{i}: bad shape {shape} for {dtype}: its non-empty sizes times {dtype.itemsize} bytes "
                "reach 2**63, numpy's limit for an array"
            )


def unpack(packed: Sequence[np.ndarray], limits: DecodeLimits | None = None) -> tuple[list[np.ndarray], list[str]]:
    """The arrays and layer names of a compact stream (``ValueError`` naming what is wrong otherwise,
    or when decoding would allocate more than ``limits`` allow: default ``DecodeLimits()``)."""
    limits = limits or DecodeLimits()
    form = _read_header(packed)
    if form == FORM_CODED:
        raise _fail(
            f"coded masks (form {FORM_CODED}) need the prior the server sent: this peer must use "
            "layersel_ext.fl4health.patch(wire='coded') too (or decode with wire_coded.CodedMaskPacker)"
        )
    if form not in (FORM_BITMAP, FORM_PLAIN):
        raise _fail(f"a COO stream (form {form}) where masks or plain arrays were expected")
    if form == FORM_PLAIN:
        arrays = [np.asarray(a) for a in packed[1:-2]]
        need = _measure_names(packed[-2], packed[-1], len(arrays), "arrays")
        limits.check(packed, need, 0, "arrays")
        return arrays, _split_names(packed[-2])
    if len(packed) != 5:
        raise _fail(f"a bitmap stream has 5 arrays, got {len(packed)}")
    bits = np.asarray(packed[2])
    n = _meta_count(packed[1])
    # Before the meta is parsed: n arrays cost at least their objects; the arrays hold at most 8
    # elements a bitmap byte, 8 bytes each.
    limits.check(packed, n * TENSOR_OVERHEAD_BYTES, 64 * bits.nbytes, "mask arrays at most")
    need = _measure_names(packed[-2], packed[-1], n, "arrays")
    entries = _read_meta(packed[1])
    total = sum(math.prod(shape) for _, shape, _ in entries)
    _check_bitmap(bits, total)
    _check_numpy_sizes(entries)
    masks = sum(math.prod(shape) * dtype.itemsize for dtype, shape, _ in entries)
    limits.check(packed, masks + total + n * TENSOR_OVERHEAD_BYTES + need, masks, "mask arrays")
    from ._host import contiguous_tensor

    bits_t = contiguous_tensor(bits)
    starts = np.cumsum([0] + [math.prod(shape) for _, shape, _ in entries]).tolist()
    return expand_bits(entries, [(bits_t, start) for start in starts[:-1]]), _split_names(packed[-2])


def sample_masks_packed(
    model: nn.Module,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    mask_dtype: object = np.int64,
) -> list[np.ndarray]:
    """FedPM's client message in the compact form, straight from the scores.

    Equal to ``CompactMaskPacker().pack_parameters(*select_scores_and_sample_masks(model, None,
    seed=seed, generator=generator, mask_dtype=mask_dtype))``, but the masks are sampled straight into
    the bitmap (``ops.sample_mask_bits``: one fused kernel, on the CPU or the GPU, whence one transfer
    of n / 8 bytes comes back), so the int64 masks never exist on the client.
    """
    from ._host import numpy_dtype
    from ._masks import mask_torch_dtype, sample_flat_masks

    np_dtype = numpy_dtype(mask_torch_dtype(mask_dtype))
    if np_dtype not in _DTYPE_CODES:
        raise TypeError(f"mask_dtype {np_dtype} has no code in the compact wire format")
    names, scores, bits = sample_flat_masks(model, seed=seed, generator=generator, dtype=torch.uint8, packed=True)
    if bits is None:  # no scores: what the packer sends for no arrays
        return CompactMaskPacker().pack_parameters([], [])
    meta = _meta(scores, dtype_code=_DTYPE_CODES[np_dtype])
    return [_header(FORM_BITMAP), meta, bits.cpu().numpy(), *_trailer(names)]
