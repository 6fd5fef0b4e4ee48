"""Every test file has a tier, and every tier key names a test that exists (tests/conftest.py, TIERS)."""

from __future__ import annotations

import ast

from conftest import TESTS, TIERS, tier_of


def test_every_test_file_has_a_tier() -> None:
    files = sorted(p.name for p in TESTS.glob("test_*.py"))
    assert [f for f in files if f not in TIERS] == []


def test_every_tier_key_names_an_existing_test() -> None:
    for key, tier in TIERS.items():
        assert tier in ("fast", "full"), key
        file, _, prefix = key.partition("::")
        path = TESTS / file
        assert path.is_file(), key
        if prefix:
            names = [n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)]
            function = prefix.split("[", 1)[0].split("*", 1)[0]
            assert any(name.startswith(function) for name in names), f"{key}: no test function starts so"


def test_the_longest_key_wins() -> None:
    assert tier_of("test_ops.py::test_opcheck_every_op") == "fast"
    assert tier_of("test_ops.py::test_sample_masks_every_cpu_isa_gives_the_same_bits[avx2]") == "full"
    assert tier_of("test_sharded.py::test_no_dtensor_import") == "full"
    assert tier_of("test_nothing.py::test_x") is None
    assert (
        tier_of("test_sparse_coo.py::test_matches_fl4health_exchanger[compiled-largest_final_magnitude_scores-True-1]")
        == "full"
    )
    assert (
        tier_of("test_sparse_coo.py::test_matches_fl4health_exchanger[compiled-largest_final_magnitude_scores-True-0]")
        == "fast"
    )
