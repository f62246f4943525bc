"""GPU check: the real entrypoint trains a Qwen2.5-1.5B-shaped model on one GPU.

    python -m sftjob_trainer.gpu_check --workdir /tmp/gpu-check --steps 30

No hub is needed: it trains a byte-level BPE tokenizer on generated text, builds a
random-init model of the Qwen2.5-1.5B shape on the GPU, writes synthetic rows with a
log-normal length spread around 500 tokens, and runs `python -m sftjob_trainer` with
the reference settings (per-device 2, accumulation 8, packing to 2048, bf16, full
fine-tune). It prints one JSON line with tokens/s, MFU and peak memory as the
trainer measured them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sftjob_operator.api import parse_sftjob
from sftjob_operator.trainer_config import build_trainer_config

from .bench import PEAK_FLOPS, QWEN25_15B
from .bench import TINY as SMOKE_SHAPE
from .tiny import build_tokenizer

H100_BF16_PEAK_FLOPS = PEAK_FLOPS["H100"]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "po", "qu", "xe", "da", "fi"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))


def build_model(path: Path, shape: dict[str, Any], seed: int = 0) -> int:
    """Tokenizer + random-init Qwen2.5-1.5B-shaped model in bf16; returns the parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rng = random.Random(seed)
    corpus = [" ".join(_word(rng) for _ in range(40)) for _ in range(2000)]
    tokenizer = build_tokenizer(path, corpus, vocab_size=2000, max_length=32768)
    config = Qwen2Config(
        **shape,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    count = sum(p.numel() for p in model.parameters())
    del model
    return count


def write_rows(path: Path, rows: int, seed: int = 1) -> None:
    """Text rows whose token counts spread log-normally around 500."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(rows):
            words = max(8, int(rng.lognormvariate(math.log(220), 0.6)))
            out.write(json.dumps({"text": " ".join(_word(rng) for _ in range(words))}) + "\n")


def job_manifest(
    model: Path, data: Path, steps: int, gpus: int, distributed: str = "ddp"
) -> dict[str, Any]:
    return {
        "apiVersion": "tuning.sftjob.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": "gpu-check", "namespace": "default"},
        "spec": {
            "model": {"path": str(model)},
            "dataset": {"path": str(data), "format": "text"},
            "method": "full",
            "training": {
                "perDeviceTrainBatchSize": 2,
                "gradientAccumulationSteps": 8,
                "maxSteps": steps,
                "learningRate": 2e-5,
                "maxLength": 2048,
                "packing": True,
                "bf16": gpus > 0,
                "loggingSteps": 5,
                "saveSteps": 100_000,
            },
            "resources": {"gpusPerNode": gpus, "gpuType": "H100" if gpus else None},
            "distributed": distributed,
            "progressIntervalSeconds": 1,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sftjob-gpu-check"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU (harness check)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (processes) on this machine")
    parser.add_argument("--distributed", choices=["ddp", "fsdp"], default="ddp")
    args = parser.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    params = build_model(work / "model", SMOKE_SHAPE if args.smoke else QWEN25_15B)
    write_rows(work / "rows.jsonl", args.rows)
    built = time.monotonic() - started

    gpus = 0 if args.smoke else args.gpus
    job = parse_sftjob(
        job_manifest(work / "model", work / "rows.jsonl", args.steps, gpus, args.distributed)
    )
    config_path = work / "config.json"
    config_path.write_text(json.dumps(build_trainer_config(job)))
    output = work / "output"
    env = {
        **os.environ,
        "SFTJOB_REPORT": "console",
        "SFTJOB_OUTPUT_DIR": str(output),
        "SFTJOB_TERMINATION_LOG": str(work / "termination.json"),
    }
    run_started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sftjob_trainer", "--config", str(config_path)], env=env
    )
    wall = time.monotonic() - run_started
    lines = (output / "progress.jsonl").read_text().splitlines()
    reports = [json.loads(line).get("progress") or {} for line in lines]
    rates = [r["tokensPerSecond"] for r in reports if r.get("tokensPerSecond")]
    steady = rates[len(rates) // 2 :] or rates
    tokens_per_second = sorted(steady)[len(steady) // 2] if steady else None
    import torch

    summary = {
        "gpus": gpus,
        "distributed": args.distributed,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "exit_code": result.returncode,
        "parameters": params,
        "steps": max((r.get("step") or 0 for r in reports), default=None),
        "tokens_per_s_reports": rates,
        "tokens_per_s": tokens_per_second,
        "mfu": round(6 * params * tokens_per_second / H100_BF16_PEAK_FLOPS, 4)
        if tokens_per_second
        else None,
        "trainer_wall_s": round(wall, 1),
        "setup_s": round(built, 1),
        "termination": json.loads((work / "termination.json").read_text())
        if (work / "termination.json").exists()
        else None,
    }
    print(json.dumps(summary), flush=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
