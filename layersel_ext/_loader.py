"""Loads the compiled kernels, or explains why not and falls back to pure torch.

Importing layersel_ext never fails because of the compiled module, and never degrades silently: when
it is missing or was built for another torch, one warning line says why, what it was built for and
what is installed. Imported from a source tree without a build (running from a clone after
``pip install .``), it uses the installed build and says so in ``LOAD_REASON`` (``info`` prints it).
``LAYERSEL_BACKEND=torch`` forces the pure-torch backend; ``LAYERSEL_BACKEND=compiled`` makes a
missing compiled module an ImportError instead of a warning; unset or empty means ``auto``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

# setup.py writes one record per interpreter ABI, beside the _C.<abi>.so it describes
# (_build_record.cpython-311-x86_64-linux-gnu.json); _build_record.json is the older, single name.
_SO_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # .cpython-311-x86_64-linux-gnu.so
_ABI = _SO_SUFFIX.rsplit(".", 1)[0]  # .cpython-311-x86_64-linux-gnu
_PACKAGE_DIR = Path(__file__).resolve().parent
_RECORD_PATH = _PACKAGE_DIR / f"_build_record{_ABI}.json"
_LEGACY_RECORD_PATH = _PACKAGE_DIR / "_build_record.json"
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


def _read_record(folder: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((folder / _RECORD_PATH.name).read_text()))
    except (OSError, ValueError):
        pass
    try:  # a build from before the per-ABI name, if it was made for this Python
        legacy = dict(json.loads((folder / _LEGACY_RECORD_PATH.name).read_text()))
    except (OSError, ValueError):
        return {}
    same_python = str(legacy.get("python", "")).split(".")[:2] == list(platform.python_version_tuple()[:2])
    return legacy if same_python else {}


def build_record() -> dict[str, Any]:
    """The record setup.py wrote beside the compiled module in use (versions, CUDA on/off and why, arch
    list), else beside this package's sources; {} when there is none."""
    return _read_record(_BUILD_DIR)


def _installed_build_elsewhere() -> Path | None:
    """Another ``layersel_ext`` folder on sys.path that holds a build for this interpreter.

    Running from a clone after ``pip install .`` imports the clone's sources (the current folder comes
    first on sys.path), which hold no build: the installed package's compiled module is the one the
    user built, so it is found and used rather than silently running the pure-torch backend.
    """
    for entry in sys.path:
        folder = Path(entry or ".").resolve() / "layersel_ext"
        if folder != _PACKAGE_DIR and (folder / f"_C{_SO_SUFFIX}").is_file():
            return folder
    return None


def _import_compiled(folder: Path) -> ModuleType:
    if folder == _PACKAGE_DIR:
        from layersel_ext import _C  # registers torch.ops.layersel.* as a side effect

        return _C
    spec = importlib.util.spec_from_file_location("layersel_ext._C", folder / f"_C{_SO_SUFFIX}")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["layersel_ext._C"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["layersel_ext._C"]
        raise
    return module


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _load() -> tuple[ModuleType | None, str, Path]:
    forced = os.environ.get("LAYERSEL_BACKEND", "").strip().lower() or "auto"  # set but empty: auto
    if forced not in ("auto", "torch", "compiled"):
        raise ImportError(f"LAYERSEL_BACKEND must be 'auto', 'torch' or 'compiled', got {forced!r}")
    if forced == "torch":
        return None, "LAYERSEL_BACKEND=torch", _PACKAGE_DIR
    folder, note, missing = _PACKAGE_DIR, "", False
    blocked = "layersel_ext._C" in sys.modules and sys.modules["layersel_ext._C"] is None  # tests block it so
    if not blocked and not (_PACKAGE_DIR / f"_C{_SO_SUFFIX}").is_file():
        elsewhere = _installed_build_elsewhere()
        if elsewhere is None:
            missing = True
        else:
            folder = elsewhere
            note = f" from the installed build in {elsewhere} (the source tree {_PACKAGE_DIR} has no build of its own)"
    try:
        if missing:
            raise ImportError(
                f"no compiled module for this Python: {folder / f'_C{_SO_SUFFIX}'} does not exist and no "
                "other layersel_ext on sys.path has one; build it: pip install -v --no-build-isolation ."
            )
        module = _import_compiled(folder)
    except (ImportError, OSError) as exc:
        record = _read_record(folder)
        built_for = (
            f"built for torch {record['torch_version']} (Python {record.get('python', '?')})"
            if record.get("torch_version")
            else "no build record"
        )
        reason = _one_line(
            f"compiled kernels unavailable ({type(exc).__name__}: {exc}); {built_for}, "
            f"installed torch {torch.__version__} (Python {platform.python_version()})"
        )
        if forced == "compiled":
            raise ImportError(f"LAYERSEL_BACKEND=compiled but {reason}") from exc
        warnings.warn(f"layersel_ext: {reason}; using the slower pure-torch backend", RuntimeWarning, stacklevel=3)
        return None, reason, folder
    return module, f"compiled module loaded{note}", folder


COMPILED, LOAD_REASON, _BUILD_DIR = _load()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.layersel.<op> has a compiled kernel for ``dispatch_key`` ('CPU', 'CUDA')."""
    if COMPILED is None:
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"layersel::{op}", dispatch_key))
