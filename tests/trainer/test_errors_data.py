"""Data errors name the file, the row within that file and the field (issue 22, defect 2):
a folder's files are read in name order and concatenated, and a bad row is reported in
its own file, not by its number across all of them. Real `datasets` loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sftjob_operator.api import DatasetSource
from sftjob_trainer.data import prepare_dataset
from sftjob_trainer.failures import DataError


def chat(user: str = "hi", assistant: str = "hello") -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    }


def lines_of(rows: list[Any]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def data_error(path: Path) -> str:
    with pytest.raises(DataError) as caught:
        prepare_dataset(DatasetSource(path=str(path)))
    return str(caught.value)


def test_a_bad_row_in_the_second_file_is_named_in_that_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(lines_of([chat() for _ in range(8)]))
    second = [chat() for _ in range(5)]
    second[2] = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}
    (folder / "b.jsonl").write_text(lines_of(second))

    message = data_error(folder)
    assert "b.jsonl row 3: messages[1].role is 'bot'" in message, message
    assert "row 11" not in message


def test_a_blank_line_makes_the_line_differ_from_the_row(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(lines_of([chat()] * 3))
    # Blank lines are skipped: the bad row is the 2nd row but on line 4.
    (folder / "b.jsonl").write_text(lines_of([chat()]) + "\n\n" + lines_of([chat(assistant="  ")]))
    message = data_error(folder)
    assert "b.jsonl row 2 (line 4): messages[1].content is empty" in message, message


def test_parquet_files_are_counted_per_file(tmp_path):
    import datasets

    folder = tmp_path / "parquet"
    folder.mkdir()
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(7)]
    rows[5]["completion"] = ""
    data = datasets.Dataset.from_list(rows)
    data.select(range(4)).to_parquet(str(folder / "a.parquet"))
    data.select(range(4, 7)).to_parquet(str(folder / "b.parquet"))
    assert "b.parquet row 2: completion is empty" in data_error(folder)


def test_rows_arrow_cannot_load_are_named_in_their_file(tmp_path):
    # Types that disagree across files: Arrow refuses the folder without naming a row.
    folder = tmp_path / "clash"
    folder.mkdir()
    (folder / "a.jsonl").write_text(lines_of([chat()] * 4))
    (folder / "b.jsonl").write_text(lines_of([chat(), {"messages": "not a list"}]))
    message = data_error(folder)
    assert "b.jsonl row 2: messages must be a list of messages, got str" in message, message


def test_one_file_is_named_too(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(lines_of([chat(), {"messages": [{"role": "user", "content": "hi"}]}]))
    message = data_error(path)
    assert f"{path} row 2: messages has no assistant message" in message, message


def test_a_csv_with_a_latin1_byte_names_its_line(tmp_path):
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "a.csv").write_bytes(b"text\nfirst row\n")
    (folder / "b.csv").write_bytes(b"text\nfine\ncaf\xe9 au lait\n")
    message = data_error(folder)
    assert "b.csv line 3 is not UTF-8 text (byte 0xe9 at column 4)" in message, message
