"""Deterministic failures get a class the operator never retries, decided where the cause
is known, before the model loads (issue 22, defect 1).

Each case runs the real worker (SFTConfig, data, tokenizer, TRL's template rules) on the
tiny model. The model folder itself is broken (its config.json is not JSON) while the
tokenizer comes from the tiny model: a check that ran after the model load would end as
ModelLoadError, so each class below also shows the check ran before it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from sftjob_operator.retry_policy import RETRY_POLICY
from sftjob_trainer.tiny import CHAT_TEMPLATE
from sftjob_trainer.worker import run_worker


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("broken-model")
    (folder / "config.json").write_text("{not json")
    return folder


@pytest.fixture(scope="module")
def template_without_markers(tiny, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("no-generation-markers")
    shutil.copytree(tiny.model, folder, dirs_exist_ok=True)
    plain = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    (folder / "chat_template.jinja").write_text(plain)
    return folder


def chat_rows(path: Path, count: int = 16) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()[:count]]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


TOOL_CALL_ROW = {
    "messages": [
        {"role": "user", "content": "What is 2 * 3?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "multiply", "arguments": {"a": 2}}}
            ],
        },
        {"role": "tool", "content": "6"},
        {"role": "assistant", "content": "It is 6."},
    ]
}


def non_utf8_file(tiny, folder: Path) -> Path:
    lines = tiny.data["chat"].read_bytes().splitlines(keepends=True)[:16]
    lines[4] = lines[4].replace(b"What", b"Wh\xe9at", 1)  # Latin-1 "é"
    path = folder / "latin1.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def tool_call_file(tiny, folder: Path) -> Path:
    rows = chat_rows(tiny.data["chat"])
    rows[6] = TOOL_CALL_ROW
    return write_jsonl(folder / "tools.jsonl", rows)


# (spec for the case, dataset builder or None, class, what the message must say)
CASES: dict[str, tuple[dict[str, Any], Any, str, list[str]]] = {
    "non-utf8-jsonl": (
        {},
        non_utf8_file,
        "DataError",
        ["latin1.jsonl line 5 is not UTF-8 text (byte 0xe9 at column", "re-save the file"],
    ),
    "assistant-only-loss-without-generation-markers": (
        {"training": {"extraArgs": {"assistant_only_loss": True}}},
        None,
        "ConfigError",
        [
            "spec.training.extraArgs.assistant_only_loss needs `{% generation %}`",
            "this template has none",
            "spec.model.tokenizer",
            "remove assistant_only_loss",
        ],
    ),
    "template-without-tool-calls": (
        {},
        tool_call_file,
        "ConfigError",
        [
            "cannot render assistant tool_calls, tool messages (role tool)",
            "tools.jsonl row 7: UndefinedError",
            "rows without them render",
            "template supports tool calling (spec.model.tokenizer)",
        ],
    ),
    "flex-attention-on-cpu": (
        {"training": {"speed": {"flexAttention": "on"}}},
        None,
        "ConfigError",
        ["spec.training.speed.flexAttention is on", "no CUDA device", "set it to auto"],
    ),
    "flex-attention-implementation-on-cpu": (
        {"model": {"attnImplementation": "flex_attention"}},
        None,
        "ConfigError",
        ["spec.model.attnImplementation is flex_attention", "use sdpa or eager"],
    ),
    "negative-seed": (
        {"training": {"seed": -1}},
        None,
        "ConfigError",
        ["spec.training.seed is -1"],
    ),
    "report-to-package-missing": (
        {"training": {"extraArgs": {"report_to": "wandb"}}},
        None,
        "ConfigError",
        ["spec.training.extraArgs.report_to", "remove it from report_to"],
    ),
    "bogus-torch-dtype": (
        {"training": {"extraArgs": {"model_init_kwargs": {"torch_dtype": "bogus"}}}},
        None,
        "ConfigError",
        ["spec.training.extraArgs.model_init_kwargs", "torch_dtype 'bogus' is not a torch dtype"],
    ),
    "unknown-checkpointing-kwarg": (
        {
            "training": {
                "gradientCheckpointing": True,
                "extraArgs": {"gradient_checkpointing_kwargs": {"use_reentrnt": False}},
            }
        },
        None,
        "ConfigError",
        [
            "spec.training.extraArgs.gradient_checkpointing_kwargs has keys nothing reads: "
            "'use_reentrnt' (known: use_reentrant",
            "did you mean 'use_reentrant'?",
        ],
    ),
    "sft-config-refuses-a-value": (
        {"training": {"extraArgs": {"optim": "no_such_optimizer"}}},
        None,
        "ConfigError",
        ["spec.training.extraArgs.optim: SFTConfig rejected the settings"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_failures_are_never_retried_and_name_the_cause(
    case, tiny, broken_model, template_without_markers, make_config, tmp_path, monkeypatch
):
    spec, dataset, reason, says = CASES[case]
    monkeypatch.setenv("SFTJOB_TERMINATION_LOG", str(tmp_path / "termination-log"))
    tokenizer = template_without_markers if "assistant_only_loss" in str(spec) else tiny.model
    model = {"path": str(broken_model), "tokenizer": str(tokenizer), **spec.get("model", {})}
    spec = {**spec, "model": model}
    if dataset is not None:
        spec["dataset"] = {"path": str(dataset(tiny, tmp_path)), "limit": None}

    outcome = run_worker(make_config(spec))

    assert outcome.reason == reason, outcome.message
    assert RETRY_POLICY[outcome.reason].retry is False
    for text in says:
        assert text in outcome.message, outcome.message


ALTERNATING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
)


def test_a_template_that_fails_on_a_later_row_is_a_config_error(
    tiny, make_config, tmp_path, monkeypatch
):
    # Roles out of order have the same shape as the rows before them, so the pre-flight
    # renders only the first; TRL's tokenization meets the template's refusal.
    monkeypatch.setenv("SFTJOB_TERMINATION_LOG", str(tmp_path / "termination-log"))
    model = tmp_path / "alternating"
    shutil.copytree(tiny.model, model)
    (model / "chat_template.jinja").write_text(ALTERNATING_TEMPLATE)
    rows = chat_rows(tiny.data["chat"])
    rows[9]["messages"].insert(1, {"role": "user", "content": "and then?"})
    data = write_jsonl(tmp_path / "order.jsonl", rows)

    outcome = run_worker(
        make_config({"model": {"path": str(model)}, "dataset": {"path": str(data), "limit": None}})
    )

    assert outcome.reason == "ConfigError", outcome.message
    assert "the chat template failed on a row" in outcome.message
    assert "Conversation roles must alternate" in outcome.message


def test_gradient_checkpointing_kwargs_are_honoured_not_dropped(make_config):
    # transformers reads the old name only where the new one is unset; the trainer sets
    # the new one for gradientCheckpointing, so the user's dict used to vanish.
    from sftjob_trainer.config_map import build_sft_config
    from sftjob_trainer.settings import load_config

    given = {"use_reentrant": False, "determinism_check": "none"}
    training = {
        "gradientCheckpointing": True,
        "extraArgs": {"gradient_checkpointing_kwargs": given},
    }
    args = build_sft_config(load_config(make_config({"training": training})))
    assert args.activation_checkpointing_kwargs == given
