"""Loads the compiled kernels, or explains why not and falls back to pure torch.

Importing layersel_ext never fails because of the compiled module: when it is missing or was
built for another torch, a single warning says what it was built for and what is installed.
``LAYERSEL_BACKEND=torch`` forces the pure-torch backend; ``LAYERSEL_BACKEND=compiled`` makes a
missing compiled module an ImportError instead of a warning; unset or empty means ``auto``.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

# setup.py writes one record per interpreter ABI, beside the _C.<abi>.so it describes
# (_build_record.cpython-311-x86_64-linux-gnu.json); _build_record.json is the older, single name.
_ABI = importlib.machinery.EXTENSION_SUFFIXES[0].rsplit(".", 1)[0]  # .cpython-311-x86_64-linux-gnu
_RECORD_PATH = Path(__file__).with_name(f"_build_record{_ABI}.json")
_LEGACY_RECORD_PATH = Path(__file__).with_name("_build_record.json")
OPS = (
    "drift_sq_norms",
    "scores",
    "sample_masks",
    "sample_mask_bits",
    "score_fingerprint",
    "kth_largest_score",
    "sparse_extract",
    "sparse_select",
)


def build_record() -> dict[str, Any]:
    """The record setup.py wrote for this interpreter (versions, CUDA on/off and why, arch list), or {}."""
    try:
        return dict(json.loads(_RECORD_PATH.read_text()))
    except (OSError, ValueError):
        pass
    try:  # a build from before the per-ABI name, if it was made for this Python
        legacy = dict(json.loads(_LEGACY_RECORD_PATH.read_text()))
    except (OSError, ValueError):
        return {}
    same_python = str(legacy.get("python", "")).split(".")[:2] == list(platform.python_version_tuple()[:2])
    return legacy if same_python else {}


def _load() -> tuple[ModuleType | None, str]:
    forced = os.environ.get("LAYERSEL_BACKEND", "").strip().lower() or "auto"  # set but empty: auto
    if forced not in ("auto", "torch", "compiled"):
        raise ImportError(f"LAYERSEL_BACKEND must be 'auto', 'torch' or 'compiled', got {forced!r}")
    if forced == "torch":
        return None, "LAYERSEL_BACKEND=torch"
    try:
        from layersel_ext import _C  # registers torch.ops.layersel.* as a side effect
    except (ImportError, OSError) as exc:
        built_for = build_record().get("torch_version", "unknown (no build record)")
        reason = (
            f"compiled kernels unavailable ({type(exc).__name__}: {exc}); built for torch {built_for}, "
            f"installed torch {torch.__version__}"
        )
        if forced == "compiled":
            raise ImportError(f"LAYERSEL_BACKEND=compiled but {reason}") from exc
        warnings.warn(f"layersel_ext: {reason}; using the pure-torch backend", RuntimeWarning, stacklevel=3)
        return None, reason
    return _C, "compiled module loaded"


COMPILED, LOAD_REASON = _load()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.layersel.<op> has a compiled kernel for ``dispatch_key`` ('CPU', 'CUDA')."""
    if COMPILED is None:
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"layersel::{op}", dispatch_key))
