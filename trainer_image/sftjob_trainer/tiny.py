"""A tiny local model and datasets, for tests and the demo (no model hub needed).

The model is a 2-layer Qwen2 with a byte-level BPE tokenizer trained on the same
generated text the datasets hold, so every row tokenizes to a few dozen tokens and
a 20-step run takes a second or two on a CPU. The chat template is ChatML with
`{% generation %}` markers so `assistant_only_loss` works like with real models.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_SUBJECTS = ["the cat", "a robot", "my friend", "the river", "our team", "the model", "a bird"]
_VERBS = ["likes", "sees", "builds", "follows", "trains", "paints", "counts"]
_OBJECTS = ["red apples", "small boats", "long songs", "green hills", "fast trains", "old maps"]


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"


def _pairs(rows: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [
        (f"What does {_sentence(rng)} do?", f"{_sentence(rng).capitalize()}, and {_sentence(rng)}.")
        for _ in range(rows)
    ]


def build_tokenizer(path: Path, corpus: list[str], vocab_size: int, max_length: int = 2048) -> Any:
    """Train a byte-level BPE on `corpus` and save it (ChatML template, eos/pad) to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        model_max_length=max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return tokenizer


def build_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """Write a random-init Qwen2 (hidden 64, 2 layers) and its tokenizer to `path`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    corpus = [f"{q} {a}" for q, a in _pairs(400, seed)] + ["user assistant system"]
    tokenizer = build_tokenizer(path, corpus, vocab_size=400)

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def _write_jsonl(path: Path, rows: list[object]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_tiny_datasets(folder: Path, *, rows: int = 128, seed: int = 1) -> dict[str, Path]:
    """Write chat.jsonl, prompt-completion.jsonl, text.jsonl and malformed-chat.jsonl.

    The malformed file is valid JSON Lines whose row 3 (1-based) has a `bot` role, so
    validation must name that row.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = _pairs(rows, seed)
    files = {
        "chat": folder / "chat.jsonl",
        "prompt-completion": folder / "prompt-completion.jsonl",
        "text": folder / "text.jsonl",
        "malformed": folder / "malformed-chat.jsonl",
    }
    _write_jsonl(
        files["chat"],
        [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs
        ],
    )
    _write_jsonl(
        files["prompt-completion"],
        [{"prompt": f"User: {q}\nAssistant:", "completion": f" {a}"} for q, a in pairs],
    )
    _write_jsonl(files["text"], [{"text": f"{q} {a}"} for q, a in pairs])
    malformed = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in pairs[:6]
    ]
    malformed[2] = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]
    }
    _write_jsonl(files["malformed"], malformed)
    return files


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def tiny_sftjob(
    model: Path,
    dataset: Path,
    output: Path,
    spec: dict[str, Any] | None = None,
    *,
    name: str = "tiny",
    namespace: str = "default",
) -> dict[str, Any]:
    """An SFTJob document for a fast CPU run on the tiny model; `spec` overrides any part."""
    base = {
        "model": {"path": str(model)},
        "dataset": {"path": str(dataset), "limit": 32},
        "method": "full",
        "training": {
            "perDeviceTrainBatchSize": 4,
            "gradientAccumulationSteps": 1,
            "numTrainEpochs": 1,
            "learningRate": 1e-3,
            "maxLength": 128,
            "saveSteps": 100,
            "loggingSteps": 1,
            # Recomputing activations only slows a 2-layer model down.
            "gradientCheckpointing": False,
        },
        "resources": {"nodes": 1, "gpusPerNode": 0},
        "output": {"path": str(output)},
        "progressIntervalSeconds": 1,
    }
    return {
        "apiVersion": "tuning.sftjob.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": _merge(base, spec or {}),
    }
