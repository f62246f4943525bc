"""The suite collects as one run: pytest imports test files by basename (rootdir-relative
packages are not used here), so two test files with one name break collection of the
whole suite while each tier still passes alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_file_has_a_unique_basename() -> None:
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
