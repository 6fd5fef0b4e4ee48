"""The benchmark runner's own judgement: unstable and busy rows are flagged, a quick run on a busy
machine withholds its ratios, and the columns are explained."""

from __future__ import annotations

import pytest

run = pytest.importorskip("layersel_ext.bench.run")  # psutil, the runner's own requirement


def row(**extra: float) -> dict:
    r = {"model": "m", "criterion": "c", "fl4health_ms": 8.0, "ours_compiled_ms": 1.0, "floor_ms": 0.5,
         "speedup_vs_fl4health": 8.0, "pct_of_floor": 50.0, "below_floor": False, "busy": False,
         "other_cpu_cores": 0.1, "fl4health_spread": 1.1, "ours_compiled_spread": 1.2}  # fmt: skip
    r.update(extra)
    r["flags"] = run.flags(r)
    return r


def test_a_column_whose_runs_disagree_is_flagged_unstable() -> None:
    assert row()["flags"] == []
    flagged = row(ours_compiled_spread=3.0)["flags"]
    assert flagged == ["unstable (ours_compiled runs 3.0x apart)"]
    assert row(busy=True, other_cpu_cores=1.6)["flags"] == ["busy (1.6 other cores)"]


def test_time_it_reports_the_spread_of_its_runs() -> None:
    median, _, out, spread = run.time_it(lambda: 42, "cpu", 3)
    assert out == 42 and median >= 0 and spread >= 1.0


def test_withheld_ratios_print_rerun() -> None:
    rows = [row(), row(ours_compiled_spread=3.0)]
    assert "8.0×" in run.markdown(rows).splitlines()[3]
    flagged = run.markdown(rows, "flagged").splitlines()
    assert "8.0×" in flagged[2] and "rerun" not in flagged[2]
    assert "rerun" in flagged[3] and "8.0×" not in flagged[3]
    assert all("rerun" in line for line in run.markdown(rows, "all").splitlines()[2:])


def test_help_explains_every_column() -> None:
    for column in ("ours_torch", "plain_torch", "floor", "% floor", "equal", "busy", "unstable"):
        assert column in run.COLUMNS
