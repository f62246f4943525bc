"""Where `sftjob plan` can run the model's tokenizer over the data, and where it cannot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftjob_operator.api import parse_spec
from sftjob_operator.tokenized_plan import unreachable, worth_tokenizing


def spec(model: dict[str, Any], dataset: dict[str, Any], **training: Any):
    return parse_spec({"model": model, "dataset": dataset, "training": training})


def test_local_tokenizer_and_data_are_reachable(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    assert unreachable(spec({"path": str(tmp_path)}, {"path": str(data)})) is None
    # A hub model with a local tokenizer folder is enough: the model itself is not loaded.
    local_tokenizer = {"name": "org/model", "tokenizer": str(tmp_path)}
    assert unreachable(spec(local_tokenizer, {"path": str(data)})) is None


def test_hub_sources_and_missing_paths_say_why(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    hub_model = unreachable(spec({"name": "Qwen/Qwen2.5-1.5B"}, {"path": str(data)}))
    assert hub_model == "the tokenizer (Qwen/Qwen2.5-1.5B) is not a folder on this machine"
    hub_data = unreachable(spec({"path": str(tmp_path)}, {"name": "trl-lib/Capybara"}))
    assert hub_data == "the dataset (trl-lib/Capybara) is not on this machine"
    missing_eval = unreachable(
        spec(
            {"path": str(tmp_path)},
            {"path": str(data), "eval": {"path": str(tmp_path / "nope.jsonl")}},
        )
    )
    assert missing_eval is not None and "dataset.eval.path" in missing_eval


def test_only_estimates_are_worth_a_tokenizer_pass() -> None:
    model, data = {"name": "m"}, {"name": "d"}
    assert worth_tokenizing(spec(model, data, packing=True))
    assert worth_tokenizing(spec(model, {**data, "format": "prompt-completion"}))
    assert not worth_tokenizing(spec(model, data))
