"""The larger-model cases' names and settings (sftjob_bench.big runs them).

A leaf: bench.py reads `wants` to hand these cases over without importing big.py, which
imports bench (its shapes and peaks); an import either way would close a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BigCase:
    name: str
    model_type: str  # llama | qwen2
    shape: str  # a key of SHAPES
    method: str  # full | lora | qlora
    processes: int  # training processes (GPUs; on CPU, gloo processes)
    distributed: str  # fsdp | ddp
    max_length: int
    per_device: int
    accumulation: int
    learning_rate: float
    steps: int
    skip: int  # steps before the steady-state window
    cpu: bool = False


BIG_CASES = {
    "llama8b-fsdp": BigCase(
        "llama8b-fsdp", "llama", "LLAMA3_8B", "full", 4, "fsdp", 2048, 2, 4, 2e-5, 12, 3
    ),
    "llama8b-qlora": BigCase(
        "llama8b-qlora", "llama", "LLAMA3_8B", "qlora", 1, "ddp", 2048, 2, 4, 2e-4, 12, 3
    ),
    "lora-2gpu": BigCase(
        "lora-2gpu", "qwen2", "QWEN25_15B", "lora", 2, "ddp", 2048, 2, 8, 2e-4, 15, 3
    ),
    # The same code paths in seconds on a CPU.
    "llama-fsdp-cpu-smoke": BigCase(
        "llama-fsdp-cpu-smoke",
        "llama",
        "TINY_LLAMA",
        "full",
        2,
        "fsdp",
        128,
        2,
        2,
        2e-4,
        4,
        1,
        True,
    ),
    "llama-qlora-cpu-smoke": BigCase(
        "llama-qlora-cpu-smoke",
        "llama",
        "TINY_LLAMA",
        "qlora",
        1,
        "ddp",
        128,
        2,
        2,
        2e-4,
        4,
        1,
        True,
    ),
    "lora-2proc-cpu-smoke": BigCase(
        "lora-2proc-cpu-smoke", "qwen2", "TINY", "lora", 2, "ddp", 128, 2, 2, 2e-4, 4, 1, True
    ),
}


def wants(argv: list[str]) -> bool:
    """Whether a bench command line names one of these cases (bench.main hands it over)."""
    for index, arg in enumerate(argv):
        if arg == "--case" and index + 1 < len(argv):
            return argv[index + 1] in BIG_CASES
        if arg.startswith("--case="):
            return arg.split("=", 1)[1] in BIG_CASES
    return False
