"""Typed wrappers over ``torch.ops.layersel.*``, their fake kernels, and the backend choice.

Every op has a compiled CPU and CUDA kernel (csrc/cpu, csrc/cuda) and a pure-torch twin
(``_torch_ops``). ``backend()`` says which one runs; ``set_backend`` switches at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from . import _bits, _checks, _loader, _torch_ops
from ._loader import COMPILED
from ._score_kinds import ScoreKind

Backend = Literal["compiled", "torch"]
_backend: Backend = "compiled" if COMPILED is not None else "torch"


def backend() -> Backend:
    """The active backend: 'compiled' (C++/CUDA kernels) or 'torch' (pure-torch fallback)."""
    return _backend


def set_backend(name: Backend) -> None:
    """Switch backends. 'compiled' needs the compiled module."""
    global _backend
    if name not in ("compiled", "torch"):
        raise ValueError(f"backend must be 'compiled' or 'torch', got {name!r}")
    if name == "compiled" and COMPILED is None:
        raise RuntimeError("the compiled layersel_ext module is not loaded (see `python -m layersel_ext info`)")
    _backend = name


# Which (op, dispatch key) pairs have a compiled kernel, read once: a set lookup is traceable by
# torch.compile, the dispatcher query is not.
_KERNELS = frozenset((op, key) for op in _loader.OPS for key in ("CPU", "CUDA") if _loader.has_kernel(op, key))


def _use_compiled(op: str, device: torch.device) -> bool:
    # A device without a compiled kernel (a CPU-only build on a GPU machine) runs the torch twin.
    return _backend == "compiled" and (op, "CUDA" if device.type == "cuda" else "CPU") in _KERNELS


def compiled_helpers():
    """The compiled module when the compiled backend is active (its ``detach_all``, ``views_like``,
    ``state_items``... do per-tensor work without the dispatcher), else None: the torch backend stays
    pure torch, and so does code that torch.compile traces (dynamo cannot trace into _C; each helper
    has a Python twin that gives the same result)."""
    return COMPILED if _backend == "compiled" and not torch.compiler.is_compiling() else None


def _device(tensors: Sequence[Tensor]) -> torch.device:
    return tensors[0].device if len(tensors) else torch.device("cpu")


# A model's state tensors as the compiled walk holds them (``_model_state.state_lists``,
# csrc/python/held_tensors.cpp): a read-only sequence that makes a Python tensor only for the entry read.
# The ops take it as it is (``_call``); ``numels`` and ``dtypes`` read it without a tensor per entry.
HELD: tuple[type, ...] = (COMPILED.HeldTensors,) if hasattr(COMPILED, "HeldTensors") else ()


def _arg(tensors: Sequence[Tensor]) -> Sequence[Tensor]:
    """A Tensor[] argument: held tensors as they are, any other sequence as a list."""
    return tensors if isinstance(tensors, HELD) else list(tensors)


def _call(name: str, *args):
    """``torch.ops.layersel.<name>(*args)``; with held tensors among the arguments, through
    ``_C.call_op``, which passes them as the op's Tensor[] (the same dispatcher call, no Python
    tensor per entry: on a model of 2,000 small tensors that was ~1 ms per model per call). It
    skips ``__torch_function__``: while a TorchFunctionMode is active, or a tensor of another
    argument overrides it, the held tensors go to ``torch.ops`` as a list instead."""
    if any(isinstance(a, HELD) for a in args):
        if not torch._C._is_torch_function_mode_enabled() and not any(
            isinstance(a, list) and torch._C._has_torch_function(a) for a in args
        ):
            return COMPILED.call_op(name, *args)
        args = tuple(list(a) if isinstance(a, HELD) else a for a in args)
    return getattr(torch.ops.layersel, name)(*args)


def numels(tensors: Sequence[Tensor]) -> list[int]:
    return tensors.numels() if isinstance(tensors, HELD) else [t.numel() for t in tensors]


def dtypes(tensors: Sequence[Tensor]) -> list[torch.dtype]:
    return tensors.dtypes() if isinstance(tensors, HELD) else [t.dtype for t in tensors]


def take(tensors: Sequence[Tensor], indices: Sequence[int]) -> Sequence[Tensor]:
    """The tensors at ``indices`` (held ones stay held)."""
    return tensors.take(list(indices)) if isinstance(tensors, HELD) else [tensors[i] for i in indices]


# ``_dtensor_ops.install``, handed over by that module when it is imported (the package imports it):
# its handlers call the wrappers below, so it sits above this module and cannot be imported here.
_install_dtensor_handlers: Callable[[], bool] | None = None


def register_dtensor_installer(install: Callable[[], bool]) -> None:
    """What ``enable_dtensor_ops`` runs (``_dtensor_ops.install``)."""
    global _install_dtensor_handlers
    _install_dtensor_handlers = install


def enable_dtensor_ops() -> bool:
    """Let ``torch.ops.layersel.*`` take DTensors (``_dtensor_ops``): done by itself at import of
    layersel_ext when ``torch.distributed.tensor`` is imported already, or when a public function
    first meets a DTensor; call this when ops are called directly on DTensors before either.
    Returns whether the handlers are in place (False without DTensor or the compiled ops)."""
    return _install_dtensor_handlers is not None and _install_dtensor_handlers()


def drift_sq_norms(model: Sequence[Tensor], initial: Sequence[Tensor]) -> Tensor:
    """float64 [n]: for each pair, the sum over elements of ``float(model[i] - initial[i]) ** 2``."""
    if not len(model):
        return torch.zeros(0, dtype=torch.float64)
    with torch.no_grad():
        if _use_compiled("drift_sq_norms", _device(model)):
            return _call("drift_sq_norms", _arg(model), _arg(initial))
        return _torch_ops.drift_sq_norms(model, initial)


def drift_sq_bounds(model: Sequence[Tensor], initial: Sequence[Tensor]) -> tuple[Tensor, Tensor] | None:
    """``drift_sq_norms`` to within a known relative error, for a selection that only compares drifts:
    (estimate, error), float64 [n] each (``_torch_ops.drift_sq_bounds``). None where the exact op
    costs no more: the compiled kernels (one fused pass already) and devices other than the CPU."""
    if not len(model) or _device(model).type != "cpu" or _use_compiled("drift_sq_norms", _device(model)):
        return None
    with torch.no_grad():
        return _torch_ops.drift_sq_bounds(model, initial)


def scores(model: Sequence[Tensor], initial: Sequence[Tensor] | None, kind: int) -> list[Tensor]:
    """Score formula ``kind`` (a ``ScoreKind`` below GIVEN, fl4health's order) of every tensor, shaped like it.

    The compiled kernels' results are views into one buffer per dtype (one allocation per dtype, not
    per tensor, its pages from the kernels' output cache); the torch backend's are a tensor per large
    tensor and views into one buffer per batch of small ones (``_torch_ops.score_tensors``).
    """
    if not len(model):
        return []
    ys = _arg(initial) if initial is not None else []
    with torch.no_grad():
        if _use_compiled("scores", _device(model)):
            buffers = _call("scores", _arg(model), ys, kind)
        elif torch.compiler.is_compiling():  # dynamo cannot trace the C++ views of ``score_tensors``
            buffers = _torch_ops.scores(model, ys, kind)
        else:
            return _torch_ops.score_tensors(model, ys, kind)
    return split_grouped(buffers, model)


def split_grouped(buffers: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Views of per-dtype flat buffers, one per tensor of ``like``, with its shape.

    With the compiled module the views are made in C++ without the dispatcher (``_C.views_like``:
    a slice and a view per tensor from Python cost more than the kernel on a model of 1,000 small
    tensors); in the pure-torch backend by ``_torch_ops.views_like`` (views made in C++ by torch), under
    torch.compile by the loop below."""
    helpers = compiled_helpers()
    if helpers is not None:
        return helpers.views_like(list(buffers), _arg(like))
    if not torch.compiler.is_compiling():  # dynamo cannot trace the C++ views of the torch twin's helper
        return _torch_ops.views_like(buffers, like)
    by_dtype = {b.dtype: b for b in buffers}
    fill = dict.fromkeys(by_dtype, 0)
    out = []
    for t in like:
        start = fill[t.dtype]
        out.append(by_dtype[t.dtype][start : start + t.numel()].view(t.shape))
        fill[t.dtype] = start + t.numel()
    return out


# Mask dtypes the kernels write directly; the other integer dtypes are widened from uint8.
_KERNEL_MASK_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _signed_seed(seed: int) -> int:
    """A [0, 2**64) seed as the schema's int64, bits kept."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def sample_masks(
    scores: Sequence[Tensor],
    seed: int,
    dtype: torch.dtype = torch.uint8,
    key_by_scores: bool = False,
    counters: Sequence[int] | None = None,
) -> Tensor:
    """Flat Bernoulli(sigmoid(score)) masks of all tensors in ``dtype``, on the scores' device.

    Element g of the concatenation compares word g % 4 of Philox4x32-10 block g // 4 with
    sigmoid(score): the same bits on CPU and CUDA, for any thread or block count. The key is
    ``seed``, or with ``key_by_scores`` ``key_from_scores(seed, fingerprint(scores))``
    (csrc/common/fingerprint.h): different scores give independent streams for the same seed.
    With ``counters``, tensor i's elements take stream indices ``counters[i] + j`` instead of their
    place in the concatenation (a shard keeps its unsharded indices; the output is still the
    concatenation of the given tensors).
    """
    signed_seed = _signed_seed(seed)
    counters = None if counters is None else [int(c) for c in counters]
    with torch.no_grad():
        if len(scores) and _use_compiled("sample_masks", _device(scores)):
            if dtype not in _KERNEL_MASK_DTYPES and dtype != torch.bool and not dtype.is_floating_point:
                narrow = torch.ops.layersel.sample_masks(
                    list(scores), signed_seed, torch.uint8, key_by_scores, counters
                )
                return narrow.to(dtype)
            return torch.ops.layersel.sample_masks(list(scores), signed_seed, dtype, key_by_scores, counters)
        return _torch_ops.sample_masks(scores, seed, dtype, key_by_scores, counters)


def score_fingerprint(scores: Sequence[Tensor], counters: Sequence[int] | None = None) -> Tensor:
    """The scores' 64-bit fingerprint (csrc/common/fingerprint.h) as int64[1] on their device (its
    bits; no host sync on CUDA), with stream indices as ``sample_masks``' ``counters`` say. The sum is
    mod 2**64 over elements, so the fingerprints of disjoint shards add up to the whole model's."""
    counters = None if counters is None else [int(c) for c in counters]
    with torch.no_grad():
        if len(scores) and _use_compiled("score_fingerprint", _device(scores)):
            return torch.ops.layersel.score_fingerprint(list(scores), counters)
        f = _torch_ops.score_fingerprint(scores, counters)
        return torch.tensor([f - 2**64 if f >= 2**63 else f], dtype=torch.int64, device=_device(scores))


def sample_mask_bits(scores: Sequence[Tensor], seed: int, key_by_scores: bool = False) -> Tensor:
    """``sample_masks``' masks as a bitmap on the scores' device, uint8[ceil(n / 8)]: element g at
    bit g % 8 of byte g // 8 (the compact wire format's order), the last byte's unused bits zero. One
    fused kernel on the CPU and on CUDA (the masks never exist as bytes); the torch backend packs the
    mask bytes."""
    signed_seed = _signed_seed(seed)
    with torch.no_grad():
        if len(scores) and _use_compiled("sample_mask_bits", _device(scores)):
            return torch.ops.layersel.sample_mask_bits(list(scores), signed_seed, key_by_scores)
        return _bits.pack_bits(sample_masks(scores, seed, torch.uint8, key_by_scores))


def kth_largest_score(
    model: Sequence[Tensor], initial: Sequence[Tensor] | None, kind: int, k: int, score_dtype: torch.dtype
) -> Tensor:
    """0-d CPU tensor: the k-th largest (1-based) score of formula ``kind`` over all tensors, in ``score_dtype``.

    Equal to ``torch.cat(scores).to(score_dtype).sort(descending=True)[0][k - 1]``; a radix select, never a sort.
    """
    if not score_dtype.is_floating_point and score_dtype != torch.int64:
        # Integer scores (8/16/32-bit): the k-th largest value is the same among the int64 values.
        return kth_largest_score(model, initial, kind, k, torch.int64).to(score_dtype)
    ys = _arg(initial) if initial is not None else []
    with torch.no_grad():
        if _use_compiled("kth_largest_score", _device(model)):
            return _call("kth_largest_score", _arg(model), ys, kind, k, score_dtype)
        return _torch_ops.kth_largest_score(model, ys, kind, k, score_dtype)


def sparse_extract(
    model: Sequence[Tensor], initial: Sequence[Tensor] | None, kind: int, thresholds: Sequence[float | int]
) -> tuple[list[Tensor], list[Tensor]]:
    """Per tensor: the non-zero values of ``model[t]`` whose score passes ``thresholds[t]``, and their
    row-major indices (N x ndim, int64) — what fl4health's COO packer extracts.

    A float threshold is compared as torch compares a score tensor with a Python float; an int
    threshold (integer scores of an all-integer model) exactly, as torch compares with a Python int.
    The kernels read scores in their tensor's dtype and compare with a float: integer thresholds and
    given scores of another dtype (ScoreKind.GIVEN) run the torch twin."""
    ys = _arg(initial) if initial is not None else []
    kernel_fits = all(isinstance(t, float) for t in thresholds) and (
        kind != ScoreKind.GIVEN or all(y.dtype == x.dtype for x, y in zip(model, ys))
    )
    with torch.no_grad():
        if kernel_fits and _use_compiled("sparse_extract", _device(model)):
            values, indices = _call("sparse_extract", _arg(model), ys, kind, [float(t) for t in thresholds])
            return list(values), list(indices)
        return _torch_ops.sparse_extract(model, ys, kind, thresholds)


def sparse_select(
    model: Sequence[Tensor], initial: Sequence[Tensor] | None, kind: int, k: int
) -> tuple[list[Tensor], list[Tensor]] | None:
    """``sparse_extract`` with every tensor's threshold the k-th largest score, compared as
    ``sparse_coo`` compares it, for a fused score kind whose scores are all of one floating dtype,
    or float32 beside integer tensors (a float32 model's int64 buffers: compared with float32(v),
    the key's own order); None where no kernel does that in one go (other dtypes or devices, the
    torch backend): the caller then runs the two ops. The CPU kernel marks while its sample select
    brackets the k-th largest, so a large model is read once instead of twice; the CUDA kernel turns
    the k-th largest key into the threshold on the device, so the key never comes to the host (one
    sync, the chunk counts, instead of two)."""
    if kind == ScoreKind.GIVEN or not len(model) or not _use_compiled("sparse_select", _device(model)):
        return None
    score_dtype = _one_go_score_dtype(model)
    if score_dtype is None:
        return None
    ys = _arg(initial) if initial is not None else []
    with torch.no_grad():
        values, indices = _call("sparse_select", _arg(model), ys, kind, k, score_dtype)
    return list(values), list(indices)


def _one_go_score_dtype(model: Sequence[Tensor]) -> torch.dtype | None:
    """The score dtype ``sparse_select`` compares in when one kernel can select from ``model``, else None."""
    model_dtypes = set(dtypes(model))
    floating = {dt for dt in model_dtypes if dt.is_floating_point}
    integer = model_dtypes - floating
    if len(floating) != 1 or torch.bool in integer or (integer and floating != {torch.float32}):
        return None
    return floating.pop()


def sparse_select_offsets(
    model: Sequence[Tensor], initial: Sequence[Tensor] | None, kind: int, k: int
) -> tuple[list[Tensor], list[Tensor]] | None:
    """``sparse_select`` in the compact COO wire's form (csrc/cpu/sparse_select_offsets.h): per tensor
    the same values and, instead of int64 [N, ndim] indices, their flat row-major offsets (int64 [N]);
    the values of all tensors lie one after the other in one buffer, as the wire sends them. None
    where the compiled CPU kernel does not do that in one go (where ``sparse_select`` is None, CUDA
    tensors, the torch backend, a build without it): the caller flattens the indices instead."""
    helpers = compiled_helpers()
    if (
        helpers is None
        or not hasattr(helpers, "sparse_select_offsets")
        or kind == ScoreKind.GIVEN
        or not len(model)
        or _device(model).type != "cpu"
        or not _use_compiled("sparse_select", _device(model))
    ):
        return None
    score_dtype = _one_go_score_dtype(model)
    if score_dtype is None:
        return None
    ys = list(initial) if initial is not None else []
    with torch.no_grad():
        values, offsets = helpers.sparse_select_offsets(list(model), ys, kind, k, score_dtype)
    return list(values), list(offsets)


if COMPILED is not None:

    @torch.library.register_fake("layersel::drift_sq_norms")
    def _drift_sq_norms_fake(model: list[Tensor], initial: list[Tensor]) -> Tensor:
        torch._check(len(model) == len(initial))
        _checks.check_devices("drift_sq_norms", model, initial)
        return model[0].new_empty((len(model),), dtype=torch.float64)

    @torch.library.register_fake("layersel::scores")
    def _scores_fake(model: list[Tensor], initial: list[Tensor], kind: int) -> list[Tensor]:
        _checks.check_devices("scores", model, initial)
        dtypes = list(dict.fromkeys(t.dtype for t in model))
        return [model[0].new_empty((sum(t.numel() for t in model if t.dtype == dt),), dtype=dt) for dt in dtypes]

    @torch.library.register_fake("layersel::kth_largest_score")
    def _kth_largest_score_fake(
        model: list[Tensor], initial: list[Tensor], kind: int, k: int, score_dtype: torch.dtype
    ) -> Tensor:
        _checks.check_devices("kth_largest_score", model, initial)
        return torch.empty((), dtype=score_dtype, device="cpu")

    @torch.library.register_fake("layersel::sparse_extract")
    def _sparse_extract_fake(
        model: list[Tensor], initial: list[Tensor], kind: int, thresholds: list[float]
    ) -> tuple[list[Tensor], list[Tensor]]:
        _checks.check_devices("sparse_extract", model, initial)
        ctx = torch.library.get_ctx()
        sizes = [ctx.new_dynamic_size() for _ in model]
        return (
            [x.new_empty((n,)) for x, n in zip(model, sizes)],
            [x.new_empty((n, x.dim()), dtype=torch.int64) for x, n in zip(model, sizes)],
        )

    @torch.library.register_fake("layersel::sparse_select")
    def _sparse_select_fake(
        model: list[Tensor], initial: list[Tensor], kind: int, k: int, score_dtype: torch.dtype
    ) -> tuple[list[Tensor], list[Tensor]]:
        return _sparse_extract_fake(model, initial, kind, [0.0] * len(model))

    @torch.library.register_fake("layersel::sample_masks")
    def _sample_masks_fake(
        scores: list[Tensor],
        seed: int,
        dtype: torch.dtype,
        key_by_scores: bool = False,
        counters: list[int] | None = None,
    ) -> Tensor:
        _checks.check_devices("sample_masks", scores)
        return scores[0].new_empty((sum(t.numel() for t in scores),), dtype=dtype)

    @torch.library.register_fake("layersel::score_fingerprint")
    def _score_fingerprint_fake(scores: list[Tensor], counters: list[int] | None = None) -> Tensor:
        _checks.check_devices("score_fingerprint", scores)
        return scores[0].new_empty((1,), dtype=torch.int64)

    @torch.library.register_fake("layersel::sample_mask_bits")
    def _sample_mask_bits_fake(scores: list[Tensor], seed: int, key_by_scores: bool = False) -> Tensor:
        _checks.check_devices("sample_mask_bits", scores)
        return scores[0].new_empty(((sum(t.numel() for t in scores) + 7) // 8,), dtype=torch.uint8)
