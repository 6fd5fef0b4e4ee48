from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

import layersel_ext
from layersel_ext import ops

BACKENDS = ["compiled", "torch"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config: pytest.Config) -> None:
    # CI sets LAYERSEL_REQUIRE_COMPILED=1: a missing compiled module must fail, not skip.
    if os.environ.get("LAYERSEL_REQUIRE_COMPILED") == "1" and ops.backend() != "compiled":
        raise pytest.UsageError(
            f"LAYERSEL_REQUIRE_COMPILED=1 but the compiled module is not loaded: {layersel_ext.LOAD_REASON}"
        )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "compiled" and layersel_ext._loader.COMPILED is None:
        pytest.skip("compiled module not loaded")
    previous = ops.backend()
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(previous)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def fl4health_criteria():
    """The reference module; required when LAYERSEL_REQUIRE_ORACLE=1 (CI), else skipped if absent."""
    try:
        from fl4health.parameter_exchange import parameter_selection_criteria
    except ImportError as exc:
        if os.environ.get("LAYERSEL_REQUIRE_ORACLE") == "1":
            raise
        pytest.skip(f"fl4health not installed: {exc}")
    return parameter_selection_criteria


def fl4health_strategies():
    """fl4health's server strategies (they import opacus, which an oracle install without
    dependencies may lack): required when LAYERSEL_REQUIRE_ORACLE=1 (CI), else skipped if absent."""
    fl4health_criteria()
    try:
        import fl4health.strategies.fedavg_sparse_coo_tensor
        import fl4health.strategies.fedpm  # noqa: F401
    except ImportError as exc:
        if os.environ.get("LAYERSEL_REQUIRE_ORACLE") == "1":
            raise
        pytest.skip(f"fl4health's strategies cannot be imported: {exc}")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _involves_cuda(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(
        (isinstance(v, str) and v.startswith("cuda")) or (isinstance(v, torch.device) and v.type == "cuda")
        for v in callspec.params.values()
    ):
        return True
    if "cuda" in item.name.lower():
        return True
    # @requires_cuda and plain skipif(not torch.cuda.is_available(), ...) marks
    return any("cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The `cuda` marker (declared in pyproject.toml) on every test that runs on a CUDA device: a
    `cuda` parametrisation (the `device` fixture), 'cuda' in its name, or a skip without CUDA. So
    `-m cuda` runs the GPU tests alone (the GPU runbook), `-m "not cuda"` leaves them out."""
    for item in items:
        if _involves_cuda(item):
            item.add_marker(pytest.mark.cuda)
