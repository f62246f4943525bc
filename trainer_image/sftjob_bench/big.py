"""Larger models, each side in its own process(es): 8B FSDP, 8B QLoRA, LoRA on two GPUs.

    python -m sftjob_bench.bench --case llama8b-fsdp|llama8b-qlora|lora-2gpu|<cpu smoke>
        [--steps N] [--skip K] [--gpus N] [--sides reference,sftjob] [--workdir DIR] [--dry-run]

Random init from the config shape (no hub): the Llama-3-8B shape (8.03 B parameters,
untied embeddings) or the Qwen2.5-1.5B shape, saved in bf16 with a byte-level BPE
tokenizer, and text rows of about 500 tokens (gpu_check's), written once per work folder.

- reference: plain TRL, started as a user would: `accelerate launch` with an FSDP v2
  config (full shard, one wrap unit per decoder layer, activation checkpointing in FSDP)
  or `--multi_gpu` (DDP), or one plain process; `SFTTrainer` with the model's path, the
  rows, and the same batch, length, packing, learning rate and steps. QLoRA: the model
  loaded in 4-bit (bitsandbytes nf4, double quantization, bf16 compute) and peft LoRA with
  the SFTJob's defaults (r 16, alpha 32, dropout 0.05, all-linear).
- sftjob: the same job as an SFTJob spec through the real entrypoint (`python -m
  sftjob_trainer`: the launcher, `accelerate launch`, the worker, the speed plan).

Both sides are timed by the same observer (sftjob_trainer.step_log: one line per training
log, logging every step) and the parent's clock. Each side prints one JSON line with the
keys of the end-to-end bench (e2e.py) where they mean the same: `wall_s` (process start
to the final model saved and the process gone), `tokens_per_s` (steady: after the first
`skip` steps), `tokens_per_s_e2e`, `untimed_s`, `peak_mem_gib` (nvidia-smi's highest
memory.used over the side's GPUs), `losses` (one a step), `phases`, `settings`. After both
sides, a `check` line judges the pair (losses within 1% at every step, the speed-up goal).

On CPU (the `*-cpu-smoke` cases) accelerate runs an FSDP config as plain DDP over gloo
(MULTI_CPU: it enables FSDP only for GPU process groups), and QLoRA cannot run at all
(bitsandbytes 4-bit needs CUDA): `llama-qlora-cpu-smoke` stops after preparing the inputs
and writing both sides' commands and configs (`--dry-run` does the same for any case).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sftjob_trainer.flops import peak_flops
from sftjob_trainer.levers.device_memory import ENV_MEMORY_GIB
from sftjob_trainer.step_log import ENV_STEP_LOG, read_step_log

from .big_cases import BIG_CASES, BigCase
from .common import QWEN25_15B, TINY, tiny_of

# meta-llama/Meta-Llama-3-8B's config.json.
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500_000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
# Its model card's count (8.03 B), what the shape must come to.
LLAMA3_8B_PARAMS = 8_030_261_248
TINY_LLAMA = tiny_of(LLAMA3_8B)
SHAPES = {"LLAMA3_8B": LLAMA3_8B, "TINY_LLAMA": TINY_LLAMA, "QWEN25_15B": QWEN25_15B, "TINY": TINY}
# The SFTJob's LoRA defaults (api.LoraSpec), which both sides use.
LORA_DEFAULTS: dict[str, Any] = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.05,
    "targetModules": ["all-linear"],
}
SEED = 42
MEAN_ROW_TOKENS = 600  # gpu_check.write_rows: log-normal around 500 tokens, sigma 0.6
REFERENCE_FSDP_CONFIG = "reference-fsdp.yaml"
STEP_LOG = "steps.jsonl"
FACTS = "facts.json"
# The goals for these cases: tokens/s against plain TRL, and losses step by step.
SPEEDUP_GOALS = {"llama8b-fsdp": 2.0, "llama8b-qlora": 2.0}
LOSS_TOLERANCE = 0.01


def parameter_count(shape: dict[str, Any]) -> int:
    """Parameters of a Llama/Qwen2-style decoder of this shape, from the shape alone.

    Qwen2 has biases on q, k and v (`attention_bias` is Llama's switch, off by default).
    """
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    attention = 2 * hidden * hidden + 2 * hidden * kv
    if shape.get("qkv_bias"):
        attention += hidden + 2 * kv
    layer = attention + 3 * hidden * inter + 2 * hidden  # q/k/v/o, gate/up/down, two norms
    embeddings = shape["vocab_size"] * hidden * (1 if shape["tie_word_embeddings"] else 2)
    return int(shape["num_hidden_layers"] * layer + embeddings + hidden)


def case_shape(case: BigCase) -> dict[str, Any]:
    shape = dict(SHAPES[case.shape])
    if case.model_type == "qwen2":
        shape["qkv_bias"] = True  # for parameter_count only; Qwen2Config has it built in
    return shape


def rows_for(case: BigCase, steps: int) -> int:
    """Rows enough for `steps` full steps after packing, with a margin."""
    sequences = steps * case.processes * case.per_device * case.accumulation
    return max(64, math.ceil(sequences * case.max_length / MEAN_ROW_TOKENS * 1.3))


def cuda_expected(case: BigCase) -> bool:
    """GPU settings (bf16, GPUs in the spec): any GPU case, and QLoRA, which runs nowhere else."""
    return not case.cpu or case.method == "qlora"


# --------------------------------------------------------------------------- the two sides


def job_manifest(case: BigCase, work: Path, steps: int) -> dict[str, Any]:
    """The job as an SFTJob: our side's input (the reference's settings, spelled as a spec)."""
    cuda = cuda_expected(case)
    spec: dict[str, Any] = {
        "model": {"path": str(work / "model")},
        "dataset": {"path": str(work / "rows.jsonl"), "format": "text"},
        "method": case.method,
        "distributed": case.distributed,
        "training": {
            "perDeviceTrainBatchSize": case.per_device,
            "gradientAccumulationSteps": case.accumulation,
            "maxSteps": steps,
            "learningRate": case.learning_rate,
            # TRL's schedule, so both sides step through the same learning rates.
            "lrSchedulerType": "linear",
            "warmupRatio": 0.0,
            "maxLength": case.max_length,
            "packing": True,
            "bf16": cuda,
            "loggingSteps": 1,
            "saveSteps": 1_000_000,
            "seed": SEED,
        },
        # On CPU, two processes are two "nodes" of one process each (the launcher's way).
        "resources": {"nodes": 1, "gpusPerNode": case.processes}
        if cuda
        else {"nodes": case.processes, "gpusPerNode": 0},
        "output": {"path": str(work / "sftjob")},
        "progressIntervalSeconds": 1,
    }
    if case.method in ("lora", "qlora"):
        spec["lora"] = dict(LORA_DEFAULTS)
    return {
        "apiVersion": "tuning.sftjob.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": case.name, "namespace": "default"},
        "spec": spec,
    }


def reference_fsdp_yaml() -> str:
    """The plain user's accelerate config for FSDP v2: the launcher's own settings.

    Taken from the launcher (one text, not two that could drift): FSDP v2, full shard, a
    wrap unit per decoder layer, activation checkpointing in FSDP, a full state dict.
    """
    from sftjob_trainer.launcher import fsdp_config_yaml

    return fsdp_config_yaml(activation_checkpointing=True)


def reference_sft_kwargs(case: BigCase, work: Path, steps: int, fields: set[str]) -> dict[str, Any]:
    """SFTConfig of the plain-TRL side: what it sets; TRL's defaults for the rest.

    `fields`: SFTConfig's field names (transformers renamed gradient_checkpointing to
    activation_checkpointing; under FSDP checkpointing is FSDP's, and transformers refuses
    both at once, so a plain user turns the Trainer's off).
    """
    cuda = cuda_expected(case)
    kwargs: dict[str, Any] = {
        "output_dir": str(work / "reference"),
        "per_device_train_batch_size": case.per_device,
        "gradient_accumulation_steps": case.accumulation,
        "max_length": case.max_length,
        "packing": True,
        "learning_rate": case.learning_rate,
        "max_steps": steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": SEED,
        "bf16": cuda,
        "use_cpu": not cuda,
        "disable_tqdm": True,
    }
    if case.method != "qlora":
        # fp32 weights (TRL's default) and device_map None as TRL's own sft script sets it:
        # TRL's "auto" default is reset only under DDP/DeepSpeed, and under FSDP would spread
        # each rank's copy over all the GPUs. Our trainer loads the same way (model.py).
        kwargs["model_init_kwargs"] = {"dtype": "float32", "device_map": None}
    if case.distributed == "fsdp":
        name = (
            "activation_checkpointing"
            if "activation_checkpointing" in fields
            else ("gradient_checkpointing")
        )
        kwargs[name] = False
    return kwargs


def quantization_kwargs() -> dict[str, Any]:
    """bitsandbytes 4-bit as the QLoRA recipe sets it (and sftjob_trainer.model does)."""
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_use_double_quant": True,
    }


def accelerate_prefix(processes: int, port: int, *, fsdp_config: Path | None) -> list[str]:
    """`accelerate launch` for `processes` local processes, as a user types it."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes"]
    command += [str(processes), "--num_machines", "1", "--main_process_port", str(port)]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--config_file", str(fsdp_config)] if fsdp_config else ["--multi_gpu"]
    return command


def reference_command(case: BigCase, work: Path, steps: int, port: int) -> list[str]:
    child = ["-m", "sftjob_bench.big", "--reference-child", case.name]
    child += ["--workdir", str(work), "--steps", str(steps)]
    if case.processes == 1:
        return [sys.executable, *child]
    fsdp = work / REFERENCE_FSDP_CONFIG if case.distributed == "fsdp" else None
    return accelerate_prefix(case.processes, port, fsdp_config=fsdp) + child


def sftjob_commands(case: BigCase, work: Path, port: int) -> list[tuple[list[str], dict[str, str]]]:
    """The real entrypoint, once per pod: one pod on GPU, one a process on CPU."""
    command = [sys.executable, "-m", "sftjob_trainer", "--config", str(work / "config.json")]
    pods = 1 if cuda_expected(case) else case.processes
    out = []
    for rank in range(pods):
        env = {
            "SFTJOB_REPORT": "console",
            "SFTJOB_TERMINATION_LOG": str(work / f"termination-{rank}.json"),
            "SFTJOB_MAIN_PORT": str(port),
        }
        if pods > 1:
            env.update(
                SFTJOB_NODE_RANK=str(rank), SFTJOB_NUM_NODES=str(pods), SFTJOB_MAIN_ADDR="127.0.0.1"
            )
        out.append((command, env))
    return out


def reference_child(case: BigCase, work: Path, steps: int) -> int:
    """One process of the plain-TRL side (started by `accelerate launch` or directly)."""
    import torch
    from datasets import load_dataset
    from sftjob_trainer.step_log import step_log_callback
    from trl import SFTConfig, SFTTrainer

    fields = set(SFTConfig.__dataclass_fields__)
    args = SFTConfig(**reference_sft_kwargs(case, work, steps, fields))
    dataset = load_dataset("json", data_files=str(work / "rows.jsonl"), split="train")
    model: Any = str(work / "model")
    if case.method == "qlora":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(**quantization_kwargs())
        local = int(os.environ.get("LOCAL_RANK", "0"))
        model = AutoModelForCausalLM.from_pretrained(
            model, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": local}
        )
    peft_config = None
    if case.method in ("lora", "qlora"):
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA_DEFAULTS["r"],
            lora_alpha=LORA_DEFAULTS["alpha"],
            lora_dropout=LORA_DEFAULTS["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    trainer: Any = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        peft_config=peft_config,
        callbacks=[step_log_callback(work / "reference" / STEP_LOG)],
    )
    trainer.train()
    trainer.save_model(str(work / "reference" / "final"))
    if trainer.is_world_process_zero():
        facts = {
            "distributed_type": str(trainer.accelerator.distributed_type.value),
            "processes": trainer.accelerator.num_processes,
            "steps": trainer.state.global_step,
            "attn_implementation": trainer.model.config._attn_implementation,
            "gradient_checkpointing": reference_checkpointing(trainer),
        }
        (work / "reference" / FACTS).write_text(json.dumps(facts))
    # End as our worker does (process group torn down, then out): under FSDP both ranks
    # otherwise hung in interpreter shutdown for minutes (worker.exit_now), which would
    # count against this side's wall time, not measure plain TRL's training.
    from sftjob_trainer.worker import exit_now

    exit_now(0)
    return 0


def reference_checkpointing(trainer: Any) -> bool:
    """Whether the plain side checkpoints activations: the Trainer's flag, or FSDP's."""
    args = trainer.args
    flag = getattr(args, "activation_checkpointing", None)
    if flag is None:
        flag = args.gradient_checkpointing
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    in_fsdp = bool(trainer.is_fsdp_enabled and plugin and plugin.activation_checkpointing)
    return bool(flag) or in_fsdp


# --------------------------------------------------------------------------- measuring


class GpuMemoryPoller:
    """Highest nvidia-smi memory.used per GPU while a side runs (nothing without a GPU)."""

    def __init__(self, interval: float = 0.5, gpus: list[str] | None = None) -> None:
        self.interval = interval
        self.gpus = gpus  # nvidia-smi indices to watch (None: all)
        self.peak: dict[str, float] = {}
        self.names: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuMemoryPoller:
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        query = [
            "nvidia-smi",
            "--query-gpu=index,name,memory.used",
            "--format=csv,noheader,nounits",
        ]
        while not self._stop.is_set():
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                out = ""
            self.record(out)
            self._stop.wait(self.interval)

    def record(self, csv: str) -> None:
        for line in csv.strip().splitlines():
            index, name, used = (part.strip() for part in line.split(","))
            if self.gpus is not None and index not in self.gpus:
                continue  # another run's GPU on the same machine
            self.names.add(name)
            self.peak[index] = max(self.peak.get(index, 0.0), float(used) / 1024)  # MiB -> GiB


def side_gpus(processes: int, env: Mapping[str, str]) -> list[str] | None:
    """The GPUs a side's processes take: the first `processes` of CUDA_VISIBLE_DEVICES.

    None (watch all) when that is unset or holds UUIDs rather than indices.
    """
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return [str(i) for i in range(processes)]
    if not all(v.isdigit() for v in visible):
        return None
    return visible[:processes]


def side_line(
    side: str,
    case: BigCase,
    *,
    spawned_at: float,
    ended_at: float,
    step_log: Path,
    skip: int,
    params: int,
    device: str,
) -> dict[str, Any]:
    """A side's JSON line from the parent's clock and the side's step log (pure)."""
    begin, steps = read_step_log(step_log)
    line: dict[str, Any] = {
        "side": side,
        "case": case.name,
        # Not e2e.py's "end_to_end": timed from outside the launched processes, so the
        # phases differ (no model-load mark inside the real entrypoint).
        "kind": "end_to_end_launched",
        "wall_s": round(ended_at - spawned_at, 2),
        "losses": [s["loss"] for s in steps],
        "tokens_total": int(steps[-1]["num_tokens"] or 0) if steps else 0,
    }
    if not steps or begin is None:
        return {**line, "tokens_per_s": None, "tokens_per_s_e2e": None, "mfu": None}
    first = min(skip, len(steps) - 1)  # the window opens at the end of step `skip`
    (t0, n0), (t1, n1) = (
        (steps[first - 1]["time"], steps[first - 1]["num_tokens"] or 0),
        (
            steps[-1]["time"],
            steps[-1]["num_tokens"] or 0,
        ),
    )
    if first == 0:
        t0, n0 = begin, 0
    steady = (n1 - n0) / (t1 - t0) if t1 > t0 else None
    peak = peak_flops(device)
    line.update(
        {
            "tokens_per_s": round(steady, 1) if steady else None,
            # Per GPU, 6 x ALL parameters a token (for LoRA/QLoRA this overstates the work).
            "mfu": round(6 * params * steady / (peak * case.processes), 4)
            if peak and steady
            else None,
            "tokens_per_s_e2e": round(line["tokens_total"] / line["wall_s"], 1),
            "untimed_s": round(t0 - begin, 1),
            "phases": {
                "before_training_s": round(begin - spawned_at, 2),
                "first_step_s": round(steps[0]["time"] - begin, 2),
                "training_s": round(steps[-1]["time"] - steps[0]["time"], 2),
                "save_and_exit_s": round(ended_at - steps[-1]["time"], 2),
            },
        }
    )
    line["timed_steps"] = len(steps) - first
    return line


def check_pair(reference: dict[str, Any], sftjob: dict[str, Any]) -> dict[str, Any]:
    """The issue's judgement of one pair: losses within 1% at every step, the speed-up."""
    ref_losses, our_losses = reference["losses"], sftjob["losses"]
    worst = max(
        (abs(a - b) / abs(a) for a, b in zip(ref_losses, our_losses, strict=False) if a),
        default=None,
    )
    same_steps = len(ref_losses) == len(our_losses) and bool(ref_losses)
    speedup = (
        round(sftjob["tokens_per_s"] / reference["tokens_per_s"], 3)
        if sftjob.get("tokens_per_s") and reference.get("tokens_per_s")
        else None
    )
    goal = SPEEDUP_GOALS.get(reference["case"])
    checks = {
        # The same samples in every step: the same tokens trained on over the run.
        "same_tokens": bool(reference.get("tokens_total"))
        and reference.get("tokens_total") == sftjob.get("tokens_total"),
        "losses_same_steps": same_steps,
        "losses_within_1pct": same_steps and worst is not None and worst <= LOSS_TOLERANCE,
        "speedup_goal": None if goal is None else bool(speedup and speedup >= goal),
    }
    return {
        "check": "big_pair",
        "case": reference["case"],
        "speedup": speedup,
        "speedup_goal": goal,
        "speedup_e2e": round(reference["wall_s"] / sftjob["wall_s"], 3)
        if sftjob.get("wall_s")
        else None,
        "max_rel_loss_diff": round(worst, 6) if worst is not None else None,
        "checks": checks,
        "passed": all(v is not False for v in checks.values()),
    }


# --------------------------------------------------------------------------- running


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_inputs(case: BigCase, work: Path, steps: int) -> dict[str, Any]:
    """Model, tokenizer and rows both sides read, plus each side's config files."""
    from sftjob_operator.api import parse_sftjob
    from sftjob_operator.trainer_config import build_trainer_config

    from .gpu_check import build_model, write_rows

    work.mkdir(parents=True, exist_ok=True)
    marker = work / "inputs.json"
    wanted = {"case": asdict(case), "steps": steps}
    facts: dict[str, Any] = json.loads(marker.read_text()) if marker.is_file() else {}
    if {k: facts.get(k) for k in wanted} != wanted:
        shape = SHAPES[case.shape]
        build_model(work / "model", shape, model_type=case.model_type)
        rows = rows_for(case, steps)
        write_rows(work / "rows.jsonl", rows)
        facts = {**wanted, "params": parameter_count(case_shape(case)), "rows": rows}
        marker.write_text(json.dumps(facts))
    job = parse_sftjob(job_manifest(case, work, steps))
    (work / "config.json").write_text(json.dumps(build_trainer_config(job)))
    (work / REFERENCE_FSDP_CONFIG).write_text(reference_fsdp_yaml())
    return facts


def prepared_in_own_process(case: BigCase, work: Path, steps: int) -> dict[str, Any]:
    """prepare_inputs in a child process: building an 8B model on the GPU would leave this
    process holding GPU memory (the CUDA context, the allocator's cache) while the sides run."""
    command = [sys.executable, "-m", "sftjob_bench.big", "--prepare", "--case", case.name]
    command += ["--workdir", str(work), "--steps", str(steps), "--gpus", str(case.processes)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    facts: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return facts


def clear_side(work: Path, side: str) -> None:
    """What an earlier run of this side left (its output, step log); kernel caches stay."""
    folder = work / side
    for name in ("final", "checkpoints", STEP_LOG, FACTS, "progress.jsonl"):
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for old in work.glob("termination-*.json"):
        old.unlink()


def descendants(root: int, parent_of: dict[int, int]) -> list[int]:
    """Every process under `root` (children, their children, ...) in a pid -> ppid map."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_parents() -> dict[int, int]:
    """pid -> ppid of every process, from /proc (Linux)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parents


def wait_all(processes: list[subprocess.Popen[bytes]], deadline: float | None) -> bool:
    """Wait for every process; past the deadline kill them and all under them. True if killed.

    The whole tree, found before anything dies: torchrun starts its workers in sessions
    of their own, so killing the launcher's process group would leave them running.
    SIGKILL, not SIGTERM: the trainer would first save a checkpoint (minutes for 8B). The
    step log keeps what the side did until then, so its steady rate is still reported.
    """
    for process in processes:
        left = None if deadline is None else max(deadline - time.time(), 0.1)
        try:
            process.wait(timeout=left)
        except subprocess.TimeoutExpired:
            parents = process_parents()
            tree = [p.pid for p in processes]
            tree += [pid for p in processes for pid in descendants(p.pid, parents)]
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for other in processes:
                other.wait()
            return True
    return False


def run_side(
    side: str,
    case: BigCase,
    work: Path,
    steps: int,
    skip: int,
    params: int,
    timeout: float | None = None,
) -> dict[str, Any]:
    clear_side(work, side)
    (work / side).mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = work / side / STEP_LOG
    env = {**os.environ, ENV_STEP_LOG: str(log_path)}
    if side == "reference":
        runs: list[tuple[list[str], dict[str, str]]] = [
            (reference_command(case, work, steps, port), {})
        ]
    else:
        runs = sftjob_commands(case, work, port)
    with GpuMemoryPoller(gpus=side_gpus(case.processes, os.environ)) as memory:
        spawned_at = time.time()
        # The children's own prints (Trainer's log dicts) go to stderr: stdout is JSON lines.
        # Each in a session of its own: a timeout kills the whole tree (accelerate's workers).
        processes = [
            subprocess.Popen(cmd, env={**env, **extra}, stdout=sys.stderr, start_new_session=True)
            for cmd, extra in runs
        ]
        timed_out = wait_all(processes, spawned_at + timeout if timeout else None)
        codes = [p.returncode for p in processes]
        ended_at = time.time()
    device = ", ".join(sorted(memory.names)) or "cpu"
    line = side_line(
        side,
        case,
        spawned_at=spawned_at,
        ended_at=ended_at,
        step_log=log_path,
        skip=skip,
        params=params,
        device=device,
    )
    line["peak_mem_gib"] = round(max(memory.peak.values()), 2) if memory.peak else None
    line["exit_codes"] = codes
    line["timed_out"] = timed_out
    settings = side_settings(side, case, work, steps, device)
    settings["timed_steps"] = line.pop("timed_steps", 0)
    settings["steps"] = len(line["losses"])  # steps done (one log a step)
    line["settings"] = settings
    return line


def side_settings(side: str, case: BigCase, work: Path, steps: int, device: str) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "device": device,
        "method": case.method,
        "model_type": case.model_type,
        "shape": case.shape,
        "processes": case.processes,
        "distributed": case.distributed,
        "per_device": case.per_device,
        "accumulation": case.accumulation,
        "effective_batch": case.per_device * case.accumulation * case.processes,
        "max_length": case.max_length,
        "learning_rate": case.learning_rate,
        "max_steps": steps,
        "logging_steps": 1,
    }
    if side == "reference":
        facts = work / "reference" / FACTS
        settings.update(json.loads(facts.read_text()) if facts.is_file() else {})
        return settings
    outcome_file = work / "termination-0.json"
    outcome = json.loads(outcome_file.read_text()) if outcome_file.is_file() else {}
    settings["outcome"] = outcome
    # "trained 12/12 steps on 4 process(es) (FSDP)": what accelerate really ran.
    message = str(outcome.get("message", ""))
    if "(" in message and ")" in message:
        settings["distributed_type"] = message.split("(")[-1].split(")")[0]
    progress = work / "sftjob" / "progress.jsonl"
    if progress.is_file():
        for report in map(json.loads, progress.read_text().splitlines()):
            if "speedPlan" in report:
                settings["speed"] = report["speedPlan"]
                break
    speed = settings.get("speed") or {}
    settings["attn_implementation"] = speed.get("attention")
    # Under FSDP the launcher's accelerate config checkpoints (spec default on), where FSDP runs.
    settings["gradient_checkpointing"] = (
        settings.get("distributed_type") == "FSDP"
        if case.distributed == "fsdp"
        else bool(speed.get("gradientCheckpointing"))
    )
    return settings


def dry_run_line(case: BigCase, work: Path, steps: int) -> dict[str, Any]:
    """Both sides' exact commands and configs, without running them."""
    port = 29500
    return {
        "dry_run": case.name,
        "reference": {
            "command": reference_command(case, work, steps, port),
            "sft_config": reference_sft_kwargs(case, work, steps, {"activation_checkpointing"}),
            "accelerate_config": reference_fsdp_yaml() if case.distributed == "fsdp" else None,
            "quantization": quantization_kwargs() if case.method == "qlora" else None,
        },
        "sftjob": {
            "commands": [cmd for cmd, _ in sftjob_commands(case, work, port)],
            "manifest": job_manifest(case, work, steps),
        },
        "params": parameter_count(case_shape(case)),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(BIG_CASES))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--skip", type=int, default=None)
    parser.add_argument("--gpus", type=int, default=None, help="training processes (8B FSDP: 2)")
    parser.add_argument("--sides", default="reference,sftjob")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument(
        "--side-timeout",
        type=float,
        default=None,
        help="seconds per side; past it the side is killed and reported with what it logged",
    )
    parser.add_argument(
        "--memory-gib", type=float, default=None, help="our speed plan sizes for this many GiB"
    )
    parser.add_argument("--reference-child", choices=sorted(BIG_CASES), default=None)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    name = args.reference_child or args.case
    if name is None:
        parser.error("--case is required")
    case = BIG_CASES[name]
    if args.gpus:
        case = BigCase(**{**asdict(case), "processes": args.gpus})
    steps = args.steps or case.steps
    skip = case.skip if args.skip is None else args.skip
    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"sftjob-bench-{case.name}-"))
    if args.reference_child:
        return reference_child(case, work, steps)
    if args.prepare:
        print(json.dumps(prepare_inputs(case, work, steps)), flush=True)
        return 0
    if args.memory_gib:
        os.environ[ENV_MEMORY_GIB] = str(args.memory_gib)  # both sides' processes inherit it
    if steps <= skip:
        parser.error(f"--steps must be larger than the {skip} untimed steps")
    if args.dry_run or (case.method == "qlora" and case.cpu):
        # QLoRA on CPU stops here: bitsandbytes' 4-bit kernels need CUDA.
        facts = prepared_in_own_process(case, work, steps) if not args.dry_run else None
        print(json.dumps({**dry_run_line(case, work, steps), "inputs": facts}), flush=True)
        return 0
    facts = prepared_in_own_process(case, work, steps)
    print(json.dumps({"inputs": facts}), flush=True)
    lines = {}
    for side in [s.strip() for s in args.sides.split(",") if s.strip()]:
        lines[side] = run_side(side, case, work, steps, skip, facts["params"], args.side_timeout)
        print(json.dumps(lines[side]), flush=True)
    if {"reference", "sftjob"} <= set(lines):
        verdict = check_pair(lines["reference"], lines["sftjob"])
        print(json.dumps(verdict), flush=True)
    failed = [side for side, line in lines.items() if any(line["exit_codes"])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
