"""FedPM's masks: the masked layers' scores, the seed and mask dtype rules, and the sampling step.

``sample_flat_masks`` is the one sampling step behind ``select_scores_and_sample_masks`` and the
compact wire packer (``wire.sample_masks_packed``): it finds the score tensors in fl4health's order,
checks the arguments, draws or takes the key, and samples every mask in one op (``ops.sample_masks``
or, into the bitmap, ``ops.sample_mask_bits``; sharded scores through ``_sharded_masks``).
``mask_arrays`` splits the flat masks into one numpy array per score tensor.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import Tensor, nn

from . import _sharded_masks, ops
from ._bits import pack_bits
from ._host import NDArrays, widened_on_host
from ._shard_layout import has_dtensor


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


def mask_torch_dtype(mask_dtype: MaskDtype) -> torch.dtype:
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
    dtype = mask_torch_dtype(dtype)
    checked_seed = None if seed is None else _check_seed(seed)  # before any work
    names, scores = masked_score_tensors(model)
    if not scores:
        return [], [], None
    sharded = has_dtensor(scores)
    # Sharded scores: the sharded sampler checks the dtypes once the ranks agree (no rank raises alone).
    for name, s in zip(names, scores) if not sharded else ():
        if not s.is_floating_point():
            raise TypeError(f"layer {name!r}: score dtype {s.dtype} is not floating point")
        if s.device != scores[0].device:
            raise ValueError(f"layer {name!r}: on {s.device} but {names[0]!r} is on {scores[0].device}")
    key = _draw_seed(generator) if checked_seed is None else checked_seed
    if scores[0].device.type == "cuda":
        dtype = torch.uint8
    if sharded:  # each rank samples its pieces; the masks are gathered, not the scores
        what = "select_scores_and_sample_masks"
        flat = _sharded_masks.sample_masks(names, scores, key, key_by_scores=seed is None, what=what)
        return names, scores, pack_bits(flat) if packed else flat.to(dtype)
    if packed:
        return names, scores, ops.sample_mask_bits(scores, key, key_by_scores=seed is None)
    return names, scores, ops.sample_masks(scores, key, dtype, key_by_scores=seed is None)


def mask_arrays(scores: list[Tensor], flat: Tensor, mask_dtype: MaskDtype) -> NDArrays:
    """The flat masks of ``sample_flat_masks`` as one numpy array per score tensor, in its shape, in
    ``mask_dtype`` (CUDA masks: uint8 over the bus, widened on the host)."""
    if flat.device.type == "cuda":
        flat = widened_on_host(flat, mask_torch_dtype(mask_dtype))  # dtype checked by sample_flat_masks
    masks, start = [], 0
    for s in scores:
        masks.append(flat[start : start + s.numel()].view(s.shape).numpy())
        start += s.numel()
    return masks
