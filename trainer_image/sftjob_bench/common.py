"""What the bench's tools share: the model shapes, the cards' peaks, the step meter, the
random-init model builder and the GPU memory cap (one module, so the tools import it and
not each other)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

from sftjob_trainer.tiny import build_tokenizer

QWEN25_15B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
}


def tiny_of(shape: dict[str, Any]) -> dict[str, Any]:
    """A model of `shape`'s architecture small enough for the CPU smoke cases."""
    return {
        **shape,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 2048,
    }


TINY = tiny_of(QWEN25_15B)
# The adapters every LoRA case trains (spec.lora): rank 16 on every linear layer.
LORA_SPEC = {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]}
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "po", "qu", "xe", "da", "fi"]


def word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))


def build_model(path: Path, shape: dict[str, Any], seed: int = 0, model_type: str = "qwen2") -> int:
    """Tokenizer + random-init Qwen2.5-1.5B-shaped model in bf16; returns the parameter count.

    `model_type` "llama" builds a Llama of the shape instead (the 8B cases, sftjob_bench.big).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    rng = random.Random(seed)
    corpus = [" ".join(word(rng) for _ in range(40)) for _ in range(2000)]
    tokenizer = build_tokenizer(path, corpus, vocab_size=2000, max_length=32768)
    llama = model_type == "llama"
    config = (LlamaConfig if llama else Qwen2Config)(
        **shape,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = (LlamaForCausalLM if llama else Qwen2ForCausalLM)(config).to(torch.bfloat16)
    model.save_pretrained(path)
    count = int(sum(p.numel() for p in model.parameters()))
    del model
    return count


def make_callback(
    trainer_ref: dict[str, Any], cuda: bool, skip: int, sync_every_step: bool = False
) -> Any:
    import torch
    from sftjob_trainer.levers.token_tally import trained_tokens
    from transformers import TrainerCallback

    class Meter(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []
            self.losses: list[float] = []
            self.graphs: list[int] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.marks.append((time.perf_counter(), 0))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            from torch._dynamo.utils import counters

            # Synchronise only at the two marks the rate is taken between (the end of the
            # untimed steps and the last step): a sync every step would idle the GPU each
            # step, which a real run does not, and cost the faster side more.
            if cuda and (sync_every_step or state.global_step in (skip, state.max_steps)):
                torch.cuda.synchronize()
            tokens = trained_tokens(trainer_ref["trainer"])
            self.marks.append((time.perf_counter(), tokens))
            # Graphs dynamo has compiled so far: flat after step 1 means no recompiles.
            self.graphs.append(int(counters["stats"]["unique_graphs"]))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Meter()


def cap_gpu_memory(gib: float) -> None:
    import torch
    from sftjob_trainer.levers.device_memory import ENV_MEMORY_GIB

    os.environ[ENV_MEMORY_GIB] = str(gib)
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib / total))
