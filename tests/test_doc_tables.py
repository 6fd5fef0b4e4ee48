"""The benchmark tables in README.md and docs/ are those that ``python -m benchmarks.tables`` writes
from the committed results files: a results file changed without regenerating the docs fails here."""

from __future__ import annotations

import pytest

from benchmarks import tables


def test_doc_tables_match_the_results_files(capsys: pytest.CaptureFixture[str]) -> None:
    rc = tables.main(["--check"])
    assert rc == 0, capsys.readouterr().err


def test_every_marked_block_names_a_known_table() -> None:
    for path in tables.documents():
        if path.exists():
            tables.render(path)  # raises SystemExit on an unknown name or an unclosed block
