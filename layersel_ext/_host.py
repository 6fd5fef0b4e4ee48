"""Tensors to the host as numpy arrays, the way the public functions return them.

CPU tensors become arrays without a copy (``_C.numpy_all``: one C++ call for all of them, or
``t.numpy()``); CUDA tensors come over in one batched transfer into pinned memory and one sync,
never one copy and one sync per tensor. ``widened_on_host`` brings a device's uint8 masks over and
widens them on the host (one byte a mask on the bus).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from . import ops

NDArrays = list[NDArray[Any]]


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (what ``.numpy()`` gives its tensors)."""
    return torch.empty(0, dtype=dtype).numpy().dtype


def to_numpy(names: list[str], tensors: Sequence[Tensor]) -> NDArrays:
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
    return batched_device_to_host(tensors)


def batched_device_to_host(tensors: list[Tensor]) -> NDArrays:
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
        group = host_np[offset : offset + nbytes].view(numpy_dtype(dtype))
        start = 0
        for i in members:
            out[i] = group[start : start + numels[i]].reshape(tensors[i].shape)
            start += numels[i]
    return out


def widened_on_host(flat: Tensor, dtype: torch.dtype) -> Tensor:
    """A CUDA uint8 tensor on the host in ``dtype``: one D2H transfer of its bytes, widened there."""
    host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    torch.cuda.current_stream(flat.device).synchronize()
    # Widened into pinned memory too: the caching host allocator hands back pages that are
    # already mapped, where a fresh 200 MB int64 array costs its page faults (8 of the 15 ms
    # FedPM spent here on an H200); the copy itself runs on every core.
    wide = torch.empty(flat.numel(), dtype=dtype, pin_memory=True)
    return wide.copy_(host)


def from_numpy(a: np.ndarray) -> Tensor:
    """A CPU tensor on the array's memory, read-only arrays too (without torch's warning): for the
    codecs, which only read what a peer sent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(a)


def contiguous_tensor(a: np.ndarray) -> Tensor:
    """``from_numpy`` of the array, copied first only when it is not contiguous: the compiled codecs
    read contiguous memory, and a caller's array may be a strided view."""
    return from_numpy(np.ascontiguousarray(a))
