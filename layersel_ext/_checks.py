"""The ops' argument checks, defined once in Python, and the errors that name a model's layer.

The kernels check their arguments once, in C++ (``build_work_table`` in csrc/common/work_table.h,
csrc/common/op_checks.h). Python needs the same checks twice, and both use the functions here:

- the torch twin (``_torch_ops``) raises them with the kernels' messages (``layersel::<op>:
  tensor #i ...``), so that both backends refuse the same calls the same way;
- when a kernel (or the twin) refuses a call from the public API, ``explain_failure`` finds the
  refused entry by the same checks (only on that error path: a call that passes pays nothing
  here) and raises the error naming its layer and what was found there.

An entry is checked in the kernels' order: the model tensor (layout, dtype, device), then its
initial tensor (layout, device, dtype, shape); a non-strided tensor never reaches a C++ kernel (the
dispatcher finds no sparse kernel), so layout comes first. ``entry_fault`` says what is wrong;
``op_error`` and ``layer_error`` say it in the op's words or in the model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NoReturn

import torch
from torch import Tensor

# The dtypes the kernels take: csrc/common/dtypes.h's table (a test compares the two).
SUPPORTED_DTYPES = {
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
}  # fmt: skip

Fault = Literal[
    "layout",  # the model tensor is not dense (strided)
    "dtype",  # the model tensor's dtype is not in SUPPORTED_DTYPES
    "device",  # the model tensor is not on the first model tensor's device
    "initial layout",
    "initial dtype",  # given scores only: their dtype is neither supported nor bool
    "initial device",  # the initial tensor is not on its model tensor's device
    "dtype mismatch",  # the initial tensor's dtype differs from its model tensor's
    "shape mismatch",
]


def entry_fault(x: Tensor, y: Tensor | None, device: torch.device, *, given: bool = False) -> Fault | None:
    """What is wrong with entry (``x``, ``y``) of a call whose first model tensor is on ``device``, or None.

    ``y`` is None when the op does not read initial tensors. ``given``: ``y`` holds custom scores
    (ScoreKind.GIVEN in the twin), which may have another dtype than ``x`` (bool too) and are not
    compared by shape here (the caller checked it).
    """
    if x.layout != torch.strided:
        return "layout"
    if x.dtype not in SUPPORTED_DTYPES:
        return "dtype"
    if x.device != device:
        return "device"
    if y is None:
        return None
    if y.layout != torch.strided:
        return "initial layout"
    if given and y.dtype != torch.bool and y.dtype not in SUPPORTED_DTYPES:
        return "initial dtype"
    if y.device != x.device:
        return "initial device"
    if given:
        return None
    if y.dtype != x.dtype:
        return "dtype mismatch"
    if y.shape != x.shape:
        return "shape mismatch"
    return None


# ----------------------------------------------------------------------------- in the op's words

# Each fault raises one exception type, whichever words say it.
_ERROR_TYPE: dict[Fault, type[Exception]] = {
    "layout": TypeError,
    "dtype": TypeError,
    "device": ValueError,
    "initial layout": TypeError,
    "initial dtype": TypeError,
    "initial device": ValueError,
    "dtype mismatch": TypeError,
    "shape mismatch": ValueError,
}

# The kernels' messages (csrc/common/work_table.h), after "layersel::<op>: ".
_OP_MESSAGES: dict[Fault, str] = {
    "layout": "tensor #{i} has layout {x.layout}; only dense (strided) tensors",
    "dtype": "tensor #{i} has dtype {x.dtype}, which is not supported (expected a floating or integer dtype)",
    "device": "tensor #{i} is on {x.device} but tensor #0 is on {device}",
    "initial layout": "initial tensor #{i} has layout {y.layout}; only dense (strided) tensors",
    "initial dtype": "initial tensor #{i} has dtype {y.dtype}, which is not supported "
    "(expected a floating or integer dtype)",
    "initial device": "initial tensor #{i} is on {y.device} but the model tensor is on {device}",
    "dtype mismatch": "tensor #{i} has dtype {x.dtype} but its initial tensor has {y.dtype}",
    "shape mismatch": "tensor #{i} has shape {x_shape} but its initial tensor has {y_shape}",
}


def op_error(op: str, i: int, fault: Fault, x: Tensor, y: Tensor | None, device: torch.device) -> Exception:
    """The error the kernels raise for ``fault`` at tensor #``i``."""
    shapes = {"x_shape": list(x.shape), "y_shape": list(y.shape) if y is not None else None}
    message = _OP_MESSAGES[fault].format(i=i, x=x, y=y, device=device, **shapes)
    return _ERROR_TYPE[fault](f"layersel::{op}: {message}")


def check_lengths(op: str, model: Sequence[Tensor], initial: Sequence[Tensor]) -> None:
    if len(model) != len(initial):
        raise ValueError(f"layersel::{op}: got {len(model)} model tensors but {len(initial)} initial tensors")


def check_tensors(op: str, model: Sequence[Tensor], initial: Sequence[Tensor] | None, *, given: bool = False) -> None:
    """The kernels' table checks (``build_work_table``): ``initial`` is None when the op does not read it."""
    if initial is not None:
        check_lengths(op, model, initial)
    if not len(model):
        return
    device = model[0].device
    for i, x in enumerate(model):
        y = initial[i] if initial is not None else None
        fault = entry_fault(x, y, device, given=given)
        if fault is not None:
            raise op_error(op, i, fault, x, y, device)


def check_devices(op: str, model: Sequence[Tensor], initial: Sequence[Tensor] = ()) -> None:
    """The device checks alone, for the fake kernels: a list mixing devices can be dispatched to them
    (Meta outranks CPU), and must be refused as the kernels refuse it."""
    if not len(model):
        return
    device = model[0].device
    for i, x in enumerate(model):
        if x.device != device:
            raise op_error(op, i, "device", x, None, device)
    for i, y in enumerate(initial):
        if y.device != device:
            raise op_error(op, i, "initial device", model[0], y, device)


def check_formula_kind(op: str, kind: int, limit: int) -> None:
    """A score kind below ``limit`` (csrc/common/op_checks.h: check_score_kind)."""
    if not 0 <= kind < limit:
        raise ValueError(f"layersel::{op}: kind must be in [0, {limit}), got {kind}")


def check_rank(op: str, k: int, total: int) -> None:
    """A 1-based rank among ``total`` scores (op_checks.h: check_rank)."""
    if not 1 <= k <= total:
        raise ValueError(f"layersel::{op}: k must be in [1, {total}], got {k}")


def check_mask_dtype(dtype: torch.dtype) -> None:
    """Masks are summed by the server: an integer dtype, never bool (op_checks.h: check_mask_dtype; the
    Python wrapper widens uint16/32/64 masks from uint8 ones, so the twin takes every integer dtype)."""
    if dtype == torch.bool:
        raise TypeError("layersel::sample_masks: bool masks are refused (the server sums masks)")
    if dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"layersel::sample_masks: mask dtype must be an integer dtype, got {dtype}")


def check_floating_scores(scores: Sequence[Tensor], op: str = "sample_masks") -> None:
    """op_checks.h: check_floating_scores (after the table checks)."""
    for i, s in enumerate(scores):
        if not s.is_floating_point():
            raise TypeError(f"layersel::{op}: score tensor #{i} has dtype {s.dtype}; scores must be floating point")


# ----------------------------------------------------------------------------- in the model's words


_LAYER_MESSAGES: dict[Fault, str] = {
    "layout": "{what}: layer {name!r} is a {x.layout} tensor; layersel_ext handles dense (strided) tensors only "
    "(convert it with .to_dense(), or keep it out of the state_dict)",
    "dtype": "{what}: layer {name!r}: dtype {x.dtype} is not supported (float32/64, float16, bfloat16, "
    "uint8, int8, int16, int32, int64)",
    "device": "{what}: layer {name!r} is on {x.device} but layer {first!r} is on {device} (one device per model)",
    "initial layout": "{what}: layer {name!r} is a {y.layout} tensor in initial_model; dense tensors only",
    "initial dtype": "{what}: layer {name!r}: the scores' dtype {y.dtype} is not supported",
    "initial device": "layer {name!r}: device {x.device} in model but {y.device} in initial_model",
    "dtype mismatch": "layer {name!r}: dtype {x.dtype} in model but {y.dtype} in initial_model",
    "shape mismatch": "layer {name!r}: shape {x_shape} in model but {y_shape} in initial_model",
}
# Two dtypes get their own words: what fl4health does with them.
_BOOL_MESSAGE = "{what}: layer {name!r}: dtype torch.bool has no drift or score (fl4health fails on it too)"
_COMPLEX_MESSAGE = (
    "{what}: layer {name!r}: dtype {x.dtype} is not supported by layersel_ext (fl4health takes the real "
    "part of complex drifts and |z| as their scores); keep complex entries out of the selection"
)


def layer_error(
    what: str, names: Sequence[str], xs: Sequence[Tensor], i: int, fault: Fault, y: Tensor | None
) -> Exception:
    """The error naming layer ``names[i]`` and what was found there, for the public function ``what``."""
    x = xs[i]
    template = _LAYER_MESSAGES[fault]
    if fault == "dtype" and x.dtype == torch.bool:
        template = _BOOL_MESSAGE
    elif fault == "dtype" and x.dtype.is_complex:
        template = _COMPLEX_MESSAGE
    shapes = {"x_shape": tuple(x.shape), "y_shape": tuple(y.shape) if y is not None else None}
    message = template.format(what=what, name=names[i], first=names[0], x=x, y=y, device=xs[0].device, **shapes)
    return _ERROR_TYPE[fault](message)


def explain_failure(
    exc: Exception,
    names: Sequence[str],
    xs: Sequence[Tensor],
    ys: Sequence[Tensor] | None,
    what: str,
    *,
    given: bool = False,
) -> NoReturn:
    """A kernel (or the twin) refused the call: find the entry it refused by the checks above (only on
    this error path) and raise the error naming its layer; re-raise the kernel's own error when no
    entry explains it. ``given``: ``ys`` are custom scores (``entry_fault``). Never returns."""
    if len(xs):
        device = xs[0].device
        for i, x in enumerate(xs):
            y = ys[i] if ys is not None else None
            fault = entry_fault(x, y, device, given=given)
            if fault is not None:
                raise layer_error(what, names, xs, i, fault, y)
    raise exc
