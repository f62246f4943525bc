"""Throughput benchmark: the plain-TRL reference settings against our trainer's defaults.

    python -m sftjob_bench.bench --case full|lora|cpu-smoke [--steps N] [--sides reference,sftjob]
                                   [--memory-gib G] [--isolation]

Both sides run in ONE process on the same random-init model (re-created from the same
seed for each side), the same synthetic pre-tokenized rows (log-normal lengths, same
seed), packed (bfd) to the same length, with the same effective batch, learning rate
and schedule. Only what the speed levers change differs (speed.py; overrides through
$SFTJOB_SPEED, e.g. '{"flexAttention": "off"}' to measure one lever).

- reference: per_device 2, accumulation 8, packing to 2048, bf16 on GPU, TRL defaults
  (gradient checkpointing on), SDPA attention.
- sftjob: the same job as an SFTJob spec, through the trainer's own code path
  (config_map.build_sft_config + speed.plan_speed), so it measures what a pod runs.

Prints one JSON line per side on stdout: side, case, tokens_per_s (timed after the first
steps), mfu (6 x params x tokens/s over the card's bf16 peak; null on CPU), peak_mem_gib
(torch's peak reserved memory, close to nvidia-smi), losses (one per log: every step
unless --logging-steps says otherwise) and settings.
Everything else (trainer logs, speed decisions) goes to stderr.

`--case reference-job` is the end-to-end bench instead (also `reference-job-lora`, with LoRA
adapters; `long-job`, on 2.5 times the rows; and their CPU smokes `reference-job-cpu-smoke`,
`reference-job-lora-cpu-smoke`): each side in its own process, from process start to the
final model saved (e2e.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The cards' dense bf16 peaks and MFU's definition, shared with the trainer's progress report.
from sftjob_trainer.flops import model_flops_utilization, peak_flops
from sftjob_trainer.levers.compile_model import ENV_COMPILE_REGIONS

from . import e2e
from .common import LORA_SPEC, QWEN25_15B, TINY, cap_gpu_memory, make_callback
from .e2e import E2E_CASES

log = logging.getLogger("sftjob_bench.bench")

SEED = 42
PAD, EOS = 0, 1


@dataclass(frozen=True)
class Case:
    name: str
    shape: dict[str, Any]
    method: str  # full | lora
    max_length: int
    median_tokens: int
    learning_rate: float


CASES = {
    "full": Case("full", QWEN25_15B, "full", 2048, 500, 2e-5),
    "lora": Case("lora", QWEN25_15B, "lora", 2048, 500, 2e-4),
    "cpu-smoke": Case("cpu-smoke", TINY, "full", 256, 60, 2e-4),
}
REFERENCE_PER_DEVICE, REFERENCE_ACCUMULATION = 2, 8


def synthetic_rows(case: Case, rows: int, seed: int = 1) -> list[list[int]]:
    """Pre-tokenized rows: log-normal lengths around the median, Zipf-distributed ids.

    Zipf ids give the model something to learn (the unigram distribution), so the loss
    curve falls and two runs can be compared by their curves, not only their first loss.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = int(case.shape["vocab_size"])
    lengths = rng.lognormal(math.log(case.median_tokens), 0.6, rows).astype(int)
    lengths = np.clip(lengths, 16, case.max_length)
    out = []
    for length in lengths:
        ids = (rng.zipf(1.3, int(length) - 1) + 1) % (vocab - 2) + 2  # 0 pad, 1 eos
        out.append([*ids.tolist(), EOS])
    return out


def rows_needed(case: Case, steps: int, effective: int) -> int:
    mean = case.median_tokens * math.exp(0.6**2 / 2)
    return int(steps * effective * case.max_length / mean * 1.3) + 2 * effective


def fingerprint(rows: list[list[int]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()[:16]


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2}
    fast = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=fast, pad_token="<pad>", eos_token="<eos>")


def job_manifest(
    case: Case,
    steps: int,
    model: Path,
    output: Path,
    gpus: int,
    extra_args: dict[str, Any] | None = None,
    logging_steps: int = 1,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"path": str(model)},
        "dataset": {"path": "/synthetic.jsonl", "format": "text"},  # rows come in memory
        "method": case.method,
        "training": {
            "perDeviceTrainBatchSize": REFERENCE_PER_DEVICE,
            "gradientAccumulationSteps": REFERENCE_ACCUMULATION,
            "maxSteps": steps,
            "learningRate": case.learning_rate,
            "maxLength": case.max_length,
            "packing": True,
            "loggingSteps": logging_steps,
            "saveSteps": 1_000_000,
            "seed": SEED,
            "extraArgs": extra_args or {},
        },
        "resources": {"gpusPerNode": gpus},
        "output": {"path": str(output)},
    }
    if case.method == "lora":
        spec["lora"] = dict(LORA_SPEC)
    if gpus:
        # The steady state of a LONG job: its few steps are a window of one, and under
        # "auto" a run this short would not compile (compile_model.short_cold_run).
        spec["training"]["speed"] = {"compile": "on"}
    return {
        "apiVersion": "tuning.sftjob.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": f"bench-{case.name}", "namespace": "default"},
        "spec": spec,
    }


def compile_as_a_long_job(env: MutableMapping[str, str]) -> None:
    """The steady state of a LONG job on a GPU: beyond the ~75M tokens per GPU where
    `compile: auto` compiles the whole model (advice.WHOLE_OVER_REGIONAL_TOKENS). The few
    steps the bench runs would, planned by their own size, compile only the decoder layers
    (compile_model.compile_form): session 20's first call measured those for the full case
    by mistake. A form the environment sets (the GPU stages fullreg, fullvw) is kept."""
    env.setdefault(ENV_COMPILE_REGIONS, "off")


def trainer_config(
    case: Case,
    steps: int,
    model: Path,
    output: Path,
    gpus: int,
    extra_args: dict[str, Any] | None = None,
    logging_steps: int = 1,
) -> Any:
    from sftjob_operator.api import parse_sftjob
    from sftjob_operator.trainer_config import build_trainer_config
    from sftjob_trainer.settings import parse_config

    job = parse_sftjob(job_manifest(case, steps, model, output, gpus, extra_args, logging_steps))
    return parse_config(build_trainer_config(job))


def isolation_check(
    attn: str, device: str = "cpu", lengths: tuple[int, ...] = (37, 81, 20, 5)
) -> dict[str, Any]:
    """Logits of a packed padding-free row against each document run alone (fp32).

    `max_abs_diff` must be at fp32 noise; `leak_if_unmasked` is the same comparison with
    the position_ids dropped, to show the check would notice a lost document mask.
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**{**TINY, "vocab_size": 512, "max_position_embeddings": 1024})
    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
        generator = torch.Generator(device).manual_seed(1)
        docs = [torch.randint(0, 512, (n,), generator=generator, device=device) for n in lengths]
        ids = torch.cat(docs)[None]
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        # No attention_mask and no cache: the padding-free training path.
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        worst, start = 0.0, 0
        for doc in docs:
            alone = model(input_ids=doc[None], use_cache=False).logits[0]
            worst = max(worst, (alone - packed[start : start + len(doc)]).abs().max().item())
            start += len(doc)
        leaked = model(input_ids=ids, use_cache=False).logits[0]
    return {
        "check": "packed_isolation",
        "attn_implementation": model.config._attn_implementation,
        "device": device,
        "max_abs_diff": worst,
        "leak_if_unmasked": (leaked - packed).abs().max().item(),
    }


def make_profiler(start_step: int, steps: int, report: Path) -> Any:
    """Profiles `steps` optimizer steps after `start_step`; writes the top kernels to `report`."""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.profiler: Any = None
            self.started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == start_step:
                self.profiler = torch.profiler.profile(
                    activities=[
                        torch.profiler.ProfilerActivity.CPU,
                        torch.profiler.ProfilerActivity.CUDA,
                    ]
                )
                torch.cuda.synchronize()
                self.started = time.monotonic()
                self.profiler.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.profiler is not None and state.global_step == start_step + steps:
                torch.cuda.synchronize()
                self.profiler.__exit__(None, None, None)
                table = self.profiler.key_averages().table(
                    sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90
                )
                # The wall time beside the kernels' time says how much the GPU idled.
                wall = time.monotonic() - self.started
                report.write_text(f"wall time of the {steps} profiled steps: {wall:.3f} s\n{table}")
                self.profiler = None

    return Profile()


def make_sync_report(
    start_step: int, steps: int, report: Path, set_mode: Callable[[str], None] | None = None
) -> Any:
    """Records every host-device sync in `steps` whole steps after `start_step` (GPU).

    torch's sync debug mode warns at each synchronizing CUDA call; each distinct call stack
    is written to `report` with how many times it synced. A sync makes the host wait for
    the GPU's whole queue, after which the GPU idles until the host queues work again.
    The window opens at the end of step `start_step`, so it holds `steps` of each part of
    a step: the log after a step, the next step's batch fetch (transformers fetches
    before on_step_begin), its micro-steps and its optimizer step. It closes at the end
    of step `start_step + steps`, or at the end of training if that comes first.
    `set_mode` switches torch's mode (torch.cuda.set_sync_debug_mode unless given).
    """
    import traceback
    import warnings

    import torch
    from transformers import TrainerCallback

    switch = set_mode or torch.cuda.set_sync_debug_mode

    class SyncReport(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.stacks: dict[str, int] = {}
            self.saved: Any = None
            self.filters: Any = None

        def record(self, message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            if "synchronizing" not in str(message):
                return self.saved(message, category, *args, **kwargs)
            frames = [
                frame
                for frame in traceback.extract_stack(limit=16)
                if not frame.filename.endswith("warnings.py") and frame.name != "record"
            ]
            stack = "".join(traceback.format_list(frames[-12:]))
            self.stacks[stack] = self.stacks.get(stack, 0) + 1
            return None

        def open(self) -> None:
            switch("warn")  # before the hook, so switching is not counted as a sync
            self.saved, self.filters = warnings.showwarning, warnings.filters[:]
            # Every sync, not only the first from each line; other warnings as before.
            warnings.filterwarnings("always", message=".*synchronizing")
            warnings.showwarning = self.record

        def close(self) -> None:
            switch("default")
            warnings.showwarning, warnings.filters[:] = self.saved, self.filters
            self.saved = None
            ranked = sorted(self.stacks.items(), key=lambda item: -item[1])
            lines = [f"{sum(self.stacks.values())} syncs in {steps} steps\n"]
            lines += [f"--- {count} times:\n{stack}" for stack, count in ranked]
            report.write_text("\n".join(lines))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.saved is None and state.global_step == start_step:
                self.open()
            elif self.saved is not None and state.global_step == start_step + steps:
                self.close()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.saved is not None:
                self.close()

    return SyncReport()


def run_side(
    side: str,
    case: Case,
    steps: int,
    rows: list[list[int]],
    work: Path,
    skip: int,
    profile: Path | None = None,
    sync_every_step: bool = False,
    extra_args: dict[str, Any] | None = None,
    logging_steps: int = 1,
    syncs: Path | None = None,
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from sftjob_trainer.config_map import build_sft_config
    from sftjob_trainer.model import lora_config
    from sftjob_trainer.speed import plan_speed
    from transformers import AutoModelForCausalLM, Qwen2Config
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available() and case.name != "cpu-smoke"
    device = "cuda" if cuda else "cpu"
    model_dir = work / "model-config"
    config = Qwen2Config(**case.shape, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    config.save_pretrained(model_dir)  # the speed plan sizes batches from config.json
    extra = extra_args if side == "sftjob" else None
    job = trainer_config(
        case, steps, model_dir, work / side, 1 if cuda else 0, extra, logging_steps
    )
    ours = build_sft_config(job, speed=None)  # to copy lr/schedule/warmup to the reference
    speed = None
    if side == "sftjob":
        if cuda:
            compile_as_a_long_job(os.environ)
        speed = plan_speed(job)
        args = build_sft_config(job, speed=speed)
        attn = speed.model_updates.get("attnImplementation") or "sdpa"
    else:
        args = SFTConfig(
            output_dir=str(work / side),
            per_device_train_batch_size=REFERENCE_PER_DEVICE,
            gradient_accumulation_steps=REFERENCE_ACCUMULATION,
            max_length=case.max_length,
            packing=True,
            bf16=cuda,
            use_cpu=not cuda,
            learning_rate=ours.learning_rate,
            lr_scheduler_type=ours.lr_scheduler_type,
            warmup_steps=ours.warmup_steps,
            max_steps=steps,
            logging_steps=logging_steps,
            save_strategy="no",
            report_to="none",
            seed=SEED,
            disable_tqdm=True,
        )
        attn = "sdpa"
    args.save_strategy = "no"

    with torch.device(device):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn, dtype=torch.float32
        )
    params = sum(p.numel() for p in model.parameters())
    peft = lora_config(job.resolved.get("lora"))
    ref: dict[str, Any] = {}
    meter = make_callback(ref, cuda, skip, sync_every_step)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(SEED)  # LoRA init and dropout draw the same numbers on both sides
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        processing_class=tokenizer(),
        peft_config=peft,
        callbacks=[meter]
        + ([make_profiler(skip, 2, profile / f"profile-{side}.txt")] if profile and cuda else [])
        + ([make_sync_report(skip, 2, syncs / f"syncs-{side}.txt")] if syncs and cuda else []),
    )
    ref["trainer"] = trainer
    if speed is not None:
        speed.apply(trainer)
    with contextlib.redirect_stdout(sys.stderr):  # Trainer's printer callback
        trainer.train()

    marks = meter.marks
    first = min(skip, len(marks) - 2)
    (t0, n0), (t1, n1) = marks[first], marks[-1]
    # Untimed: the first steps, where torch.compile (when on) compiles; reported, not hidden.
    untimed_s = t0 - marks[0][0]
    tokens_per_s = (n1 - n0) / (t1 - t0) if t1 > t0 else None
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_flops(name if cuda else None)
    checkpointing = bool(
        getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing
    )
    result = {
        "side": side,
        "case": case.name,
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        "mfu": model_flops_utilization(params, tokens_per_s, peak),
        "peak_mem_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "losses": meter.losses,
        # Tokens trained on over all steps (padding excluded): both sides see the same data,
        # so this must be equal on both sides.
        "tokens_total": marks[-1][1],
        "untimed_s": round(untimed_s, 1),
        "settings": {
            "device": name,
            "params": params,
            "method": case.method,
            "per_device": args.per_device_train_batch_size,
            "accumulation": args.gradient_accumulation_steps,
            "effective_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps,
            "max_length": args.max_length,
            "packing": f"{args.packing_strategy}" if args.packing else "off",
            "padding_free": bool(getattr(trainer, "padding_free", False)),
            "attn_implementation": trainer.model.config._attn_implementation,
            "gradient_checkpointing": checkpointing,
            "bf16": bool(args.bf16),
            "use_liger_kernel": bool(args.use_liger_kernel),
            "torch_compile": bool(args.torch_compile),
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": str(
                getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
            ),
            "warmup_steps": args.warmup_steps,
            "seed": args.seed,
            "steps": trainer.state.global_step,
            "timed_steps": len(marks) - 1 - first,
            "data_rows": len(rows),
            "data_sha": fingerprint(rows),
            "packed_rows": len(trainer.train_dataset),
            "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "speed": speed.summary() if speed else None,
            "extra_args": extra,
            "sync_every_step": sync_every_step,
            "logging_steps": args.logging_steps,
            # Dynamo graphs after the first step and at the end (compile on: equal = no
            # recompiles; counted since the process started).
            "compiled_graphs": [meter.graphs[0], meter.graphs[-1]] if meter.graphs else None,
        },
    }
    del trainer, model, ref
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    import subprocess

    from .big_cases import wants  # the larger-model cases: each side its own processes

    if wants(sys.argv[1:] if argv is None else argv):
        big = [sys.executable, "-m", "sftjob_bench.big", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.call(big)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES) + sorted(E2E_CASES), required=True)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--skip", type=int, default=None, help="steps not timed (default 5; 1 on CPU)"
    )
    parser.add_argument("--sides", default="reference,sftjob")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--isolation", action="store_true", help="first check packed isolation (sdpa, flex)"
    )
    parser.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        help="act as if the GPU had this much memory (both sides capped; the speed plan "
        "sizes batches for it), e.g. 80 to run an H100's plan on an H200",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="folder for a kernel profile of two steps after the untimed ones (GPU only)",
    )
    parser.add_argument(
        "--syncs",
        type=Path,
        default=None,
        help="folder for the call stacks of every host-GPU sync in two steps after the "
        "untimed ones (GPU only; slows those steps)",
    )
    parser.add_argument(
        "--sync-every-step",
        action="store_true",
        help="synchronise CUDA at every step end (how runs before 2026-11-28 09:30 timed)",
    )
    parser.add_argument(
        "--logging-steps",
        type=int,
        default=1,
        help="log (and read the loss back from the GPU) every N steps, both sides; "
        "the losses printed are those logs",
    )
    parser.add_argument(
        "--extra-args",
        type=json.loads,
        default=None,
        help="JSON object of SFTConfig settings for the sftjob side only (spec.training."
        'extraArgs), e.g. \'{"torch_compile_mode": "reduce-overhead"}\'',
    )
    parser.add_argument(
        "--side-gpus",
        default=None,
        help="end-to-end cases: run the sides at once, each on its own GPU (e.g. 0,1)",
    )
    parser.add_argument(
        "--max-steps-reference",
        type=int,
        default=0,
        help="end-to-end cases: stop the reference side after N steps and extrapolate its "
        "whole job from its own step time (for a device call too short for all of it)",
    )
    parser.add_argument(
        "--max-steps-sftjob",
        type=int,
        default=0,
        help="end-to-end cases: stop the sftjob side after N steps (e.g. a job that only "
        "fills the shared compile cache for the next job of its shape), extrapolated alike",
    )
    parser.add_argument(
        "--sftjob-output",
        default="sftjob",
        help="end-to-end cases: the sftjob side's output folder under the workdir (another "
        "name is another job: inductor's kernels there start cold, the shared compile "
        "cache under $HF_HOME is what a warm start then uses)",
    )
    args = parser.parse_args(argv)
    if args.memory_gib and args.case not in E2E_CASES:
        cap_gpu_memory(args.memory_gib)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if args.case in E2E_CASES:
        if args.memory_gib:  # each side's process caps itself; this one leaves the GPU alone
            os.environ[e2e.ENV_MEMORY_GIB] = str(args.memory_gib)
        sides = [s.strip() for s in args.sides.split(",") if s.strip()]
        gpus = args.side_gpus.split(",") if args.side_gpus else None
        if gpus is not None and len(gpus) != len(sides):
            parser.error("--side-gpus needs one GPU per side")
        work = args.workdir or Path(tempfile.mkdtemp(prefix=f"sftjob-bench-{args.case}-"))
        e2e.run(
            args.case,
            sides,
            work,
            gpus,
            args.max_steps_reference,
            args.sftjob_output,
            args.max_steps_sftjob,
            args.extra_args,
        )
        return 0
    case = CASES[args.case]
    skip = args.skip if args.skip is not None else (1 if case.name == "cpu-smoke" else 5)
    if args.steps <= skip:
        parser.error(f"--steps must be larger than the {skip} untimed steps")
    effective = REFERENCE_PER_DEVICE * REFERENCE_ACCUMULATION
    rows = synthetic_rows(case, rows_needed(case, args.steps, effective))
    if args.isolation:
        import torch

        device = "cuda" if torch.cuda.is_available() and case.name != "cpu-smoke" else "cpu"
        for attn in ("sdpa", "flex_attention"):
            print(json.dumps(isolation_check(attn, device)), flush=True)
    for folder in (args.profile, args.syncs):
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"sftjob-bench-{case.name}-"))
    for side in [s.strip() for s in args.sides.split(",") if s.strip()]:
        if side not in ("reference", "sftjob"):
            parser.error(f"unknown side {side!r}")
        started = time.monotonic()
        result = run_side(
            side,
            case,
            args.steps,
            rows,
            work,
            skip,
            args.profile,
            args.sync_every_step,
            args.extra_args,
            args.logging_steps,
            args.syncs,
        )
        result["settings"]["wall_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
