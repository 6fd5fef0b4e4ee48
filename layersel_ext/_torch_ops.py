"""Pure-torch implementation of every ``torch.ops.layersel`` op.

The fallback when no compiled kernel is available, and the oracle in tests: each function has
the op's exact signature and output. ``sample_masks`` reproduces the compiled kernels' bits
(the same Philox4x32-10 stream and the same float32 operation sequence as
``csrc/common/bernoulli.h``), on CPU and CUDA tensors alike.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from . import _checks
from ._bits import key_from_scores
from ._keys import key_bits, key_to_value, keys_matching, radix_select, signed_keys
from ._score_kinds import NUM_FORMULAS, ScoreKind, uses_initial

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


# Elements per pass over large tensors, and the most elements that small tensors are batched into:
# the temporaries of a pass (a few MB) stay in cache and are reused, never a full-size copy.
_CHUNK = 1 << 18
# Elements per pass of the masks and the fingerprint: about 150 elementwise ops a pass, so larger
# passes (fewer parallel regions, each a thread wake-up) and temporaries of a few MB.
_MASK_CHUNK = 1 << 20


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _libc_madvise()
# An allocation this large is a fresh mapping at every call (glibc's largest mmap threshold): its
# first touch faults a page in every 4 KB, which takes longer than a score pass over it.
_FRESH_MAPPING_BYTES = 32 << 20
_HUGE_PAGE = 2 << 20


def _advise_huge_pages(t: Tensor) -> None:
    """On Linux, ask for transparent huge pages over a fresh CPU buffer of ``_FRESH_MAPPING_BYTES`` or more
    (MADV_HUGEPAGE over its whole 2 MB pages, before anything touches it), so its first touch faults once
    per 2 MB: the price of fresh memory is then about that of zeroing it. Advice only: where the kernel
    refuses it (THP off, another OS), the pages are the usual ones."""
    nbytes = t.numel() * t.element_size()
    if _MADVISE is not None and t.device.type == "cpu" and nbytes >= _FRESH_MAPPING_BYTES:
        lo = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        hi = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if hi > lo:
            _MADVISE(lo, hi - lo, mmap.MADV_HUGEPAGE)


def _cache_limit() -> int:
    """``LAYERSEL_OUTPUT_CACHE_MB`` in bytes, read as the compiled cache reads it (unset: 1024; not a
    number: 0, the cache off)."""
    raw = os.environ.get("LAYERSEL_OUTPUT_CACHE_MB")
    if raw is None:
        return 1024 << 20
    digits = raw.strip()
    digits = digits[: len(digits) - len(digits.lstrip("0123456789"))] if digits else ""
    return int(digits or 0) << 20


class _OutputBlocks:
    """The torch twin of ``csrc/cpu/output_block_cache.h``: large CPU outputs served from blocks that
    earlier outputs used, so a client that scores every round writes into pages that are already
    mapped (a fresh output of a model's size is a fresh mapping each call, and its first-touch page
    faults cost more than the scores; how much more depends on the machine and varies call to call).

    A block is idle when nothing but this cache holds its storage (no tensor, view or numpy array of
    an earlier output is alive): torch counts a storage's owners, so idleness is read at allocation
    time, with no hook on release. An output of ``_BLOCK_MIN_BYTES`` or more takes the smallest idle
    block that fits it and is at most twice its size, else a fresh block, which the cache keeps while
    all its blocks, in use or idle, total at most ``LAYERSEL_OUTPUT_CACHE_MB`` (the oldest idle blocks
    are dropped to make room): the memory it holds beyond what a caller holds is bounded by that.
    Outputs are resizable, as ``torch.empty``'s are."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.blocks: list[torch.UntypedStorage] = []  # oldest first

    @staticmethod
    def _idle(block: torch.UntypedStorage) -> bool:
        return _USE_COUNT(block._cdata) == 1  # only the cache's own reference

    def empty(self, requests: Sequence[tuple[int, torch.dtype]]) -> list[Tensor]:
        """A flat CPU tensor for each (numel, dtype), contents undefined."""
        limit = _cache_limit()
        if limit <= 0 or _USE_COUNT is None:
            return [self._fresh(n, dt) for n, dt in requests]
        out = []
        with self.lock:
            # idle blocks by size, the oldest first among equal sizes (a stable sort of the age order)
            idle = sorted((b for b in self.blocks if self._idle(b)), key=lambda b: b.nbytes())
            sizes = [b.nbytes() for b in idle]
            for n, dt in requests:
                nbytes = n * dt.itemsize
                at = bisect.bisect_left(sizes, nbytes) if nbytes >= _BLOCK_MIN_BYTES else len(sizes)
                if at < len(sizes) and sizes[at] <= 2 * nbytes:  # the smallest idle block that fits
                    sizes.pop(at)
                    out.append(torch.empty(0, dtype=dt).set_(idle.pop(at), 0, (n,), (1,)))
                    continue
                t = self._fresh(n, dt)
                if _BLOCK_MIN_BYTES <= nbytes <= limit:
                    held = sum(b.nbytes() for b in self.blocks)
                    if held + nbytes > limit:  # evict the oldest idle blocks
                        spare = {id(b) for b in idle}
                        for block in [b for b in self.blocks if id(b) in spare]:
                            if held + nbytes <= limit:
                                break
                            held -= block.nbytes()
                            self.blocks.remove(block)
                            at = next(k for k, b in enumerate(idle) if b is block)
                            idle.pop(at)
                            sizes.pop(at)
                    if held + nbytes <= limit:
                        self.blocks.append(t.untyped_storage())
                out.append(t)
        return out

    @staticmethod
    def _fresh(n: int, dtype: torch.dtype) -> Tensor:
        t = torch.empty(n, dtype=dtype)
        _advise_huge_pages(t)
        return t


# How many owners a storage has (torch's own count; a torch without it runs with the cache off).
_USE_COUNT: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)
_OUTPUT_BLOCKS = _OutputBlocks()
# The smallest output the cache serves: a large tensor's (``_CHUNK`` float32 elements). glibc maps an
# allocation of a few MB afresh or hands it back to the system often enough that its pages fault again.
_BLOCK_MIN_BYTES = 1 << 20


def _empty_outputs(sizes: Sequence[int], dtypes: Sequence[torch.dtype], device: torch.device) -> list[Tensor]:
    """``torch.empty(n, dtype=dt)`` for each size and dtype; on the CPU the large ones come from the
    output cache (``_OutputBlocks``), fresh ones with transparent huge pages asked for."""
    if device.type != "cpu":
        return [torch.empty(n, dtype=dt, device=device) for n, dt in zip(sizes, dtypes)]
    return _OUTPUT_BLOCKS.empty(list(zip(sizes, dtypes)))


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


_flatten = torch._C._nn.flatten_dense_tensors  # the tensors' elements, concatenated: one C++ call


def _batches(tensors: Sequence[Tensor], sizes: Sequence[int], keep: Callable[[int], bool]) -> Iterator[list[int]]:
    """Indices of the kept tensors in batches: a tensor of ``_CHUNK`` elements or more alone, smaller ones
    of one dtype together up to about ``_CHUNK`` elements. A batch's tensors are consecutive among the
    kept tensors of their dtype (a large tensor of that dtype ends its batch), so their scores are
    consecutive in the dtype's buffer."""
    pending: dict[torch.dtype, list[int]] = {}
    filled: dict[torch.dtype, int] = {}
    for i, t in enumerate(tensors):
        if not keep(i):
            continue
        dt = t.dtype
        if sizes[i] >= _CHUNK:
            if pending.get(dt):
                yield pending.pop(dt)
            yield [i]
            continue
        pending.setdefault(dt, []).append(i)
        filled[dt] = (filled.get(dt, 0) if len(pending[dt]) > 1 else 0) + sizes[i]
        if filled[dt] >= _CHUNK:
            yield pending.pop(dt)
    yield from (batch for batch in pending.values() if batch)


class _Scratch:
    """Buffers reused by every pass of one call, grown on demand (to a pass's size)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, n: int) -> Tensor:
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, _CHUNK), dtype=dtype, device=self.device)
            self.buffers[(name, dtype)] = buf
        return buf[:n]


def _squares_f32(x: Tensor, y: Tensor, d: Tensor) -> None:
    """``d`` (float32) = float(x - y) ** 2 for flat x, y: the difference in their dtype (integers wrap),
    converted to float32, squared in float32 (torch computes a binary op in its inputs' dtype and
    converts the result to ``out``'s)."""
    if x.dtype == torch.float32:
        torch._C._nn.mse_loss(x, y, 0, out=d)  # reduction none: (x - y) * (x - y) in float32, one pass
    else:
        torch.sub(x, y, out=d)
        d.mul_(d)


def _squares_into(x: Tensor, y: Tensor, out: Tensor, scratch: _Scratch) -> None:
    """``out`` (float64) = ``_squares_f32`` widened exactly. The squares go to a float32 buffer first:
    given a float64 ``out``, torch would compute into a fresh float32 temporary and copy that, an
    allocation a pass."""
    d = scratch.get("d", torch.float32, x.numel())
    _squares_f32(x, y, d)
    out.copy_(d)


# Row length of the float32 partial sums of ``drift_sq_bounds``: a sum of m non-negative float32 terms, in
# any order, is within gamma(m - 1) = (m - 1) u / (1 - (m - 1) u), u = 2**-24, of the exact sum (Higham,
# Accuracy and Stability of Numerical Algorithms, 4.2); 1,024 terms: within 6.1e-5, a drift within 3.1e-5.
_BOUND_ROW = 1 << 10
# The smallest tensor that ``drift_sq_bounds`` sums in rows: below it, the exact sums of tensors batched
# together cost less than a few ops per tensor.
_BOUND_MIN = 1 << 15
_F32_UNIT = 2.0**-24
_F64_UNIT = 2.0**-53


@torch.no_grad()
def drift_sq_norms(model: Sequence[Tensor], initial: Sequence[Tensor]) -> Tensor:
    """Per-tensor sum of ``float(model - initial)**2``, float64 [n]: the difference in the tensors' dtype,
    each square in float32 (as fl4health's float32 norm squares), the squares summed in float64
    (``drift_square`` in csrc/common/scores.h); a one-element tensor's exact square in float64.

    A large tensor goes in passes of ``_CHUNK`` elements; small ones of one dtype and size together,
    concatenated up to ``_CHUNK`` elements and summed as the rows of a matrix. The temporaries are
    chunk-sized and reused, and the sums come back as one tensor, with no host sync in between."""
    _checks.check_tensors("drift_sq_norms", model, initial)
    return _drift_sums(model, initial, bounded=False)


@torch.no_grad()
def drift_sq_bounds(model: Sequence[Tensor], initial: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``drift_sq_norms`` to within a known error, for a selection that only compares drifts: (estimate,
    relative error), float64 [n] each; ``drift_sq_norms`` lies in estimate * (1 -+ error).

    A tensor of ``_BOUND_MIN`` elements or more is squared exactly as ``drift_sq_norms`` squares it (in
    passes of ``_CHUNK``, no concatenation), but the squares are summed in float32, in rows of
    ``_BOUND_ROW`` (one pass over a float32 buffer in cache), and only the row sums in float64:
    widening every square to float64 and summing that is most of ``drift_sq_norms``' time on a large
    model. Its error is the rows' float32 bound plus a float64 term for both sums' own rounding.
    Smaller tensors are ``drift_sq_norms``' own numbers (error 0)."""
    _checks.check_tensors("drift_sq_norms", model, initial)
    est = _drift_sums(model, initial, bounded=True)
    rows = _BOUND_ROW - 1
    row_error = rows * _F32_UNIT / (1 - rows * _F32_UNIT) * (1 + 2.0**-20)
    errors = [row_error + 4 * t.numel() * _F64_UNIT if t.numel() >= _BOUND_MIN else 0.0 for t in model]
    return est, torch.tensor(errors, dtype=torch.float64, device=est.device)


def _drift_sums(model: Sequence[Tensor], initial: Sequence[Tensor], bounded: bool) -> Tensor:
    """``drift_sq_norms``; with ``bounded``, ``drift_sq_bounds``' estimate for the large tensors."""
    device = model[0].device if len(model) else torch.device("cpu")
    n = len(model)
    if not n:
        return torch.zeros(0, dtype=torch.float64, device=device)
    sizes = [t.numel() for t in model]
    scratch = _Scratch(device)
    sums: list[Tensor] = []  # float64 partial sums ...
    owners: list[int] = []  # ... and the tensor each one belongs to
    alike: dict[tuple[torch.dtype, int], list[int]] = {}
    large = [i for i, size in enumerate(sizes) if size >= (_BOUND_MIN if bounded else _CHUNK)]
    if bounded and large:
        # Each large tensor's row sums, one after the other in one float32 buffer (a tensor's last row
        # may be short: _CHUNK is a multiple of the row length, so only its last pass has one).
        counts = [-(-sizes[i] // _BOUND_ROW) for i in large]
        partial = torch.empty(sum(counts), dtype=torch.float32, device=device)
        buffer = scratch.get("d", torch.float32, min(_CHUNK, max(sizes[i] for i in large)))
        at = 0
        for i in large:
            x, y = _flat(model[i]), _flat(initial[i])
            passes = ((x, y),) if sizes[i] <= _CHUNK else zip(x.split(_CHUNK), y.split(_CHUNK))
            for xa, ya in passes:
                m = xa.numel()
                d = buffer if m == buffer.numel() else buffer[:m]
                _squares_f32(xa, ya, d)
                rows = m // _BOUND_ROW
                torch.sum(d[: rows * _BOUND_ROW].view(rows, _BOUND_ROW), 1, out=partial[at : at + rows])
                at += rows
                if m > rows * _BOUND_ROW:
                    torch.sum(d[rows * _BOUND_ROW :], 0, keepdim=True, out=partial[at : at + 1])
                    at += 1
        sums.append(partial.double())
        owners_of_rows = torch.repeat_interleave(torch.tensor(large), torch.tensor(counts)).to(device)
    else:
        owners_of_rows = None
        for i in large:
            x, y = _flat(model[i]), _flat(initial[i])
            for lo in range(0, sizes[i], _CHUNK):
                xa, ya = x[lo : lo + _CHUNK], y[lo : lo + _CHUNK]
                sq = scratch.get("sq", torch.float64, xa.numel())
                _squares_into(xa, ya, sq, scratch)
                sums.append(sq.sum(0, keepdim=True))
                owners.append(i)
    large_set = set(large)
    for i, (t, size) in enumerate(zip(model, sizes)):
        if size > 1 and i not in large_set:
            alike.setdefault((t.dtype, size), []).append(i)
    for (_, size), members in alike.items():
        step = max(1, _CHUNK // size)
        for lo in range(0, len(members), step):
            batch = members[lo : lo + step]
            x, y = _flatten([model[i] for i in batch]), _flatten([initial[i] for i in batch])
            sq = scratch.get("sq", torch.float64, x.numel())
            _squares_into(x, y, sq, scratch)
            sums.append(sq.view(len(batch), size).sum(1))
            owners.extend(batch)
    singles = [i for i in range(n) if sizes[i] == 1]
    for dt in dict.fromkeys(model[i].dtype for i in singles):
        group = [i for i in singles if model[i].dtype == dt]
        # One element: torch's norm is |d|, so the exact square (in float64) of the float32 difference.
        d = (_flatten([model[i] for i in group]) - _flatten([initial[i] for i in group])).float().double()
        sums.append(d * d)
        owners.extend(group)
    out = torch.zeros(n, dtype=torch.float64, device=device)
    if sums:
        index = torch.tensor(owners, dtype=torch.int64, device=device)
        if owners_of_rows is not None:
            index = torch.cat([owners_of_rows, index])
        out.index_add_(0, index, torch.cat(sums))
    return out


# The "smallest" formulas: the negation of the "largest" one before them.
_NEGATED_KINDS = (
    ScoreKind.SMALLEST_FINAL_MAGNITUDE,
    ScoreKind.SMALLEST_MAGNITUDE_CHANGE,
    ScoreKind.SMALLEST_INCREASE_IN_MAGNITUDE,
)


def score_into(kind: int, x: Tensor, y: Tensor | None, out: Tensor, tmp: Tensor | None = None) -> None:
    """Write fl4health's score formula ``kind`` of (x, y) into ``out`` (same shape and dtype); ``tmp``, a
    buffer like ``out``, holds |y| for the increase formulas (else a temporary is made)."""
    if kind in (ScoreKind.LARGEST_FINAL_MAGNITUDE, ScoreKind.SMALLEST_FINAL_MAGNITUDE):
        torch.abs(x, out=out)
    elif kind in (ScoreKind.LARGEST_MAGNITUDE_CHANGE, ScoreKind.SMALLEST_MAGNITUDE_CHANGE):
        assert y is not None
        if x.dtype == torch.float32 and y.dtype == torch.float32:
            # |x - y| in one pass: smooth L1 with beta 0 is |d| - 0.5 * 0, the float32 |x - y| bit for bit
            torch._C._nn.smooth_l1_loss(x, y, 0, 0.0, out=out)
        else:
            torch.sub(x, y, out=out)
            out.abs_()
    else:
        assert y is not None
        torch.abs(x, out=out)
        out.sub_(torch.abs(y) if tmp is None else torch.abs(y, out=tmp))
    if kind in _NEGATED_KINDS:
        out.neg_()


def _group_dtypes(tensors: Sequence[Tensor]) -> list[torch.dtype]:
    return list(dict.fromkeys(t.dtype for t in tensors))


@torch.no_grad()
def scores(model: Sequence[Tensor], initial: Sequence[Tensor], kind: int) -> list[Tensor]:
    """Score formula ``kind`` for every tensor; one flat buffer per dtype, in order of first appearance.

    Large tensors go in passes of ``_CHUNK`` elements (a formula's two or three passes run over a chunk
    still in cache); consecutive small tensors of a dtype, whose scores are consecutive in its buffer,
    in one concatenation each (not a handful of ops per tensor)."""
    _checks.check_formula_kind("scores", kind, NUM_FORMULAS)
    needs_y = uses_initial(kind)
    _checks.check_tensors("scores", model, initial if needs_y else None)
    device = model[0].device if len(model) else torch.device("cpu")
    sizes = [t.numel() for t in model]
    dtypes = _group_dtypes(model)
    totals = dict.fromkeys(dtypes, 0)
    starts = []  # each tensor's place in its dtype's buffer
    for t, size in zip(model, sizes):
        starts.append(totals[t.dtype])
        totals[t.dtype] += size
    buffers = {dt: torch.empty(totals[dt], dtype=dt, device=device) for dt in dtypes}
    scratch = _Scratch(device)
    for batch in _batches(model, sizes, lambda i: sizes[i] > 0):
        dt = model[batch[0]].dtype
        if len(batch) == 1:
            x, y = _flat(model[batch[0]]), _flat(initial[batch[0]]) if needs_y else None
        else:
            x = _flatten([model[i] for i in batch])
            y = _flatten([initial[i] for i in batch]) if needs_y else None
        out = buffers[dt][starts[batch[0]] : starts[batch[0]] + x.numel()]
        for lo in range(0, x.numel(), _CHUNK):
            hi = min(lo + _CHUNK, x.numel())
            tmp = scratch.get("abs_y", dt, hi - lo) if kind >= ScoreKind.LARGEST_INCREASE_IN_MAGNITUDE else None
            score_into(kind, x[lo:hi], y[lo:hi] if y is not None else None, out[lo:hi], tmp)
    return [buffers[dt] for dt in dtypes]


def _score_passes(kind: int, x: Tensor, y: Tensor | None, out: Tensor, scratch: _Scratch) -> None:
    """Formula ``kind`` of flat x, y into flat ``out``: |x| in one pass over the whole (nothing to keep in
    cache between passes), the formulas of two or three ops in passes of ``_CHUNK`` elements."""
    if kind == ScoreKind.LARGEST_FINAL_MAGNITUDE:
        torch.abs(x, out=out)
        return
    for lo in range(0, x.numel(), _CHUNK):
        hi = min(lo + _CHUNK, x.numel())
        tmp = scratch.get("abs_y", x.dtype, hi - lo) if kind >= ScoreKind.LARGEST_INCREASE_IN_MAGNITUDE else None
        score_into(kind, x[lo:hi], y[lo:hi] if y is not None else None, out[lo:hi], tmp)


def _foreach_scores(kind: int, xs: Sequence[Tensor], ys: Sequence[Tensor] | None) -> list[Tensor]:
    """``score_into``'s formula for every tensor, each op once over the whole list: torch's foreach ops run
    their per-tensor loop in C++, an output each, no copy into a batch (on 1,800 small tensors a third of
    the time of concatenating them, scoring the batch and splitting it into views)."""
    if kind in (ScoreKind.LARGEST_FINAL_MAGNITUDE, ScoreKind.SMALLEST_FINAL_MAGNITUDE):
        out = torch._foreach_abs(xs)
    elif kind in (ScoreKind.LARGEST_MAGNITUDE_CHANGE, ScoreKind.SMALLEST_MAGNITUDE_CHANGE):
        assert ys is not None
        out = torch._foreach_sub(xs, ys)
        torch._foreach_abs_(out)
    else:
        assert ys is not None
        out = torch._foreach_abs(xs)
        torch._foreach_sub_(out, torch._foreach_abs(ys))
    if kind in _NEGATED_KINDS:
        torch._foreach_neg_(out)
    return list(out)


@torch.no_grad()
def score_tensors(model: Sequence[Tensor], initial: Sequence[Tensor], kind: int) -> list[Tensor]:
    """``scores`` as one tensor per input tensor, shaped like it (what ``ops.scores`` returns).

    A tensor of ``_CHUNK`` elements or more gets an output of its own, as fl4health's per-tensor ops
    do (one buffer of the whole model's size would be a fresh mapping every call, above glibc's
    largest mmap threshold, 32 MB), the large ones from the output cache (``_empty_outputs``): memory
    that glibc hands back to the system between calls is first touched again, page by page, which
    takes longer than the scores themselves. The smaller tensors go through foreach ops
    (``_foreach_scores``)."""
    _checks.check_formula_kind("scores", kind, NUM_FORMULAS)
    needs_y = uses_initial(kind)
    _checks.check_tensors("scores", model, initial if needs_y else None)
    device = model[0].device if len(model) else torch.device("cpu")
    sizes = [t.numel() for t in model]
    small = [i for i, size in enumerate(sizes) if size < _CHUNK]
    out: list[Tensor | None] = [None] * len(model)
    if small:
        ys = [initial[i] for i in small] if needs_y else None
        for i, score in zip(small, _foreach_scores(kind, [model[i] for i in small], ys)):
            out[i] = score
    scratch = _Scratch(device)
    large = [i for i, size in enumerate(sizes) if size >= _CHUNK]
    for i, flat in zip(large, _empty_outputs([sizes[i] for i in large], [model[i].dtype for i in large], device)):
        _score_passes(kind, _flat(model[i]), _flat(initial[i]) if needs_y else None, flat, scratch)
        out[i] = flat.view(model[i].shape)
    return out  # type: ignore[return-value]  # every entry filled: the small ones, then the large ones


def views_like(buffers: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Views of per-dtype flat buffers (``scores``' output), one per tensor of ``like``, with its shape:
    a view per tensor made in C++ (``unflatten_dense_tensors``), not a slice and a view from Python."""
    by_dtype = {b.dtype: b for b in buffers}
    if len(by_dtype) == 1:
        out = list(torch._C._nn.unflatten_dense_tensors(buffers[0], list(like)))
    else:
        members: dict[torch.dtype, list[int]] = {dt: [] for dt in by_dtype}
        for i, t in enumerate(like):
            members[t.dtype].append(i)
        out = [None] * len(like)  # type: ignore[list-item]
        for dt, idx in members.items():
            for i, v in zip(idx, torch._C._nn.unflatten_dense_tensors(by_dtype[dt], [like[i] for i in idx])):
                out[i] = v
    # torch 2.6 gives every empty tensor the shape (0,), whatever its own shape
    return [v if v.shape == t.shape else v.new_empty(t.shape) for v, t in zip(out, like)]


def _philox_rounds(c0: Tensor, c1: Tensor, c2: Tensor | None, c3: Tensor | None, key: tuple[int, int]) -> list[Tensor]:
    """Ten Philox4x32-10 rounds on int64 words (each < 2**32; None: a word that is 0), in place where it
    can: one product and a few elementwise ops per word and round, no [..., 4] stack per round."""
    k0, k1 = key
    p0, p1 = torch.empty_like(c0), torch.empty_like(c0)
    if c2 is None or c3 is None:  # words 2 and 3 zero (the masks' counters): the first round simplifies
        torch.mul(c0, _PHILOX_M0, out=p0)  # mulhilo(M1, 0) is (0, 0)
        c0 = c1.bitwise_xor(k0)
        c1 = torch.zeros_like(c0)
        c2 = torch.bitwise_right_shift(p0, 32).bitwise_and_(_MASK32).bitwise_xor_(k1)
        c3 = p0.bitwise_and(_MASK32)
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
        rounds = 9
    else:
        c0, c1, c2, c3 = c0.clone(), c1.clone(), c2.clone(), c3.clone()
        rounds = 10
    for _ in range(rounds):
        torch.mul(c0, _PHILOX_M0, out=p0)  # < 2**64: wraps in int64, the bits are right
        torch.mul(c2, _PHILOX_M1, out=p1)
        torch.bitwise_right_shift(p1, 32, out=c0).bitwise_and_(_MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        torch.bitwise_right_shift(p0, 32, out=c2).bitwise_and_(_MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        c1, p1 = p1.bitwise_and_(_MASK32), c1  # the low halves are the new words 1 and 3; the old
        c3, p0 = p0.bitwise_and_(_MASK32), c3  # buffers hold the next round's products
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return [c0, c1, c2, c3]


def philox4x32_10(counter: Tensor, key: tuple[int, int]) -> Tensor:
    """Philox4x32-10 of int64 counters [..., 4] (each < 2**32) under ``key``; returns [..., 4] words."""
    words = _philox_rounds(*(counter[..., i] for i in range(4)), key)  # type: ignore[misc]
    return torch.stack(words, dim=-1)


def _philox_words(seed: int, start: int, count: int, device: torch.device) -> Tensor:
    """The 32-bit words for global element indices [start, start + count) (int64 tensor): Philox of
    each 4-element block once, its four words interleaved."""
    first = start >> 2
    blocks = torch.arange(first, ((start + count + 3) >> 2), dtype=torch.int64, device=device)
    words = _philox_rounds(blocks & _MASK32, blocks >> 32, None, None, (seed & _MASK32, (seed >> 32) & _MASK32))
    return torch.stack(words, dim=-1).view(-1)[start - (first << 2) :][:count]


def _portable_exp_(x: Tensor) -> Tensor:
    """exp(x) for float32 x in [-87, 87] with csrc/common/bernoulli.h's operations in its order, each
    one torch op (so never contracted into an FMA); ``x`` is overwritten, the result is a new tensor."""
    k = torch.mul(x, 1.44269504)
    k.add_(12582912.0).sub_(12582912.0)  # round half to even: 1.5 * 2**23, exact for |x| < 2**22
    t = torch.mul(k, 0.693359375)
    r = x.sub_(t)
    r.sub_(torch.mul(k, -2.12194440e-4, out=t))
    p = torch.mul(r, 1.0 / 5040.0, out=t)  # the first step's constant times r, as (1 / 5040) * r
    p.add_(1.0 / 720.0)
    for c in (1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p.mul_(r).add_(c)
    scale = k.to(torch.int32).add_(127).bitwise_left_shift_(23).view(torch.float32)
    return p.mul_(scale)


def _portable_exp(x: Tensor) -> Tensor:
    return _portable_exp_(x.clone())


def _probability_(x: Tensor) -> Tensor:
    """``bernoulli_probability`` of float32 scores given as ``x``, which is overwritten."""
    x.neg_().clamp_(-87.0, 87.0).nan_to_num_(87.0)  # NaN stays NaN through the clamp, then 87 (~0)
    return _portable_exp_(x).add_(1.0).reciprocal_()


def bernoulli_probability(score: Tensor) -> Tensor:
    """sigmoid(score) with exactly the compiled kernels' float32 operations (NaN: ~1.6e-38, never sampled)."""
    return _probability_(score.to(torch.float32, copy=True))


def word_to_uniform(words: Tensor) -> Tensor:
    # ((w >> 9) << 1) | 1 is (w >> 8) | 1: an odd integer below 2**24, exact in float32
    return torch.bitwise_right_shift(words, 8).bitwise_or_(1).to(torch.float32).mul_(1.0 / 16777216.0)


_MASK64 = (1 << 64) - 1
_FP_LANES = 64
_BITS_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def _fingerprint_weights(device: torch.device) -> tuple[Tensor, Tensor]:
    lanes = torch.arange(_FP_LANES, dtype=torch.int64, device=device)
    lo = (((lanes * 0x9E3779B9) & _MASK32) ^ 0x85EBCA6B) | 1
    hi = (((lanes * 0xC2B2AE35) & _MASK32) ^ 0x27D4EB2F) | 1
    return lo, hi


def _stream_bases(scores: Sequence[Tensor], counters: Sequence[int] | None, op: str) -> list[int]:
    """Each tensor's first stream index: its place in the concatenation, or ``counters[i]``."""
    if counters is None:
        bases, base = [], 0
        for s in scores:
            bases.append(base)
            base += s.numel()
        return bases
    if len(counters) != len(scores):
        raise ValueError(f"layersel::{op}: got {len(counters)} counters for {len(scores)} tensors")
    for i, (c, s) in enumerate(zip(counters, scores)):
        if not 0 <= c <= 2**62 - s.numel():
            raise ValueError(f"layersel::{op}: counter #{i} is {c} (expected 0 <= counter and counter + numel <= 2^62)")
    return [int(c) for c in counters]


def _stream_chunks(
    scores: Sequence[Tensor], bases: Sequence[int], same: Callable[[Tensor, Tensor], bool]
) -> Iterator[tuple[int, int, list[Tensor]]]:
    """(first stream index, first output index, flat pieces) of at most ``_MASK_CHUNK`` elements: consecutive
    tensors whose stream indices follow on (always, without counters) and that are ``same`` share a
    chunk, so that many small tensors cost a few ops per chunk instead of per tensor."""
    pieces: list[Tensor] = []
    g0 = at0 = filled = 0
    stream_end = -1  # the stream index after the pending pieces
    at = 0
    prev: Tensor | None = None
    for s, base in zip(scores, bases):
        n = s.numel()
        flat = s.detach().reshape(-1)
        for lo in range(0, n, _MASK_CHUNK):
            hi = min(n, lo + _MASK_CHUNK)
            if pieces and (base + lo != stream_end or filled + hi - lo > _MASK_CHUNK or not same(prev, s)):  # type: ignore[arg-type]
                yield g0, at0, pieces
                pieces = []
            if not pieces:
                g0, at0, filled = base + lo, at + lo, 0
            pieces.append(flat[lo:hi])
            filled += hi - lo
            stream_end = base + hi
            prev = s
        at += n
    if pieces:
        yield g0, at0, pieces


_UNSIGNED_VIEW = {4: torch.uint32, 2: torch.uint16}


def _fingerprint_terms(bits: Tensor, g: Tensor, size: int, w_lo: Tensor, w_hi: Tensor) -> Tensor:
    """Sum over elements of a run's (lo32 * W_lo[lane] + hi32 * W_hi[lane]), each with its element's
    lane weights ``w_lo`` / ``w_hi`` (shaped like ``bits`` or broadcast to it), unsigned ``bits`` in int64."""
    if size == 8:
        return (bits & _MASK32) * w_lo + ((bits >> 32) & _MASK32) * w_hi
    return bits * w_lo


@torch.no_grad()
def score_fingerprint(scores: Sequence[Tensor], counters: Sequence[int] | None = None) -> int:
    """The 64-bit fingerprint of csrc/common/fingerprint.h: sum over elements g of the concatenation of
    (lo32(bits) * W_lo[g % 64] + hi32(bits) * W_hi[g % 64]) * (2 * (g // 64) + 1), mod 2**64
    (with ``counters``, tensor i's element j is g = counters[i] + j).
    int64 tensor arithmetic wraps mod 2**64, which is what the definition asks for. The elements of
    whole 64-lane rows are taken as a matrix (the lane weights broadcast along it, one multiplier per
    row); only a chunk's partial first and last rows index the weights element by element."""
    _checks.check_tensors("score_fingerprint", scores, None)
    _checks.check_floating_scores(scores, "score_fingerprint")
    if not len(scores):
        return 0
    device = scores[0].device
    w_lo, w_hi = _fingerprint_weights(device)
    partial: list[Tensor] = []
    bases = _stream_bases(scores, counters, "score_fingerprint")
    same_width = lambda a, b: a.element_size() == b.element_size()
    for g0, _, pieces in _stream_chunks(scores, bases, same_width):
        size = pieces[0].element_size()
        flat = pieces[0] if len(pieces) == 1 else torch.cat([p.view(_BITS_VIEW[size]) for p in pieces])
        flat = flat.view(_BITS_VIEW[size])
        bits = flat if size == 8 else flat.view(_UNSIGNED_VIEW[size]).to(torch.int64)
        m = bits.numel()
        head = min(m, -g0 % _FP_LANES)
        rows = (m - head) // _FP_LANES
        body = slice(head, head + rows * _FP_LANES)
        if rows:
            terms = _fingerprint_terms(bits[body].view(rows, _FP_LANES), None, size, w_lo, w_hi).sum(1)  # type: ignore[arg-type]
            first_row = (g0 + head) >> 6
            mult = torch.arange(2 * first_row + 1, 2 * (first_row + rows) + 1, 2, dtype=torch.int64, device=device)
            partial.append((terms * mult).sum())
        edge = torch.cat([torch.arange(head, device=device), torch.arange(head + rows * _FP_LANES, m, device=device)])
        if edge.numel():
            g = edge + g0
            lane = g & (_FP_LANES - 1)
            terms = _fingerprint_terms(bits[edge], g, size, w_lo[lane], w_hi[lane])
            partial.append((terms * (2 * (g >> 6) + 1)).sum())
    if not partial:
        return 0
    return int(torch.stack(partial).sum()) & _MASK64


@torch.no_grad()
def sample_masks(
    scores: Sequence[Tensor],
    seed: int,
    dtype: torch.dtype,
    key_by_scores: bool = False,
    counters: Sequence[int] | None = None,
) -> Tensor:
    """Bernoulli(sigmoid(score)) masks of all tensors, flat, in ``dtype``; bit-equal to the compiled kernels.

    In chunks of ``_MASK_CHUNK`` elements (small tensors share one): Philox once per 4-element block (its
    four words serve four elements), the probability in place in a float32 buffer, the comparison
    written straight into the output."""
    _checks.check_mask_dtype(dtype)
    _checks.check_tensors("sample_masks", scores, None)
    _checks.check_floating_scores(scores)
    device = scores[0].device if len(scores) else torch.device("cpu")
    total = sum(s.numel() for s in scores)
    bases = _stream_bases(scores, counters, "sample_masks")
    if key_by_scores:
        seed = key_from_scores(seed, score_fingerprint(scores, counters), total)
    out = torch.empty(total, dtype=dtype, device=device)
    direct = dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    scratch = _Scratch(device)
    for g0, at, pieces in _stream_chunks(scores, bases, lambda a, b: True):
        m = sum(p.numel() for p in pieces)
        x = scratch.get("x", torch.float32, m)
        if len(pieces) == 1:
            x.copy_(pieces[0])
        else:
            torch.cat(pieces, out=x)
        probability = _probability_(x)
        u = word_to_uniform(_philox_words(seed, g0, m, device))
        if direct:
            torch.lt(u, probability, out=out[at : at + m])
        else:
            out[at : at + m] = torch.lt(u, probability)
    return out


# ----------------------------------------------------------------------------- sparse selection


def _check_inputs(model: Sequence[Tensor], initial: Sequence[Tensor], kind: int, op: str) -> None:
    """The kernels' table checks (a meta-device initial tensor must not pass as zeros); given scores
    (ScoreKind.GIVEN) may have another dtype than their tensor, bool too."""
    needs_y = uses_initial(kind)
    _checks.check_tensors(op, model, initial if needs_y else None, given=kind == ScoreKind.GIVEN)


def sparse_score(kind: int, x: Tensor, y: Tensor | None) -> Tensor:
    if kind == ScoreKind.GIVEN:
        assert y is not None
        return y
    out = torch.empty_like(x)
    score_into(kind, x, y, out)
    return out


def kth_largest_score(
    model: Sequence[Tensor], initial: Sequence[Tensor], kind: int, k: int, score_dtype: torch.dtype
) -> Tensor:
    """The k-th largest score (1-based) over all tensors, as torch.cat(...).sort(descending=True)[k - 1].

    Radix select on order-preserving keys, 16 bits a pass, one tensor at a time (bounded memory).
    """
    if not score_dtype.is_floating_point and score_dtype != torch.int64:
        # 8/16/32-bit integer scores: the same k-th largest value among the int64 values.
        return kth_largest_score(model, initial, kind, k, torch.int64).to(score_dtype)
    _check_inputs(model, initial, kind, "kth_largest_score")
    _checks.check_rank("kth_largest_score", k, sum(t.numel() for t in model))
    nbits = key_bits(score_dtype)

    def keys(prefix: int, consumed: int) -> Iterator[Tensor]:
        for i, x in enumerate(model):
            s = sparse_score(kind, x, initial[i] if uses_initial(kind) else None)
            yield keys_matching(signed_keys(s.reshape(-1).to(score_dtype)), prefix, consumed, nbits)

    return key_to_value(radix_select(keys, k, nbits, (16,) * (nbits // 16)), score_dtype)


def sparse_extract(
    model: Sequence[Tensor], initial: Sequence[Tensor], kind: int, thresholds: Sequence[float | int]
) -> tuple[list[Tensor], list[Tensor]]:
    """Per tensor: non-zero model values whose score passes its threshold, and their row-major indices."""
    _check_inputs(model, initial, kind, "sparse_extract")
    values, indices = [], []
    for i, x in enumerate(model):
        s = sparse_score(kind, x, initial[i] if uses_initial(kind) else None)
        if not s.is_floating_point() and not isinstance(thresholds[i], int):
            s = s.to(torch.float32)  # torch compares an integer tensor with a float scalar in float32
        keep = (s >= thresholds[i]) & (x != 0)
        values.append(x[keep].reshape(-1))
        indices.append(torch.nonzero(keep).reshape(int(keep.sum()), x.dim()))
    return values, indices
