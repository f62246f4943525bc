"""Shared fixtures for the trainer tier: one tiny model and dataset set per session."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sftjob_operator.api import parse_sftjob
from sftjob_operator.trainer_config import build_trainer_config
from sftjob_trainer.tiny import build_tiny_model, tiny_sftjob, write_tiny_datasets

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every test here needs torch and TRL: `-m "not trainer"` skips the whole tier.
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.trainer)


@dataclass(frozen=True)
class Tiny:
    model: Path
    model_without_template: Path
    data: dict[str, Path]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    model = build_tiny_model(root / "model")
    bare = root / "model-no-template"
    shutil.copytree(model, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((bare / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return Tiny(model=model, model_without_template=bare, data=write_tiny_datasets(root / "data"))


@pytest.fixture(scope="session")
def varied_text(tmp_path_factory: pytest.TempPathFactory, tiny: Tiny) -> Path:
    """48 text rows of 3 to 59 words: packed batches differ in length and documents."""
    text = tiny.data["text"].read_text().splitlines()
    words = " ".join(json.loads(line)["text"] for line in text).split()
    path = tmp_path_factory.mktemp("varied") / "text.jsonl"
    lines = [json.dumps({"text": " ".join(words[i : i + 3 + (i * 37) % 57])}) for i in range(48)]
    path.write_text("\n".join(lines) + "\n")
    return path


MakeConfig = Callable[..., Path]


@pytest.fixture
def make_config(tiny: Tiny, tmp_path: Path) -> MakeConfig:
    """Write a resolved config for a spec override; returns its path.

    `report_to_api=False` blanks the job identity so progress goes to the console.
    """

    def make(
        spec: dict[str, Any] | None = None, *, report_to_api: bool = False, name: str = "tiny"
    ) -> Path:
        document = tiny_sftjob(
            tiny.model, tiny.data["chat"], tmp_path / "output", spec or {}, name=name
        )
        config = build_trainer_config(parse_sftjob(document))
        if not report_to_api:
            config["job"]["name"] = None
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        return path

    return make


@pytest.fixture
def bf16_trainer(make_config: MakeConfig) -> Callable[..., Any]:
    """Builds a real SFTTrainer on the tiny model with bf16 (autocast on CPU) and one row
    per micro-batch; `speed` switches go on top of micro-batch sizing and flex attention
    turned off, other keywords are spec.training fields."""
    from sftjob_trainer.settings import load_config
    from sftjob_trainer.train import build_trainer

    def build(
        speed: dict[str, str], callbacks: list[Any], method: str | None = None, **training: Any
    ) -> Any:
        switches = {"autoMicroBatch": "off", "flexAttention": "off", **speed}
        fields = {"bf16": True, "perDeviceTrainBatchSize": 1, **training, "speed": switches}
        spec: dict[str, Any] = {"training": fields, **({"method": method} if method else {})}
        return build_trainer(load_config(make_config(spec)), callbacks=callbacks)

    return build


class TrainerStandIn:
    """Stands in for a trainer where a lever reads only its model (and whether TRL's
    activation offloading is on) and adds a callback."""

    def __init__(self, model: Any, activation_offloading: bool = False) -> None:
        self.model = model
        self.args = SimpleNamespace(activation_offloading=activation_offloading)
        self.accelerator = None
        self.callbacks: list[Any] = []

    def add_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)


@pytest.fixture
def trainer_stand_in() -> type[TrainerStandIn]:
    return TrainerStandIn


@pytest.fixture
def tiny_gpt2() -> Any:
    """A model with learned positions and no rotary embedding (GPT-2)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)
