"""Dataset loading, format detection and row validation (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sftjob_operator.api import DatasetSource
from sftjob_trainer.data import detect_format, prepare_dataset, row_problems
from sftjob_trainer.failures import ConfigError, DataError


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(user: str = "hi", assistant: str = "hello", role: str = "assistant") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": role, "content": assistant}]}


@pytest.mark.parametrize(
    ("name", "expected"),
    [("chat", "messages"), ("prompt-completion", "prompt-completion"), ("text", "text")],
)
def test_auto_detects_each_tiny_format(tiny, name, expected):
    dataset, fmt = prepare_dataset(DatasetSource(path=str(tiny.data[name]), limit=10))
    assert fmt == expected
    assert len(dataset) == 10


def test_declared_format_needs_its_columns():
    with pytest.raises(
        DataError, match="format is prompt-completion but the data has no column prompt"
    ):
        detect_format(["messages"], "prompt-completion")
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        detect_format(["question", "answer"], "auto")


def test_limit_larger_than_dataset_names_both_sizes(tiny):
    with pytest.raises(DataError) as err:
        prepare_dataset(DatasetSource(path=str(tiny.data["chat"]), limit=1000))
    assert "limit is 1000" in str(err.value) and "only 128 rows" in str(err.value)


def test_bad_role_is_named_with_its_row(tiny):
    with pytest.raises(DataError) as err:
        prepare_dataset(DatasetSource(path=str(tiny.data["malformed"])))
    assert "row 3: messages[1].role is 'bot'" in str(err.value)
    assert "1 of 6 rows" in str(err.value)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (chat(assistant="   "), "messages[1].content is empty"),
        ({"other": 1}, "messages is missing"),
        ({"messages": "hello"}, "messages must be a list of messages, got str"),
        (
            {"messages": [{"role": "user", "content": 3}]},
            "messages[0].content must be a string, got int",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ],
)
def test_row_problems_messages(row, problem):
    assert any(problem in p for p in row_problems(row, "messages")), row_problems(row, "messages")


def test_row_problems_prompt_completion_and_text():
    assert row_problems({"prompt": "a", "completion": ""}, "prompt-completion") == [
        "completion is empty"
    ]
    assert row_problems({"prompt": "a"}, "prompt-completion") == ["completion is missing"]
    assert (
        "both be text or both be message lists"
        in row_problems(
            {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]},
            "prompt-completion",
        )[0]
    )
    assert row_problems({"body": 5}, "text", "body") == ["body must be a string, got int"]


def test_type_clash_arrow_cannot_load_still_names_the_row(tmp_path):
    # Arrow rejects a file whose rows disagree on types without saying which row.
    rows = [chat() for _ in range(5)]
    rows[3] = {"messages": "not a list"}
    path = write_jsonl(tmp_path / "clash.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepare_dataset(DatasetSource(path=str(path)))
    assert "row 4: messages must be a list of messages, got str" in str(err.value)


def test_missing_column_in_some_rows(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}] * 4 + [{"prompt": "p"}]
    with pytest.raises(DataError, match="row 5: completion is missing"):
        prepare_dataset(DatasetSource(path=str(write_jsonl(tmp_path / "pc.jsonl", rows))))


def test_folder_of_parquet_and_csv_files(tmp_path):
    import datasets

    folder = tmp_path / "parquet"
    folder.mkdir()
    data = datasets.Dataset.from_list(
        [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)]
    )
    data.select(range(3)).to_parquet(str(folder / "a.parquet"))
    data.select(range(3, 6)).to_parquet(str(folder / "b.parquet"))
    (folder / "README.md").write_text("not data")
    dataset, fmt = prepare_dataset(DatasetSource(path=str(folder)))
    assert (len(dataset), fmt) == (6, "prompt-completion")

    csv = tmp_path / "rows.csv"
    csv.write_text("text\nfirst row\nsecond row\n")
    dataset, fmt = prepare_dataset(DatasetSource(path=str(csv)))
    assert (len(dataset), fmt) == (2, "text")


def test_fsspec_uri_reads_a_file(tiny):
    dataset, fmt = prepare_dataset(DatasetSource(uri=f"file://{tiny.data['text']}", limit=5))
    assert (len(dataset), fmt) == (5, "text")


def test_missing_path_and_unknown_file_type(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(DatasetSource(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ConfigError, match="unknown type"):
        prepare_dataset(DatasetSource(path=str(tmp_path / "data.txt")))
