"""End to end: each side in its own fresh process, from process start to the final model saved.

    python -m sftjob_bench.bench --case reference-job [--sides reference,sftjob]
                                 [--side-gpus 0,1] [--workdir DIR] [--max-steps-reference N] [--max-steps-sftjob N]

The steady-state bench (bench.py) times the steps after the first five, in one process.
What a user waits for is the whole job: Python and the libraries starting, the model
loading, the data being tokenized and packed, torch.compile, training, and the model
written out. Here each side is a NEW Python process (`python -m sftjob_bench.e2e --child`),
so nothing one side loaded, compiled or cached in memory helps the other; each also gets
an empty datasets cache (HF_DATASETS_CACHE), so each reads, tokenizes and packs the rows.

- reference: the seed's snippet as written (seed-notes.md "The reference's example job"):
  `SFTTrainer(model=<path>, train_dataset=<the rows>, args=SFTConfig(max_length=2048,
  packing=True, per_device_train_batch_size=2, gradient_accumulation_steps=8,
  num_train_epochs=3, learning_rate=2e-4, logging_steps=10, bf16=True, report_to="none"))`,
  `train()`, `save_model()`. Everything else is TRL's default (float32 weights, gradient
  checkpointing on, linear schedule without warm-up, SDPA).
- sftjob: the same job as an SFTJob spec (the snippet's settings, plus the linear schedule
  without warm-up that TRL defaults to, so both sides follow the same learning rates),
  through the trainer's own build (train.build_trainer: the checks, the speed plan, the
  data preparation, the model load, the levers), then `train()` and train.py's own ending
  (`save_outputs`: the final model linked from the last checkpoint, the tokenizer, the
  model card).

The model (random init of the case's shape, saved in bf16 as the hub's Qwen2.5 checkpoint
is, with a byte-level BPE tokenizer) and the text rows are written once into the work
folder before either side starts; both sides read the same files.

Each side prints one JSON line: `wall_s` (the parent's clock from just before it started
the process to the process gone: the sftjob side leaves as the pod's worker does, as soon
as its line is out, and the reference as a script does; `exit_s` is the part after the
model was saved), `phases` (startup: interpreter and imports; model_load;
data_preparation: the rest of building the trainer, which tokenizes and packs;
first_step: from `train()` to the first optimizer step's end, compile included;
training: first to last step's end; save), `model_loaded_to_first_step_s` (the warm-start
figure), `tokens_per_s_e2e` (tokens trained on over `wall_s`) beside the
steady-state `tokens_per_s` (after the first `skip` steps), the losses logged and the
settings. `preparation` splits data_preparation by the step of building the trainer that
spent it (PREPARATION_STEPS: each step's calls less the timed calls inside them, and
`other_s` the rest, so they add up to data_preparation); on the sftjob side,
`preparation_levers` gives each lever's self-check and `apply` (parts of
speed_self_checks_s and levers_apply_s).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Both torch-free leaves: this parent process never imports torch (each side is its own).
from sftjob_trainer.flops import peak_flops
from sftjob_trainer.levers.compile_cache import OUTPUT_CACHE_ROOT
from sftjob_trainer.levers.device_memory import ENV_MEMORY_GIB

from .common import LORA_SPEC, word

log = logging.getLogger("sftjob_bench.e2e")

# Capybara-like row lengths. Sources: the trl-lib/Capybara dataset card gives 15,806
# training conversations in 71,908,734 bytes (4,549 bytes a row, about 1,100 tokens at
# about 4 bytes a token for English BPE), and LDJnr/Capybara's card "average context
# length per conversation is over 1,000 tokens and 3 turns or more". The spread (a
# log-normal with sigma 0.7) is an assumption: no published percentile was found.
CAPYBARA_MEAN_TOKENS = 1100
CAPYBARA_SIGMA = 0.7


@dataclass(frozen=True)
class E2ECase:
    name: str
    shape: str  # a shape of bench.py: QWEN25_15B or TINY
    rows: int
    mean_tokens: int
    max_length: int
    per_device: int
    accumulation: int
    epochs: float
    learning_rate: float
    logging_steps: int
    skip: int  # steps before the steady-state window
    method: str = "full"  # or "lora": common.LORA_SPEC's adapters, the snippet's LoraConfig


# The seed's job at its real size on the Qwen2.5-1.5B shape.
REFERENCE_JOB = E2ECase(
    "reference-job", "QWEN25_15B", 1000, CAPYBARA_MEAN_TOKENS, 2048, 2, 8, 3.0, 2e-4, 10, 5
)
# The same harness in seconds on a CPU: tiny shape, few and short rows.
CPU_SMOKE = E2ECase("reference-job-cpu-smoke", "TINY", 160, 60, 256, 2, 8, 1.0, 2e-4, 1, 1)
E2E_CASES = {
    case.name: case
    for case in (
        REFERENCE_JOB,
        # The same job on 2.5 times the rows (7.4M tokens per GPU, 228 steps): over the
        # ~3-4M after which the varlen kernel in compiled decoder layers beats the
        # uncompiled defaults, so compile: auto's choice for such jobs is measured on one.
        replace(REFERENCE_JOB, name="long-job", rows=2500),
        # The same job with LoRA adapters (rank 16, every linear layer): since session 20
        # the decoder layers of a LoRA run over ~1.0M tokens per GPU compile under auto
        # (this one: at most 6.2M), against the snippet with a peft LoraConfig.
        replace(REFERENCE_JOB, name="reference-job-lora", method="lora"),
        CPU_SMOKE,
        replace(CPU_SMOKE, name="reference-job-lora-cpu-smoke", method="lora"),
    )
}


def row_lengths(rows: int, mean_tokens: float, sigma: float, seed: int = 1) -> list[int]:
    """Log-normal token counts with the given mean (median = mean / exp(sigma^2 / 2))."""
    rng = random.Random(seed)
    median = mean_tokens / math.exp(sigma**2 / 2)
    return [max(8, int(rng.lognormvariate(math.log(median), sigma))) for _ in range(rows)]


def write_rows(path: Path, tokenizer: Any, lengths: list[int], seed: int = 2) -> dict[str, Any]:
    """Text rows of about the given token counts; returns their real token statistics."""
    rng = random.Random(seed)
    sample = " ".join(word(rng) for _ in range(2000))
    per_word = len(tokenizer(sample)["input_ids"]) / 2000  # this tokenizer's tokens per word
    counts = []
    with path.open("w") as out:
        for length in lengths:
            text = " ".join(word(rng) for _ in range(max(2, round(length / per_word))))
            counts.append(len(tokenizer(text)["input_ids"]))
            out.write(json.dumps({"text": text}) + "\n")
    counts.sort()
    return {
        "rows": len(counts),
        "tokens_mean": round(sum(counts) / len(counts), 1),
        "tokens_median": counts[len(counts) // 2],
        "tokens_p90": counts[int(len(counts) * 0.9)],
        "tokens_max": counts[-1],
        "tokens_total": sum(counts),
        "source": "trl-lib/Capybara card (15,806 rows, 71.9 MB: ~1,100 tokens a row), "
        "LDJnr/Capybara card (over 1,000 tokens a conversation); log-normal spread assumed",
    }


def prepare_inputs(case: E2ECase, work: Path) -> dict[str, Any]:
    """The model, tokenizer and rows both sides read; written once per work folder."""
    from . import common
    from .common import build_model

    marker = work / "inputs.json"
    if marker.is_file():
        facts: dict[str, Any] = json.loads(marker.read_text())
        if facts.get("case") == asdict(case):
            return facts
    from transformers import AutoTokenizer

    work.mkdir(parents=True, exist_ok=True)
    params = build_model(work / "model", getattr(common, case.shape))
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    lengths = row_lengths(case.rows, case.mean_tokens, CAPYBARA_SIGMA)
    data = write_rows(work / "rows.jsonl", tokenizer, lengths)
    facts = {"case": asdict(case), "params": params, "data": data}
    marker.write_text(json.dumps(facts))
    return facts


def job_manifest(
    case: E2ECase,
    work: Path,
    output: Path,
    gpus: int,
    extra_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The snippet's job as an SFTJob (with TRL's schedule, so the learning rates match);
    `extra_args` becomes its spec.training.extraArgs (a setting tried on our side only)."""
    adapters = {"lora": dict(LORA_SPEC)} if case.method == "lora" else {}
    extra = {"extraArgs": dict(extra_args)} if extra_args else {}
    return {
        "apiVersion": "tuning.sftjob.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": case.name, "namespace": "default"},
        "spec": {
            "model": {"path": str(work / "model")},
            "dataset": {"path": str(work / "rows.jsonl"), "format": "text"},
            "method": case.method,
            **adapters,
            "training": {
                "perDeviceTrainBatchSize": case.per_device,
                "gradientAccumulationSteps": case.accumulation,
                "numTrainEpochs": case.epochs,
                "learningRate": case.learning_rate,
                "lrSchedulerType": "linear",
                "warmupRatio": 0.0,
                "maxLength": case.max_length,
                "packing": True,
                "bf16": gpus > 0,
                "loggingSteps": case.logging_steps,
                "saveSteps": 1_000_000,  # TRL's default (500) saves nothing in this job either
                "seed": 42,
                **extra,
            },
            "resources": {"gpusPerNode": gpus},
            "output": {"path": str(output)},
        },
    }


class Clock:
    """Marks since the process started (the parent's `spawned_at`, wall-clock seconds)."""

    def __init__(self, spawned_at: float) -> None:
        self.spawned_at = spawned_at
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> float:
        self.marks[name] = time.time() - self.spawned_at
        return self.marks[name]


MODEL_LOAD = "model_load"  # the loader's bucket: its own phase, not a part of preparation


class Stopwatch:
    """Seconds spent in wrapped calls, by bucket, each call less the wrapped calls inside it
    (a step's own time, whatever it calls of another step: they add up without overlap).

    `detail` buckets (a lever's self-check inside the plan's) are noted apart and are not
    taken out of the call around them.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.own: defaultdict[str, float] = defaultdict(float)
        self.detail: defaultdict[str, float] = defaultdict(float)
        # (start, end) of each call, by bucket, on `clock`: where the model load lay.
        self.spans: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)
        self._inner = threading.local()  # per thread: the nested calls' time, innermost last

    def _stack(self) -> list[float]:
        if not hasattr(self._inner, "stack"):
            self._inner.stack = []
        stack: list[float] = self._inner.stack
        return stack

    def timing(self, function: Any, bucket: Any, *, detail: bool = False) -> Any:
        """`function`, timed into `bucket` (a name, or a function of the call's arguments).

        The wrapper keeps the function's signature (functools.wraps): the trainer reads
        the signatures of what it relies on and would take another path for `*args`.
        """

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            name = bucket(*args, **kwargs) if callable(bucket) else bucket
            stack = self._stack()
            if not detail:
                stack.append(0.0)
            started = self.clock()
            try:
                return function(*args, **kwargs)
            finally:
                ended = self.clock()
                spent = ended - started
                self.spans[name].append((started, ended))
                if detail:
                    self.detail[name] += spent
                else:
                    self.own[name] += spent - stack.pop()
                    if stack:
                        stack[-1] += spent

        return timed

    @contextlib.contextmanager
    def wrapping(self, targets: list[tuple[Any, str, Any, bool]]) -> Iterator[None]:
        """Each (owner, attribute, bucket, detail) timed while the block runs, then restored."""
        restore = []
        for owner, name, bucket, detail in targets:
            # A class's method may be inherited: put back exactly what its own dict held.
            own = vars(owner).get(name) if isinstance(owner, type) else getattr(owner, name)
            restore.append((owner, name, own))
            setattr(owner, name, self.timing(getattr(owner, name), bucket, detail=detail))
        try:
            yield
        finally:
            for owner, name, own in reversed(restore):
                if own is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, own)

    def preparation(self, data_preparation_s: float) -> dict[str, float]:
        """The buckets but the model load's, and `other_s`: data_preparation's remainder."""
        steps = {name: spent for name, spent in self.own.items() if name != MODEL_LOAD}
        other = data_preparation_s - sum(steps.values())
        return {name: round(spent, 2) for name, spent in {**steps, "other_s": other}.items()}


def preparation_steps(side: str) -> list[tuple[Any, str, Any, bool]]:
    """What each side's build calls, as Stopwatch targets: (owner, attribute, bucket, detail).

    The sftjob side: the job's config (spec to TrainerConfig); the pre-flight (preflight.py)
    step by step (the speed plan's device, model config and lever self-checks apart);
    SFTTrainer's own set-up, its tokenizing and packing (TRL's _prepare_dataset, each
    call) and the count of rows over maxLength around it; the levers applied to the
    trainer. The reference: its dataset load, its SFTConfig, SFTTrainer's set-up and its
    tokenizing and packing.
    """
    import datasets
    import trl
    import trl.trainer.sft_trainer as trl_sft

    common = [
        (trl.SFTConfig, "__init__", "sft_config_s", False),
        (trl.SFTTrainer, "__init__", "trainer_init_s", False),
        (trl.SFTTrainer, "_prepare_dataset", "tokenize_pack_s", False),
    ]
    if side == "reference":
        return [
            (datasets, "load_dataset", "rows_s", False),
            (trl_sft, "create_model_from_path", MODEL_LOAD, False),
            *common,
        ]
    import sftjob_operator.api as api
    import sftjob_operator.trainer_config as trainer_config
    from sftjob_trainer import preflight, prepared_rows, settings, speed
    from sftjob_trainer import train as product_train

    switch_of = {id(lever.CONTRACT): lever.SWITCH for lever in speed.LEVERS}

    def self_check(contract: Any, *args: Any, **kwargs: Any) -> str:
        return f"self_check:{switch_of.get(id(contract), '?')}"

    return [
        (api, "parse_sftjob", "job_config_s", False),
        (trainer_config, "build_trainer_config", "job_config_s", False),
        (settings, "parse_config", "job_config_s", False),
        (product_train, "prepare", "preflight_checks_s", False),  # what the rest leaves
        (preflight, "plan_speed", "speed_plan_s", False),
        (speed, "detect_hardware", "speed_hardware_s", False),
        (speed, "model_config", "speed_model_config_s", False),
        (speed, "self_checks", "speed_self_checks_s", False),
        (speed, "check", self_check, True),
        (preflight, "build_sft_config", "sft_config_s", False),
        (preflight, "fetch_dataset", "rows_s", False),
        (preflight, "prepare_dataset", "rows_s", False),
        (preflight, "split_eval", "rows_s", False),
        (preflight, "load_tokenizer", "tokenizer_s", False),
        (preflight, "check_chat_template", "chat_template_s", False),
        (product_train, "load_model", MODEL_LOAD, False),
        *common,
        (prepared_rows, "prepare_counting", "row_counts_s", False),
        (speed.SpeedPlan, "apply", "levers_apply_s", False),
        *[(lever, "apply", f"apply:{lever.SWITCH}", True) for lever in speed.APPLIED],
    ]


def lever_details(detail: dict[str, float]) -> dict[str, dict[str, float]]:
    """The detail buckets by kind ("self_check", "apply"), each lever's seconds."""
    out: dict[str, dict[str, float]] = {}
    for name, spent in sorted(detail.items()):
        kind, _, lever = name.partition(":")
        out.setdefault(kind, {})[lever] = round(spent, 3)
    return out


def phases_from(marks: dict[str, float]) -> dict[str, float]:
    """The phases from the clock's marks (seconds since the process started).

    Both sides load the model inside building the trainer; the rest of building it
    (reading, tokenizing and packing the rows, the speed plan) is data preparation.
    """
    model_load = marks["model_loaded"] - marks["model_load_began"]
    return {
        "startup_s": round(marks["imported"], 2),
        "model_load_s": round(model_load, 2),
        "data_preparation_s": round(data_preparation_s(marks), 2),
        "first_step_s": round(marks["first_step"] - marks["train_begin"], 2),
        "training_s": round(marks["train_end"] - marks["first_step"], 2),
        "save_s": round(marks["saved"] - marks["train_end"], 2),
    }


def data_preparation_s(marks: dict[str, float]) -> float:
    """Building the trainer less its model load (unrounded: the preparation splits it)."""
    model_load = marks["model_loaded"] - marks["model_load_began"]
    return marks["built"] - marks["imported"] - model_load


def stop_after(steps: int) -> Any:
    """Stops training after `steps` optimizer steps, keeping the whole job's schedule.

    Setting max_steps instead would squeeze the learning-rate schedule into the capped
    steps (other learning rates, other losses). The stop saves a checkpoint, as the whole
    job's last step does (transformers saves there with step-based saving), so the save
    phase is the one the whole job would have.
    """
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step >= steps:
                control.should_training_stop = True
                control.should_save = True

    return StopAfter()


def first_step_sync(side: str, clock: Clock) -> Any:
    """A callback that waits for the GPU at the first step's end, so that mark is real, and
    says the warm-start figure at once on stderr: a side that the call's time limit cuts
    before its JSON line still leaves it (session 14 lost two warm starts that way)."""
    import torch
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step != 1:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            print(first_step_note(side, clock), file=sys.stderr, flush=True)

    return FirstStep()


def first_step_note(side: str, clock: Clock) -> str:
    """'e2e sftjob: first optimizer step done 41.2 s after start; model loaded to first step
    22.9 s; train() to first step 9.1 s' (the clock's marks so far)."""
    done = time.time() - clock.spawned_at
    marks = clock.marks
    parts = [f"e2e {side}: first optimizer step done {done:.1f} s after start"]
    if "model_loaded" in marks:
        parts.append(f"model loaded to first step {done - marks['model_loaded']:.1f} s")
    if "train_begin" in marks:
        parts.append(f"train() to first step {done - marks['train_begin']:.1f} s")
    return "; ".join(parts)


def args_epochs(trainer: Any) -> float:
    return float(trainer.args.num_train_epochs)


def uncapped_steps(trainer: Any) -> int:
    """The optimizer steps of the whole job on one process, as transformers counts them."""
    args = trainer.args
    batches = math.ceil(len(trainer.train_dataset) / args.per_device_train_batch_size)
    accumulation = args.gradient_accumulation_steps
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return math.ceil(per_epoch * args.num_train_epochs)


def build_reference(case: E2ECase, work: Path, cuda: bool) -> Any:
    """The seed's snippet: the model by path, TRL's defaults for everything it does not set."""
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    dataset = load_dataset("json", data_files=str(work / "rows.jsonl"), split="train")
    args = SFTConfig(
        output_dir=str(work / "reference"),
        max_length=case.max_length,
        packing=True,
        per_device_train_batch_size=case.per_device,
        gradient_accumulation_steps=case.accumulation,
        num_train_epochs=case.epochs,
        learning_rate=case.learning_rate,
        logging_steps=case.logging_steps,
        bf16=cuda,
        use_cpu=not cuda,
        report_to="none",
        disable_tqdm=True,
    )
    peft_config = None
    if case.method == "lora":  # as a user writes it: peft's config, common.LORA_SPEC's values
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    return SFTTrainer(
        model=str(work / "model"), train_dataset=dataset, args=args, peft_config=peft_config
    )


def build_sftjob(
    case: E2ECase,
    work: Path,
    cuda: bool,
    output: Path,
    extra_args: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """The trainer's own build for the SFTJob of the same job, and the job's config."""
    from sftjob_operator.api import parse_sftjob
    from sftjob_operator.trainer_config import build_trainer_config
    from sftjob_trainer.settings import parse_config
    from sftjob_trainer.train import build_trainer

    job = parse_sftjob(job_manifest(case, work, output, 1 if cuda else 0, extra_args))
    config = parse_config(build_trainer_config(job))
    return build_trainer(config), config


def run_child(
    side: str,
    case: E2ECase,
    work: Path,
    spawned_at: float,
    max_steps: int,
    output_name: str,
    extra_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One side, in this (fresh) process; returns its JSON line. `extra_args` (our side
    only) goes into the SFTJob's spec.training.extraArgs."""
    clock = Clock(spawned_at)
    output = work / (output_name if side == "sftjob" else side)
    # Before anything compiles: whether an earlier run left compiled kernels to reuse.
    cache = output / OUTPUT_CACHE_ROOT
    cache_files = sum(1 for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else 0
    if side == "sftjob":
        # As the pod's launcher does before the worker starts: inductor's kernels on the
        # output volume (the planner's own call comes after torch pinned its default).
        from sftjob_trainer.levers.compile_model import keep_compiled_kernels

        keep_compiled_kernels(str(output))
    # Each side's libraries imported before the mark: their import time is startup.
    import torch
    import trl.trainer.sft_trainer  # noqa: F401
    from sftjob_trainer import train  # noqa: F401

    from .common import make_callback

    clock.mark("imported")
    cuda = torch.cuda.is_available() and case.shape != "TINY"
    stopwatch = Stopwatch()
    with stopwatch.wrapping(preparation_steps(side)):
        if side == "reference":
            trainer, config = build_reference(case, work, cuda), None
        else:
            trainer, config = build_sftjob(case, work, cuda, output, extra_args)
    clock.mark("built")
    to_wall = time.time() - time.perf_counter() - spawned_at  # perf_counter -> clock marks
    loads = stopwatch.spans[MODEL_LOAD]
    clock.marks["model_load_began"] = loads[0][0] + to_wall
    clock.marks["model_loaded"] = loads[-1][1] + to_wall
    planned = uncapped_steps(trainer)
    # The job's tokens: each packed row's real tokens, every epoch (for an extrapolation).
    epoch_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    if max_steps > 0:  # a capped side: the same schedule, stopped early (see extrapolate)
        trainer.add_callback(stop_after(max_steps))
    meter = make_callback({"trainer": trainer}, cuda, case.skip)
    trainer.add_callback(first_step_sync(side, clock))
    trainer.add_callback(meter)
    clock.mark("train_begin")
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    clock.marks["first_step"] = meter.marks[1][0] + to_wall
    clock.marks["train_end"] = meter.marks[-1][0] + to_wall
    if side == "sftjob":  # train.py's own ending: final model, tokenizer, model card
        from sftjob_trainer.train import save_outputs

        save_outputs(config, trainer)
    else:  # the snippet's own last line
        trainer.save_model(str(output / "final"))
    if cuda:
        torch.cuda.synchronize()
    clock.mark("saved")
    line = result_line(side, case, trainer, meter, clock, cuda)
    line["preparation"] = stopwatch.preparation(data_preparation_s(clock.marks))
    if side == "sftjob":
        line["preparation_levers"] = lever_details(stopwatch.detail)
        if extra_args:
            line["settings"]["extra_args"] = extra_args
    line["settings"]["planned_steps_uncapped"] = planned
    line["settings"]["planned_tokens_uncapped"] = round(epoch_tokens * args_epochs(trainer))
    if side == "sftjob":
        artifacts = getattr(trainer, "sftjob_compile_cache", None)
        loaded = artifacts is not None and artifacts.loaded_from is not None
        line["compile_cache"] = {
            "dir": str(cache),
            "files_before": cache_files,
            # Kernels left in this output folder, or artifacts loaded (from any folder).
            "warm": cache_files > 0 or loaded,
            "artifacts": artifacts.summary() if artifacts is not None else None,
        }
    return line


def result_line(
    side: str,
    case: E2ECase,
    trainer: Any,
    meter: Any,
    clock: Clock,
    cuda: bool,
) -> dict[str, Any]:
    import torch

    args = trainer.args
    marks = meter.marks
    skip = min(case.skip, len(marks) - 2)
    (t0, n0), (t1, n1) = marks[skip], marks[-1]
    steady = (n1 - n0) / (t1 - t0) if t1 > t0 else None
    tokens = int(marks[-1][1])
    params = sum(p.numel() for p in trainer.model.parameters())
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_flops(name if cuda else None)
    phases = phases_from(clock.marks)
    speed = getattr(trainer, "sftjob_speed_plan", None)
    checkpointing = getattr(args, "activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = args.gradient_checkpointing
    return {
        "side": side,
        "case": case.name,
        "kind": "end_to_end",
        "tokens_per_s": round(steady, 1) if steady else None,
        "mfu": round(6 * params * steady / peak, 4) if peak and steady else None,
        "peak_mem_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "losses": meter.losses,
        "tokens_total": tokens,
        "untimed_s": round(t0 - marks[0][0], 1),
        # Only the parent knows when the process really ended; it fills wall_s in.
        "phases": phases,
        # The warm-start goal's figure: the model in memory to the first step done.
        "model_loaded_to_first_step_s": round(
            clock.marks["first_step"] - clock.marks["model_loaded"], 2
        ),
        "saved_at_s": round(clock.marks["saved"], 2),
        "settings": {
            "device": name,
            "versions": versions(),
            "params": params,
            "method": "full",
            "per_device": int(args.per_device_train_batch_size),
            "accumulation": int(args.gradient_accumulation_steps),
            "effective_batch": int(args.per_device_train_batch_size)
            * int(args.gradient_accumulation_steps),
            "max_length": args.max_length,
            "epochs": args.num_train_epochs,
            "max_steps": args.max_steps,
            "steps": trainer.state.global_step,
            "planned_steps": trainer.state.max_steps,
            "timed_steps": len(marks) - 1 - skip,
            "packed_rows": len(trainer.train_dataset),
            "attn_implementation": trainer.model.config._attn_implementation,
            "gradient_checkpointing": bool(checkpointing),
            "torch_compile": bool(args.torch_compile),
            "bf16": bool(args.bf16),
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": str(
                getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
            ),
            "warmup_steps": args.warmup_steps,
            "logging_steps": args.logging_steps,
            "speed": speed.summary() if speed else None,
            "compiled_graphs": [meter.graphs[0], meter.graphs[-1]] if meter.graphs else None,
        },
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "trl"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    return out


def extrapolate(line: dict[str, Any]) -> dict[str, Any]:
    """A capped side's whole-job figures: the tokens it did not train, at its own rate.

    An estimate, and said so: the job's tokens (its packed rows' tokens times the epochs)
    that the capped run did not reach are priced at the side's own steady tokens/s (after
    its first `skip` steps; the reference compiles nothing, so its steps are alike), and
    added to its measured wall time; the measured phases are kept as measured.
    """
    settings = line["settings"]
    done, planned = int(settings["steps"]), int(settings["planned_steps_uncapped"])
    rate = line.get("tokens_per_s")
    if done >= planned or not rate:
        return {}
    missing = int(settings["planned_tokens_uncapped"]) - int(line["tokens_total"])
    wall = line["wall_s"] + missing / rate
    tokens = line["tokens_total"] + missing
    return {
        "wall_s": round(wall, 1),
        "tokens_total": tokens,
        "tokens_per_s_e2e": round(tokens / wall, 1),
        "steps": planned,
        "method": f"{missing} tokens of {planned - done} more steps priced at this side's "
        f"own steady rate ({rate:,.0f} tokens/s)",
    }


ENV_DATASETS_CACHE = "HF_DATASETS_CACHE"
DATASETS_CACHE = "datasets-cache"


def fresh_datasets_cache(work: Path, side: str) -> Path:
    """An empty datasets cache for one side's run. In a shared one the side that runs
    second found the rows read, tokenized and packed by the first (the same maps of the
    same file: 0.04 s instead of 3.6 s for the reference job's rows on a CPU); a pod
    starts with none."""
    folder = work / DATASETS_CACHE / side
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def spawn(
    side: str,
    case: E2ECase,
    work: Path,
    gpu: str | None,
    max_steps: int,
    output_name: str,
    extra_args: dict[str, Any] | None = None,
) -> tuple[subprocess.Popen[str], float]:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    env[ENV_DATASETS_CACHE] = str(fresh_datasets_cache(work, side))
    spawned_at = time.time()
    command = [sys.executable, "-m", "sftjob_bench.e2e", "--child", side, "--case", case.name]
    command += ["--workdir", str(work), "--spawned-at", repr(spawned_at)]
    command += ["--max-steps", str(max_steps), "--output", output_name]
    if extra_args and side == "sftjob":  # the snippet stays as written
        command += ["--extra-args", json.dumps(extra_args)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    return process, spawned_at


def finish(process: subprocess.Popen[str], spawned_at: float) -> dict[str, Any]:
    out, _ = process.communicate()
    ended = time.time()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"the side's process failed (exit {process.returncode})")
    line = lines[-1]
    line["wall_s"] = round(ended - spawned_at, 2)  # process start to process gone
    line["exit_s"] = round(line["wall_s"] - line["saved_at_s"], 2)  # model saved to gone
    line["tokens_per_s_e2e"] = round(line["tokens_total"] / line["wall_s"], 1)
    if line["settings"]["steps"] < line["settings"]["planned_steps_uncapped"]:
        line["extrapolated"] = extrapolate(line)
    return line


def run(
    case_name: str,
    sides: list[str],
    work: Path,
    side_gpus: list[str] | None = None,
    max_steps_reference: int = 0,
    sftjob_output: str = "sftjob",
    max_steps_sftjob: int = 0,
    extra_args: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Both sides, each its own process: one after the other, or at once on their own GPUs.
    `extra_args` goes into our side's spec.training.extraArgs only.

    Prints (and returns) one JSON line per side, after a line with the inputs' facts.
    """
    case = E2E_CASES[case_name]
    # Built in a process of its own, so this one never holds GPU memory while the sides run.
    built = subprocess.run(
        [sys.executable, "-m", "sftjob_bench.e2e", "--prepare", case.name, str(work)],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    print(built.stdout.strip().splitlines()[-1], flush=True)
    running = []
    results = []
    for index, side in enumerate(sides):
        gpu = side_gpus[index] if side_gpus else None
        cap = max_steps_reference if side == "reference" else max_steps_sftjob
        running.append(spawn(side, case, work, gpu, cap, sftjob_output, extra_args))
        if not side_gpus:  # one at a time: the next side starts once this one has ended
            results.append(finish(*running.pop()))
            print(json.dumps(results[-1]), flush=True)
    for process, spawned_at in running:
        results.append(finish(process, spawned_at))
        print(json.dumps(results[-1]), flush=True)
    return results


def child_main(argv: list[str]) -> int:
    if argv[:1] == ["--prepare"]:
        facts = prepare_inputs(E2E_CASES[argv[1]], Path(argv[2]))
        print(json.dumps({"inputs": facts}), flush=True)
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["reference", "sftjob"], required=True)
    parser.add_argument("--case", choices=sorted(E2E_CASES), required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--spawned-at", type=float, required=True)
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--output", default="sftjob")
    parser.add_argument("--extra-args", type=json.loads, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if os.environ.get(ENV_MEMORY_GIB):
        from .common import cap_gpu_memory

        cap_gpu_memory(float(os.environ[ENV_MEMORY_GIB]))
    line = run_child(
        args.child,
        E2E_CASES[args.case],
        args.workdir,
        args.spawned_at,
        args.max_steps,
        args.output,
        args.extra_args,
    )
    print(json.dumps(line), flush=True)
    if args.child == "sftjob":
        # The pod's worker leaves as soon as its outcome is written (worker.exit_now), so
        # the job is over then; a normal interpreter shutdown here took 10.8-17.2 s more on
        # the GPU (saved_at_s to wall_s in every call of 2026-12-05), which no pod waits for.
        # The reference is a plain script: it ends as scripts do.
        from sftjob_trainer.worker import exit_now

        exit_now(0)
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
