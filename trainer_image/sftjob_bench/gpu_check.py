"""GPU check: the real entrypoint trains a Qwen2.5-1.5B-shaped model on one or more GPUs.

    python -m sftjob_bench.gpu_check --workdir /tmp/gpu-check --steps 30

No hub is needed: it trains a byte-level BPE tokenizer on generated text, builds a
random-init model of the Qwen2.5-1.5B shape on the GPU, writes synthetic rows with a
log-normal length spread around 500 tokens, and runs `python -m sftjob_trainer` with
the reference settings (per-device 2, accumulation 8, packing to 2048, bf16; a full
fine-tune, or LoRA with `--method lora`) and the trainer's speed defaults. It prints
one JSON line with tokens/s and MFU as the trainer reported them, and the losses it
logged.

Two GPUs of one machine, with the same effective batch as one GPU at accumulation 16
(2 x 8 x 2 = 2 x 16 x 1), so the two runs' losses can be compared step by step:

    python -m sftjob_bench.gpu_check --gpus 2 --accumulation 8 --memory-gib 80
    python -m sftjob_bench.gpu_check --gpus 1 --accumulation 16 --memory-gib 80

`--memory-gib` sizes the speed plan for a card of that many GiB (an H200 planning as
an 80 GB H100 would), as the bench's option of the same name does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sftjob_operator.api import parse_sftjob
from sftjob_operator.trainer_config import build_trainer_config
from sftjob_trainer.config_map import CHECKPOINT_DIR, FINAL_DIR
from sftjob_trainer.flops import PEAK_FLOPS
from sftjob_trainer.levers.device_memory import ENV_MEMORY_GIB
from sftjob_trainer.progress import PROGRESS_FILE
from sftjob_trainer.train import newest_checkpoint

from .common import QWEN25_15B, build_model, word
from .common import TINY as SMOKE_SHAPE

H100_BF16_PEAK_FLOPS = PEAK_FLOPS["H100"]


def write_rows(path: Path, rows: int, seed: int = 1) -> None:
    """Text rows whose token counts spread log-normally around 500."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(rows):
            words = max(8, int(rng.lognormvariate(math.log(220), 0.6)))
            out.write(json.dumps({"text": " ".join(word(rng) for _ in range(words))}) + "\n")


def logged_losses(checkpoints: Path) -> dict[str, float]:
    """Step -> loss as the Trainer logged it, from the last checkpoint's log history.

    Not from progress.jsonl: a progress report carries the newest loss logged BEFORE
    its step ended (the Trainer logs after its step-end callbacks), so its step is not
    the loss's step.
    """
    last = newest_checkpoint(checkpoints)
    if last is None:
        return {}
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return {str(entry["step"]): entry["loss"] for entry in history if "loss" in entry}


def clear_previous_run(output: Path, termination_log: Path) -> None:
    """Remove what an earlier run in the same workdir left that this one would pick up.

    Its checkpoints would be resumed from, and its progress reports and outcome read as
    this run's. The compiled-kernel cache (output/.sftjob-cache) stays: it changes how
    long the first step takes, not what is measured after it.
    """
    for folder in (output / CHECKPOINT_DIR, output / FINAL_DIR):
        if folder.exists():
            shutil.rmtree(folder)
    (output / PROGRESS_FILE).unlink(missing_ok=True)
    termination_log.unlink(missing_ok=True)


def trainer_env(
    base: Mapping[str, str], work: Path, output: Path, memory_gib: float | None
) -> dict[str, str]:
    """The entrypoint's environment: progress to the console and output/progress.jsonl."""
    env = {
        **base,
        "SFTJOB_REPORT": "console",
        "SFTJOB_OUTPUT_DIR": str(output),
        "SFTJOB_TERMINATION_LOG": str(work / "termination.json"),
    }
    if memory_gib:
        env[ENV_MEMORY_GIB] = str(memory_gib)
    return env


def progress_reports(output: Path) -> list[dict[str, Any]]:
    """The trainer's progress reports; none when it failed before training began."""
    path = output / PROGRESS_FILE
    if not path.is_file():
        return []
    return [json.loads(line).get("progress") or {} for line in path.read_text().splitlines()]


def mfu_per_gpu(params: int, tokens_per_second: float, gpus: int) -> float:
    """6 x parameters x tokens/s over the H100's bf16 peak, per GPU.

    The trainer's tokens/s counts every rank's tokens, so it is divided over the GPUs.
    6 x ALL parameters per token, as the bench counts: for LoRA, whose frozen weights
    get no weight gradient, this overstates the FLOPs done.
    """
    return round(6 * params * tokens_per_second / (H100_BF16_PEAK_FLOPS * max(gpus, 1)), 4)


def job_manifest(
    model: Path,
    data: Path,
    steps: int,
    gpus: int,
    distributed: str = "ddp",
    accumulation: int = 8,
    logging_steps: int = 5,
    extra_args: dict[str, Any] | None = None,
    method: str = "full",
) -> dict[str, Any]:
    return {
        "apiVersion": "tuning.sftjob.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": "gpu-check", "namespace": "default"},
        "spec": {
            "model": {"path": str(model)},
            "dataset": {"path": str(data), "format": "text"},
            "method": method,
            "training": {
                "perDeviceTrainBatchSize": 2,
                "gradientAccumulationSteps": accumulation,
                "maxSteps": steps,
                "learningRate": 2e-5 if method == "full" else 2e-4,  # the spec's defaults
                "maxLength": 2048,
                "packing": True,
                "bf16": gpus > 0,
                "loggingSteps": logging_steps,
                "saveSteps": 100_000,
                **({"extraArgs": extra_args} if extra_args else {}),
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
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--accumulation", type=int, default=8, help="per process")
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument(
        "--extra-args", type=json.loads, help="spec.training.extraArgs as JSON (SFTConfig fields)"
    )
    parser.add_argument(
        "--memory-gib", type=float, help="plan micro-batches for a card of this many GiB"
    )
    args = parser.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    params = build_model(work / "model", SMOKE_SHAPE if args.smoke else QWEN25_15B)
    write_rows(work / "rows.jsonl", args.rows)
    built = time.monotonic() - started

    gpus = 0 if args.smoke else args.gpus
    job = parse_sftjob(
        job_manifest(
            work / "model",
            work / "rows.jsonl",
            args.steps,
            gpus,
            args.distributed,
            accumulation=args.accumulation,
            logging_steps=args.logging_steps,
            extra_args=args.extra_args,
            method=args.method,
        )
    )
    config_path = work / "config.json"
    config_path.write_text(json.dumps(build_trainer_config(job)))
    output = work / "output"
    clear_previous_run(output, work / "termination.json")
    env = trainer_env(os.environ, work, output, args.memory_gib)
    run_started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sftjob_trainer", "--config", str(config_path)], env=env
    )
    wall = time.monotonic() - run_started
    reports = progress_reports(output)
    rates = [r["tokensPerSecond"] for r in reports if r.get("tokensPerSecond")]
    steady = rates[len(rates) // 2 :] or rates
    tokens_per_second = sorted(steady)[len(steady) // 2] if steady else None
    import torch

    summary = {
        "gpus": gpus,
        "method": args.method,
        "accumulation": args.accumulation,
        "memory_gib": env.get(ENV_MEMORY_GIB),  # as the trainer got it (it checks the value)
        "extra_args": args.extra_args,
        "distributed": args.distributed,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "exit_code": result.returncode,
        "parameters": params,
        "steps": max((r.get("step") or 0 for r in reports), default=None),
        "tokens_per_s_reports": rates,
        "tokens_per_s": tokens_per_second,
        "mfu": mfu_per_gpu(params, tokens_per_second, gpus) if tokens_per_second else None,
        "losses": logged_losses(output / CHECKPOINT_DIR),
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
