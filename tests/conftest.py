from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import layersel_ext
from layersel_ext import ops

BACKENDS = ["compiled", "torch"]
TESTS = Path(__file__).resolve().parent

# The test tiers, in this one place. `./dev.sh test` runs the fast tier (`-m fast`): every public
# function against fl4health on every backend (one seed of each sweep), opcheck on every op, the
# hostile inputs and the wire round trips, in about a minute. `./dev.sh test --all` (and CI, on both
# stacks) runs both. A key is a test file, or a node-id prefix within one that overrides its file's
# tier (the longest matching key wins; a prefix may reach into the parameters, with '*' for any run
# of characters: '...[torch' for the pure-torch backend, '...[*-1]' for the second seed). A test file
# missing here fails the collection, and a fast-tier test checks that every file is listed.
TIERS: dict[str, str] = {
    "test_bench_runner.py": "fast",
    "test_bounded_decoding.py": "fast",
    "test_build_decisions.py": "fast",
    "test_build_decisions.py::test_setup_py": "full",  # runs setup.py
    "test_build_decisions.py::test_error_messages_with_numbers_do_not_crash": "full",  # subprocess
    "test_build_decisions.py::test_empty_backend_switch_is_auto": "full",  # subprocesses
    "test_doc_tables.py": "fast",
    "test_errors_and_loading.py": "fast",
    "test_fast_paths.py": "fast",
    "test_federated_rounds.py": "full",  # real Flower federations on 127.0.0.1
    "test_first_hour.py": "fast",
    "test_first_hour.py::test_first_hour_in": "full",  # a fresh venv, fl4health 0.4.2 and a build
    "test_fl4health_patch.py": "fast",
    "test_hostile_inputs.py": "fast",
    "test_hostile_inputs.py::test_sparse_selection_survives_a_racing": "full",  # subprocess races
    "test_hostile_inputs.py::test_scores_survive_a_thread_swapping": "full",
    "test_hostile_inputs.py::test_ops_wrappers_compile_with_fullgraph": "full",  # torch.compile
    "test_hostile_inputs.py::test_each_op_compiles_with_fullgraph": "full",
    "test_hostile_inputs.py::test_public_score_function_compiles_with_fullgraph": "full",
    "test_mask_independence.py": "fast",
    "test_mask_independence.py::test_compiled_fingerprint_key_equals_the_torch_twin[dtype": "full",
    "test_mask_independence.py::test_compiled_fingerprint_key_equals_the_torch_twin[dtype0]": "fast",
    "test_masks.py": "fast",
    "test_module_structure.py": "fast",
    "test_ops.py": "fast",
    "test_ops.py::test_sample_masks_every_cpu_isa_gives_the_same_bits": "full",  # a subprocess per ISA
    "test_ops.py::test_sample_masks_counters_give_the_unsharded_masks[torch": "full",
    "test_parity_fl4health.py": "fast",
    "test_parity_fl4health.py::test_layer_selection_matches[*-1-": "full",  # seeds 1 and 2
    "test_parity_fl4health.py::test_layer_selection_matches[*-2-": "full",
    "test_sharded.py": "full",  # spawned gloo ranks
    "test_sparse_coo.py": "fast",
    # fl4health's sort-based selection on every score function: the compiled backend stays fast
    "test_sparse_coo.py::test_matches_fl4health_exchanger[torch": "full",
    "test_sparse_coo.py::test_matches_fl4health_exchanger[*-1]": "full",  # the second seed
    "test_sparse_coo.py::test_kth_largest_sample_select_path": "full",
    "test_sparse_coo.py::test_sparse_select_equals_kth_then_extract": "full",
    "test_sync_budget.py": "fast",
    "test_tiers.py": "fast",
    "test_wire.py": "fast",
    "test_wire.py::test_sample_mask_bits_are_the_packed_masks[torch": "full",
    "test_wire_coo.py": "fast",
    "test_wire_coded.py": "fast",
    "test_wire_coded.py::test_the_prior_is_the_same_on_every_cpu_isa": "full",  # a subprocess per ISA
    "test_wire_coo.py::test_fuzzed_streams": "full",  # thousands of mutated streams
}
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


def _key_matches(key: str, nodeid: str) -> bool:
    """A key is a prefix of the node id; '*' in it stands for any run of characters."""
    if "::" not in key:
        key += "::"
    return re.match(".*".join(map(re.escape, key.split("*"))), nodeid) is not None


def tier_of(nodeid: str) -> str | None:
    """The tier of a test (its node id relative to tests/, e.g. 'test_ops.py::test_x[cpu]'), or None."""
    keys = [key for key in TIERS if _key_matches(key, nodeid)]
    return TIERS[max(keys, key=len)] if keys else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tier markers `fast` / `full` from TIERS, and the `cuda` marker (all declared in
    pyproject.toml) on every test that runs on a CUDA device: a `cuda` parametrisation (the `device`
    fixture), 'cuda' in its name, or a skip without CUDA. So `-m cuda` runs the GPU tests alone (the
    GPU runbook), `-m "not cuda"` leaves them out."""
    untiered = set()
    for item in items:
        nodeid = Path(str(item.fspath)).relative_to(TESTS).as_posix() + "::" + item.nodeid.split("::", 1)[1]
        tier = tier_of(nodeid)
        if tier is None:
            untiered.add(nodeid.split("::", 1)[0])
        else:
            item.add_marker(getattr(pytest.mark, tier))
        if _involves_cuda(item):
            item.add_marker(pytest.mark.cuda)
    if untiered:
        raise pytest.UsageError(f"test files without a tier in tests/conftest.py's TIERS: {sorted(untiered)}")
