"""Drop-in replacement for ``fl4health.parameter_exchange.parameter_selection_criteria``.

Same names, signatures, return types and answers as fl4health 0.4.2 (see README for the few
deliberate differences), computed by fused kernels: one pass over all layers, one device sync.
Change ``from fl4health.parameter_exchange.parameter_selection_criteria import X`` to
``from layersel_ext.parameter_selection_criteria import X``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from . import _bits, _sharded_masks, _sharded_scores, ops
from ._checks import explain_failure
from ._collectives import full_model_tensors
from ._model_state import paired_state, single_state
from ._score_kinds import ScoreKind, uses_initial
from ._shard_layout import ShardedState, has_dtensor, sharded_state

NDArrays = list[NDArray[Any]]
LayerSelectionFunction = Callable[[nn.Module, Optional[nn.Module]], tuple[NDArrays, list[str]]]

# The six score functions, in score-kind order (csrc/common/scores.h).
SCORE_FUNCTION_NAMES = (
    "largest_final_magnitude_scores",
    "smallest_final_magnitude_scores",
    "largest_magnitude_change_scores",
    "smallest_magnitude_change_scores",
    "largest_increase_in_magnitude_scores",
    "smallest_increase_in_magnitude_scores",
)

__all__ = [
    "SCORE_FUNCTION_NAMES",
    "LayerSelectionFunctionConstructor",
    "largest_final_magnitude_scores",
    "largest_increase_in_magnitude_scores",
    "largest_magnitude_change_scores",
    "layer_drift_norms",
    "select_layers_by_percentage",
    "select_layers_by_threshold",
    "select_scores_and_sample_masks",
    "smallest_final_magnitude_scores",
    "smallest_increase_in_magnitude_scores",
    "smallest_magnitude_change_scores",
]


class LayerSelectionFunctionConstructor:
    def __init__(
        self, norm_threshold: float, exchange_percentage: float, normalize: bool = True, select_drift_more: bool = True
    ) -> None:
        """
        This class leverages ``functools.partial`` to construct layer selection functions, which are meant to be used
        by the ``DynamicLayerExchanger`` class.

        Args:
            norm_threshold (float): A positive real number used to select those layers whose drift in l2 norm
                exceeds (or falls short of) it.
            exchange_percentage (float): Indicates the percentage of layers that are selected, in (0, 1].
            normalize (bool, optional): Indicates whether when calculating the norm of a layer, we also divide by the
                number of parameters in that layer. Defaults to True.
            select_drift_more (bool, optional): Indicates whether layers with larger drift norm are selected.
                Defaults to True.

        Raises:
            ValueError: ``exchange_percentage`` outside (0, 1] or ``norm_threshold`` <= 0 (fl4health: AssertionError).
        """
        if not 0 < exchange_percentage <= 1:
            raise ValueError(f"exchange_percentage must be in (0, 1], got {exchange_percentage}")
        if not norm_threshold > 0:
            raise ValueError(f"norm_threshold must be > 0, got {norm_threshold}")
        self.norm_threshold = norm_threshold
        self.exchange_percentage = exchange_percentage
        self.normalize = normalize
        self.select_drift_more = select_drift_more

    def select_by_threshold(self) -> LayerSelectionFunction:
        return partial(select_layers_by_threshold, self.norm_threshold, self.normalize, self.select_drift_more)

    def select_by_percentage(self) -> LayerSelectionFunction:
        return partial(select_layers_by_percentage, self.exchange_percentage, self.normalize, self.select_drift_more)


# ---------------------------------------------------------------------------------------------- drift norms


def _drift_norms(
    names: list[str],
    xs: Sequence[Tensor],
    ys: Sequence[Tensor],
    normalize: bool,
    what: str,
    sharded: ShardedState | None = None,
) -> list[float]:
    """fl4health's ``_calculate_drift_norm`` for every entry, from one fused op and one sync.

    The kernels sum the float32 squares in float64; the total is rounded to float32 before the
    square root (a total above the float32 maximum is inf, as in fl4health's float32 norm), the
    root taken in float32; a one-element entry gives |d|, as torch's norm of one element does.
    With ``normalize`` it is divided by numel in float32 the way torch does it on that device
    (CUDA multiplies by a float32 reciprocal). Sharded state: the same sums from the local shards
    and one all-reduce (``_sharded_scores``); numel is the global one.
    """
    if sharded is not None:
        sq = _sharded_scores.drift_sq_norms(sharded)
    else:
        try:
            sq = ops.drift_sq_norms(xs, ys).cpu().numpy()
        except (RuntimeError, ValueError, TypeError) as exc:
            explain_failure(exc, names, xs, ys, what)
    numel = np.array(ops.numels(xs), dtype=np.float32)
    with np.errstate(over="ignore"):
        norms = np.sqrt(sq.astype(np.float32))
    single = numel == 1  # torch's norm of one element is |d|: the root of the op's exact square
    norms[single] = np.sqrt(sq[single]).astype(np.float32)
    if normalize:
        with np.errstate(divide="ignore", invalid="ignore"):
            if xs[0].device.type == "cuda":
                norms = norms * (np.float32(1.0) / numel)
            else:
                norms = norms / numel
    return norms.astype(np.float64).tolist()


def layer_drift_norms(model: nn.Module, initial_model: nn.Module, normalize: bool = True) -> dict[str, float]:
    """
    Drift of every state_dict entry in one call (one fused pass, one device sync).

    Args:
        model (nn.Module): Model after training/modification.
        initial_model (nn.Module): Model that we started with.
        normalize (bool, optional): Divide each norm by the entry's number of elements. Defaults to True.

    Returns:
        (dict[str, float]): state_dict name -> the float fl4health's ``_calculate_drift_norm`` gives
        (the L2 norm of ``(t1 - t2).float()``, in float32, optionally divided by numel), in state_dict order.
    """
    what = "layer_drift_norms"
    names, xs, ys = paired_state(model, initial_model, what)
    return dict(zip(names, _drift_norms(names, xs, ys, normalize, what, sharded_state(names, xs, ys, what))))


def _to_numpy(names: list[str], tensors: Sequence[Tensor]) -> NDArrays:
    """``tensor.cpu().numpy()`` for each (CPU: zero copy); CUDA tensors come over in one batched transfer."""
    for name, dtype in zip(names, ops.dtypes(tensors)):
        if dtype == torch.bfloat16:
            raise TypeError(f"layer {name!r}: dtype torch.bfloat16 cannot become a numpy array (numpy has no bfloat16)")
    if not tensors or tensors[0].device.type != "cuda":
        helpers = ops.compiled_helpers()
        arrays = helpers.numpy_all(tensors) if helpers is not None else None  # CPU, no grad: one C++ call
        if arrays is not None:
            return arrays
        # state_items' tensors are detached already: no second detach (a dispatcher call each,
        # on a model of 1,000 small tensors a good part of the cost); cpu() stays for other devices
        return [(t.detach() if t.requires_grad else t).cpu().numpy() for t in tensors]
    return _batched_device_to_host(tensors)


def _batched_device_to_host(tensors: list[Tensor]) -> NDArrays:
    """CUDA tensors as numpy arrays, in one round trip: per dtype, ``torch.cat`` of the flattened
    tensors on the device (``flatten_dense_tensors``, DDP's, or ``_C.flatten_dense``, its twin
    without a view per tensor: a batched kernel, not one copy per tensor) and one D2H copy of it
    into its 64-byte aligned slice of one pinned buffer; one sync; each array is a numpy view of
    that buffer (numpy slicing, no torch op per tensor)."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}  # one device in practice
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    numels = [t.numel() for t in tensors]
    align, total, layout = 64, 0, []
    for (dtype, _), members in groups.items():
        nbytes = sum(numels[i] for i in members) * tensors[members[0]].element_size()
        layout.append((dtype, members, total, nbytes))
        total += -(-nbytes // align) * align
    host = torch.empty(max(total, align), dtype=torch.uint8, pin_memory=True)
    helpers = ops.compiled_helpers()
    # the same cat as torch's, without a dispatched view per tensor
    flatten = helpers.flatten_dense if helpers is not None else torch._C._nn.flatten_dense_tensors
    with torch.no_grad():
        for dtype, members, offset, nbytes in layout:
            if nbytes:
                flat = flatten([tensors[i] for i in members])  # no_grad: no detach
                host[offset : offset + nbytes].view(dtype).copy_(flat, non_blocking=True)
    for device in {device for _, device in groups if device.type == "cuda"}:
        torch.cuda.current_stream(device).synchronize()
    host_np = host.numpy()
    out: NDArrays = [None] * len(tensors)  # type: ignore[list-item]
    for dtype, members, offset, nbytes in layout:
        group = host_np[offset : offset + nbytes].view(_numpy_dtype(dtype))
        start = 0
        for i in members:
            out[i] = group[start : start + numels[i]].reshape(tensors[i].shape)
            start += numels[i]
    return out


def _selected_to_numpy(
    names: list[str], xs: Sequence[Tensor], keep: list[int], sharded: ShardedState | None
) -> tuple[NDArrays, list[str]]:
    """The kept layers as numpy arrays; sharded ones gathered to full size (one collective for all)."""
    kept_names = [names[i] for i in keep]
    kept = ops.take(xs, keep) if sharded is None else full_model_tensors(sharded, keep)
    return _to_numpy(kept_names, kept), kept_names


def select_layers_by_threshold(
    threshold: float,
    normalize: bool,
    select_drift_more: bool,
    model: nn.Module,
    initial_model: nn.Module,
) -> tuple[NDArrays, list[str]]:
    """
    Return those layers of model that deviate (in l2 norm) away from corresponding layers of
    ``initial_model`` by more than (or at most) ``threshold``.

    Args:
        threshold (float): Drift threshold to be used for selection. It is an fixed value.
        normalize (bool): Whether to divide the difference between the tensors by their number of elements.
        select_drift_more (bool): Whether we are selecting parameters that have drifted further (True) or less far
            from their comparison values
        model (nn.Module): Model after training/modification.
        initial_model (nn.Module): Model that we started with to which we are comparing parameters.

    Returns:
        (tuple[NDArrays, list[str]]): Layers selected by the process and their corresponding names in the model's
        ``state_dict``.
    """
    what = "select_layers_by_threshold"
    names, xs, ys = paired_state(model, initial_model, what)
    sharded = sharded_state(names, xs, ys, what)
    drifts = _drift_norms(names, xs, ys, normalize, what, sharded)
    if select_drift_more:
        keep = [i for i, d in enumerate(drifts) if d > threshold]
    else:
        keep = [i for i, d in enumerate(drifts) if d <= threshold]
    return _selected_to_numpy(names, xs, keep, sharded)


def select_layers_by_percentage(
    exchange_percentage: float,
    normalize: bool,
    select_drift_more: bool,
    model: nn.Module,
    initial_model: nn.Module,
) -> tuple[NDArrays, list[str]]:
    """
    Return the ``ceil(n * exchange_percentage)`` layers of model that drifted most (or least) from
    ``initial_model``; ties keep state_dict order (a stable sort, as fl4health's).

    Returns:
        (tuple[NDArrays, list[str]]): Layers selected by the process and their corresponding names in the model's
        ``state_dict``.
    """
    what = "select_layers_by_percentage"
    names, xs, ys = paired_state(model, initial_model, what)
    sharded = sharded_state(names, xs, ys, what)
    drifts = _drift_norms(names, xs, ys, normalize, what, sharded)
    count = math.ceil(len(names) * exchange_percentage)
    order = sorted(range(len(names)), key=lambda i: drifts[i], reverse=select_drift_more)[:count]
    return _selected_to_numpy(names, xs, order, sharded)


# ---------------------------------------------------------------------------------------------- scores


def _score_dict(kind: int, model: nn.Module, initial_model: nn.Module | None, what: str) -> dict[str, Tensor]:
    if uses_initial(kind):
        names, xs, y_list = paired_state(model, initial_model, what)
        ys: list[Tensor] | None = y_list
    else:
        (names, xs), ys = single_state(model, what), None
    if has_dtensor(xs, ys):  # a DTensor entry gives a DTensor of local-shard scores
        return dict(zip(names, _sharded_scores.scores(names, xs, ys, kind, what)))
    try:
        return dict(zip(names, ops.scores(xs, ys, kind)))
    except (RuntimeError, ValueError, TypeError) as exc:
        explain_failure(exc, names, xs, ys, what)


def largest_final_magnitude_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, Tensor]:
    """``|x|`` for every state_dict entry (``initial_model`` may be None)."""
    return _score_dict(ScoreKind.LARGEST_FINAL_MAGNITUDE, model, initial_model, "largest_final_magnitude_scores")


def smallest_final_magnitude_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, Tensor]:
    """``-|x|`` for every state_dict entry (``initial_model`` may be None)."""
    return _score_dict(ScoreKind.SMALLEST_FINAL_MAGNITUDE, model, initial_model, "smallest_final_magnitude_scores")


def largest_magnitude_change_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, Tensor]:
    """``|x - x0|`` for every state_dict entry."""
    return _score_dict(ScoreKind.LARGEST_MAGNITUDE_CHANGE, model, initial_model, "largest_magnitude_change_scores")


def smallest_magnitude_change_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, Tensor]:
    """``-|x - x0|`` for every state_dict entry."""
    return _score_dict(ScoreKind.SMALLEST_MAGNITUDE_CHANGE, model, initial_model, "smallest_magnitude_change_scores")


def largest_increase_in_magnitude_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, Tensor]:
    """``|x| - |x0|`` for every state_dict entry."""
    return _score_dict(
        ScoreKind.LARGEST_INCREASE_IN_MAGNITUDE, model, initial_model, "largest_increase_in_magnitude_scores"
    )


def smallest_increase_in_magnitude_scores(model: nn.Module, initial_model: nn.Module | None) -> dict[str, Tensor]:
    """``-(|x| - |x0|)`` for every state_dict entry."""
    return _score_dict(
        ScoreKind.SMALLEST_INCREASE_IN_MAGNITUDE, model, initial_model, "smallest_increase_in_magnitude_scores"
    )


# ---------------------------------------------------------------------------------------------- FedPM masks


def is_masked_module(module: nn.Module) -> bool:
    """A masked layer (fl4health's ``Masked*`` classes) recognised by structure: it owns ``weight_scores``."""
    return "weight_scores" in module._parameters


def masked_score_tensors(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of every score parameter, in fl4health's order (names as in model.state_dict())."""
    if is_masked_module(model):
        modules = [("", model)]
    else:
        modules = [(name, m) for name, m in model.named_modules() if is_masked_module(m)]
    names, tensors = [], []
    for prefix, module in modules:
        for attr in ("weight_scores", "bias_scores"):
            t = module._parameters.get(attr)
            if t is not None:  # fl4health: KeyError on a masked layer without weight scores
                names.append(f"{prefix}.{attr}" if prefix else attr)
                tensors.append(t.detach())  # holds the storage even if another thread swaps .data
    return names, tensors


def _draw_seed(generator: torch.Generator | None) -> int:
    # From torch's (CPU) default generator unless one is given: torch.manual_seed reproduces a
    # round, and each call advances the generator, so successive calls use fresh streams.
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64).item())


def _check_seed(seed: object) -> int:
    # An integer, exactly: 1.7, "12" or True would be coerced silently by int().
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer in [0, 2**64), got {seed!r} ({type(seed).__name__})")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)


MaskDtype = Union[torch.dtype, type, np.dtype, str]


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (what ``.numpy()`` gives its tensors)."""
    return torch.empty(0, dtype=dtype).numpy().dtype


def _mask_torch_dtype(mask_dtype: MaskDtype) -> torch.dtype:
    if mask_dtype is None:  # np.dtype(None) would be float64
        raise TypeError("mask_dtype must be an integer dtype, got None")
    if isinstance(mask_dtype, torch.dtype):
        dt = mask_dtype
    else:
        np_dt = np.dtype(mask_dtype)
        if np_dt == np.bool_:
            dt = torch.bool
        else:
            dt = torch.from_numpy(np.zeros(0, dtype=np_dt)).dtype
    if dt == torch.bool:
        raise TypeError("mask_dtype bool is refused: the server sums masks (np.add), and bool turns the sum into OR")
    if dt.is_floating_point or dt.is_complex:
        raise TypeError(f"mask_dtype must be an integer dtype, got {dt}")
    return dt


def sample_flat_masks(
    model: nn.Module,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    dtype: MaskDtype = torch.uint8,
    packed: bool = False,
) -> tuple[list[str], list[Tensor], Tensor | None]:
    """The masks of every score tensor, flattened and concatenated in fl4health's order, as one
    tensor on the scores' device (``None`` when the model has no scores): ``dtype`` on the CPU,
    uint8 on CUDA (one byte per element on the device; callers widen after the transfer); with
    ``packed``, as the bitmap ``ops.sample_mask_bits`` writes (``dtype`` is still checked). The sampling
    step that ``select_scores_and_sample_masks`` and the compact wire packer (``wire.py``) share.
    Checks the arguments (seed and generator, then the mask dtype, then the seed's value) and the
    scores; the key rules are ``select_scores_and_sample_masks``'s."""
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    dtype = _mask_torch_dtype(dtype)
    checked_seed = None if seed is None else _check_seed(seed)  # before any work
    names, scores = masked_score_tensors(model)
    if not scores:
        return [], [], None
    for name, s in zip(names, scores):
        if not s.is_floating_point():
            raise TypeError(f"layer {name!r}: score dtype {s.dtype} is not floating point")
        if s.device != scores[0].device:
            raise ValueError(f"layer {name!r}: on {s.device} but {names[0]!r} is on {scores[0].device}")
    key = _draw_seed(generator) if checked_seed is None else checked_seed
    if scores[0].device.type == "cuda":
        dtype = torch.uint8
    if has_dtensor(scores):  # each rank samples its pieces; the masks are gathered, not the scores
        what = "select_scores_and_sample_masks"
        flat = _sharded_masks.sample_masks(names, scores, key, key_by_scores=seed is None, what=what)
        return names, scores, _bits.pack_bits(flat) if packed else flat.to(dtype)
    if packed:
        return names, scores, ops.sample_mask_bits(scores, key, key_by_scores=seed is None)
    return names, scores, ops.sample_masks(scores, key, dtype, key_by_scores=seed is None)


def select_scores_and_sample_masks(
    model: nn.Module,
    initial_model: nn.Module | None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    mask_dtype: MaskDtype = np.int64,
) -> tuple[NDArrays, list[str]]:
    """
    Selection function that first selects the ``weight_scores`` and ``bias_scores`` parameters for the masked layers,
    and then samples binary masks based on those scores to send to the server. This function is meant to be used for
    the FedPM algorithm.

    Args:
        model (nn.Module): The model (a masked layer itself, or a model containing masked layers).
        initial_model (nn.Module | None): Unused (FedPM passes None).
        seed (int, optional): Philox key; the same seed gives the same masks on CPU and CUDA.
        generator (torch.Generator, optional): Where to draw a seed from when ``seed`` is None
            (default: torch's default generator, so ``torch.manual_seed`` reproduces a round). The
            key is then derived from that draw and a fingerprint of the scores, so that clients
            seeded alike (fl4health's examples seed every client with 42) but holding different
            scores sample independent masks.
        mask_dtype (optional): Integer dtype of the masks (numpy or torch). Defaults to int64, as fl4health.

    Returns:
        (tuple[NDArrays, list[str]]): One 0/1 mask per score tensor, with the score's exact shape, and its
        state_dict name.
    """
    names, scores, flat = sample_flat_masks(model, seed=seed, generator=generator, dtype=mask_dtype)
    if flat is None:
        return [], []
    if flat.device.type == "cuda":  # uint8: one D2H transfer, widened on the host
        host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(flat.device).synchronize()
        # Widened into pinned memory too: the caching host allocator hands back pages that are
        # already mapped, where a fresh 200 MB int64 array costs its page faults (8 of the 15 ms
        # FedPM spent here on an H200); the copy itself runs on every core.
        wide = torch.empty(flat.numel(), dtype=_mask_torch_dtype(mask_dtype), pin_memory=True)
        flat = wide.copy_(host)  # dtype checked by sample_flat_masks
    masks, start = [], 0
    for s in scores:
        masks.append(flat[start : start + s.numel()].view(s.shape).numpy())
        start += s.numel()
    return masks, names
