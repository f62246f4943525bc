"""Fast defaults: the planner that chooses the speed levers for a run and applies them.

Each lever is a module under levers/ (its switch, its decision with the reason, and for
some an `apply` on the built trainer; levers/contract.py says what they share). This
module is the one above them: it gathers the facts they decide from (the user's switches,
the device, the job, the model's shape), asks each lever in an order where one choice can
depend on another, and logs every choice at start so a slow or odd run can be traced to a
lever. "auto" means "on where it is known to help and to be exact, off otherwise, with the
reason". The levers, measured in docs/performance.md (one H100 in session 1, H200s capped
at 80 GiB since):

- flexAttention (levers/flex_attention.py): a sparse document mask for packed batches.
- varlenAttention (varlen_attention.py, packed_flash.py): torch's FlashAttention-2 kernel
  for packed documents, nothing compiled (in flex attention's place under auto when the
  model is not compiled).
- autoMicroBatch (micro_batch.py): the largest micro-batch the memory estimate fits, with
  per_device x accumulation kept EXACTLY (the plan's steps and the optimizer batch hold).
- ligerKernel (liger_kernel.py): liger's RMSNorm/SwiGLU/RoPE kernels.
- compile (compile_model.py): torch.compile over batches padded to one static shape.
- lightMetrics (light_metrics.py, lean_steps.py, kept_logits.py): no host sync per
  micro-step; entropy and mean_token_accuracy are not logged.
- dataWorkers (data_workers.py): DataLoader workers collate the next micro-batches.
- castWeightsOncePerStep (cast_weights_once.py, weight_copies.py): bf16 weight copies
  made once per optimizer step.
- bf16ResidualStream (bf16_residual_stream.py, residual_stream.py): hidden states between
  layers in bf16.
- fuseGradientAccumulation (fuse_gradient_accumulation.py): the copies' weight gradients
  added into .grad inside the matmul.
- fp8Matmuls (fp8_matmuls.py, fp8_linear.py): the copies' linear layers multiply in fp8
  (opt-in).
- rotaryTablesOnce (rotary_tables_once.py, rotary_tables.py): rotary tables computed once
  per forward when compiled.
- parallelSave (parallel_save.py, weights_writer.py): checkpoints' weights written by
  several threads.

Overrides: the JSON object in $SFTJOB_SPEED (e.g. '{"flexAttention": "off"}'), on top of
`spec.training.speed`.

Each lever also checks itself at start (its `CONTRACT`, levers/contract.py: the library
versions it was verified with, the signatures of what it calls or patches, a few-tensor
probe against the plain path): one that fails is turned off with the reason, whatever its
switch says. `speed.preset: exact` keeps only the levers that change no number (`EXACT`)
and turns the others off. The effective plan (micro-batch, checkpointing, attention,
compile, every lever on or off and why) goes to the status as `status.speedPlan`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftjob_operator import advice

from .failures import ConfigError
from .levers import (
    bf16_residual_stream,
    cast_weights_once,
    compile_cache,
    compile_model,
    data_workers,
    flex_attention,
    fp8_matmuls,
    fuse_gradient_accumulation,
    liger_kernel,
    light_metrics,
    micro_batch,
    parallel_save,
    rotary_tables_once,
    varlen_attention,
)
from .levers.compile_model import block_mask_in_graph, keep_compiled_kernels
from .levers.contract import (
    PRESETS,
    Choice,
    Hardware,
    Job,
    Lever,
    ModelShape,
    Preset,
    SpeedOptions,
    TrainerLever,
    check,
)
from .levers.device_memory import capped_memory_gib
from .levers.static_batches import use_static_batches

log = logging.getLogger("sftjob_trainer.speed")

ENV_SPEED = "SFTJOB_SPEED"
PRESET_KEY = "preset"

# Every lever, in the order of the plan's choices (and of status.speedPlan.levers).
LEVERS: tuple[Lever, ...] = (
    flex_attention,
    varlen_attention,
    micro_batch,
    liger_kernel,
    compile_model,
    light_metrics,
    data_workers,
    cast_weights_once,
    bf16_residual_stream,
    fuse_gradient_accumulation,
    fp8_matmuls,
    rotary_tables_once,
    parallel_save,
)
# What a lever's reason may take in the status (the operator's bound on a note).
MAX_REASON = 256

# The levers that act on the built trainer, in the order they wrap it: lean steps replace
# compute_loss (calling TRL's only for evaluation), so the static batches' wrapper, which
# takes the padding count out of the inputs, must go around them, not under them
# (SpeedPlan.apply puts it on after all of these; none of the others wraps compute_loss
# or the collator).
APPLIED: tuple[TrainerLever, ...] = (
    light_metrics,
    compile_model,
    cast_weights_once,
    bf16_residual_stream,
    rotary_tables_once,
    parallel_save,
)


def usable_memory_gib(total_gib: float, env: Mapping[str, str]) -> float:
    """The device's memory, or less when $SFTJOB_GPU_MEMORY_GIB says so (else ConfigError)."""
    try:
        return capped_memory_gib(total_gib, env)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def detect_hardware(*, use_cpu: bool) -> Hardware:
    """The device this training process runs on, and its CPUs."""
    import torch

    cpus = cpus_per_process(os.environ)
    if use_cpu or not torch.cuda.is_available():
        # Host memory, for a forced ("on") lever; "auto" levers stay off without CUDA.
        try:
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        except (ValueError, OSError, AttributeError):
            host = None
        return Hardware(cuda=False, memory_gib=host, cpus=cpus)
    props = torch.cuda.get_device_properties(0)
    memory = usable_memory_gib(props.total_memory / 2**30, os.environ)
    return Hardware(
        cuda=True,
        memory_gib=memory,
        name=props.name,
        cpus=cpus,
        capability=(props.major, props.minor),
    )


def cpus_per_process(env: Mapping[str, str], cpu_max: str | None = None) -> float | None:
    """CPUs this container may use (its cgroup quota, else its affinity) per local rank.

    A pod's affinity lists every core of the node; its limit is in cgroup v2's cpu.max
    ("QUOTA PERIOD", or "max PERIOD" without a limit).
    """
    if cpu_max is None:
        try:
            with open("/sys/fs/cgroup/cpu.max") as f:
                cpu_max = f.read()
        except OSError:
            cpu_max = ""
    quota, _, period = cpu_max.strip().partition(" ")
    try:
        cpus = int(quota) / int(period)
    except ValueError:  # "max", or no cgroup v2 file
        try:
            cpus = float(len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return None
    try:
        local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return cpus / local


def self_checks(
    opt: SpeedOptions,
    device: str,
    levers: tuple[Lever, ...] = LEVERS,
    installed: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """Why each lever not switched off fails its contract (levers/contract.check); empty
    when all pass. `installed` stands in for the installed versions (tests)."""
    failed = {}
    for lever in levers:
        if getattr(opt, lever.SWITCH) == "off":
            continue
        reason = check(lever.CONTRACT, device, installed)
        if reason is not None:
            failed[lever.SWITCH] = reason
    return failed


def preset_refusals(opt: SpeedOptions, preset: str) -> list[str]:
    """Switches that contradict the preset: a lever that changes numbers turned on under
    `exact`, each with why it changes them."""
    if preset != "exact":
        return []
    return [
        f"{lever.SWITCH}: on, but it changes numbers ({lever.NUMERICS})"
        for lever in LEVERS
        if not lever.EXACT and getattr(opt, lever.SWITCH) == "on"
    ]


def turned_off(opt: SpeedOptions, preset: str, failed: Mapping[str, str]) -> dict[str, str]:
    """The levers the preset or a failed self-check turns off, with the reason each gets."""
    off: dict[str, str] = {}
    if preset == "exact":
        for lever in LEVERS:
            if not lever.EXACT and getattr(opt, lever.SWITCH) != "off":
                off[lever.SWITCH] = f"preset exact: it changes numbers ({lever.NUMERICS})"
    for switch, reason in failed.items():
        off[switch] = f"self-check failed, turned off: {reason}"
    return off


@dataclass(frozen=True)
class SpeedPlan:
    choices: tuple[Choice, ...]
    preset: Preset = "default"
    # The job's output folder, where the compile lever keeps its cache (plan_speed sets it).
    output_dir: str | None = None
    # The compiled artifacts' name for this run's shape (compile_cache.key_facts), when it
    # compiles: looked up by the planner, loaded and saved under it by the compile lever.
    compile_cache_key: str | None = None

    def sft_kwargs(self, valid_fields: list[str] | None = None) -> dict[str, Any]:
        """SFTConfig overrides; checkpointing under the name this transformers uses."""
        out: dict[str, Any] = {}
        for choice in self.choices:
            out.update(choice.sft)
        if "gradient_checkpointing" in out and "activation_checkpointing" in (valid_fields or []):
            out["activation_checkpointing"] = out.pop("gradient_checkpointing")
        return out

    def lever_of(self, sft_arg: str) -> str:
        """The lever that set an SFTConfig argument (to name its switch in an error)."""
        return next((c.lever for c in self.choices if sft_arg in c.sft), "")

    @property
    def model_updates(self) -> dict[str, Any]:
        """Fields of spec.model (ModelSource) to override when loading."""
        out: dict[str, Any] = {}
        for choice in self.choices:
            out.update(choice.model)
        return out

    def on(self, lever: str) -> bool:
        return any(c.on for c in self.choices if c.lever == lever)

    def variant(self, lever: str) -> str:
        """The form a lever that is on takes ("" when off or when it has one form)."""
        return next((c.variant for c in self.choices if c.lever == lever and c.on), "")

    def summary(self) -> dict[str, Any]:
        return {c.lever: {"on": c.on, "reason": c.reason} for c in self.choices}

    def log(self) -> None:
        for c in self.choices:
            # A lever that failed its self-check is worth a warning: it was meant to run.
            level = logging.WARNING if c.reason.startswith("self-check failed") else logging.INFO
            log.log(level, "speed %s: %s (%s)", c.lever, "on" if c.on else "off", c.reason)

    def status(self, args: Any, attention: str | None) -> dict[str, Any]:
        """What runs, as `status.speedPlan` says it (api.SpeedPlanStatus): the SFTConfig
        the trainer was built with, the model's attention, and every lever's choice."""
        checkpointing = getattr(args, "activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(args, "gradient_checkpointing", False)
        return {
            "preset": self.preset,
            "perDeviceTrainBatchSize": int(args.per_device_train_batch_size),
            "gradientAccumulationSteps": int(args.gradient_accumulation_steps),
            "gradientCheckpointing": bool(checkpointing),
            "attention": attention,
            "compile": bool(getattr(args, "torch_compile", False)),
            "levers": [
                {"name": c.lever, "on": c.on, "reason": shortened(c.reason, MAX_REASON)}
                for c in self.choices
            ],
        }

    @property
    def static_length(self) -> int | None:
        """Tokens every packed micro-batch is padded to, when the compile or the flex
        attention lever pads (static_batches.py)."""
        for choice in self.choices:
            if choice.on and "pad_to_multiple_of" in choice.sft:
                return int(choice.sft["pad_to_multiple_of"])
        return None

    @property
    def kernels_lever(self) -> str | None:
        """The lever whose compiled kernels the compile cache keeps: the whole model's
        (compile), or flex attention's own when the model is not compiled."""
        for lever in (compile_model.SWITCH, flex_attention.SWITCH):
            if self.on(lever):
                return lever
        return None

    def apply(self, trainer: Any) -> None:
        """The levers that act on the built trainer rather than on its arguments, the
        static batches, and the compile cache of the plan's key."""
        for lever in APPLIED:
            if self.on(lever.SWITCH):
                done = lever.apply(trainer, self)
                if done is not None:
                    log.info("speed %s: %s", lever.SWITCH, done)
        if self.static_length is not None:
            # The varlen kernel reads the boundaries, each under maxLength (TRL's max_length).
            bound = int(trainer.args.max_length) if self.on(varlen_attention.SWITCH) else None
            use_static_batches(trainer, self.static_length, document_bound=bound)
        if self.output_dir and self.compile_cache_key and compile_cache.enabled():
            cache = compile_cache.use_compile_cache(
                trainer, self.compile_cache_key, self.output_dir
            )
            log.info("speed %s: %s", self.kernels_lever, cache.describe())


def shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def decide(
    opt: SpeedOptions,
    hw: Hardware,
    job: Job,
    shape: ModelShape | None,
    *,
    preset: Preset = "default",
    failed: Mapping[str, str] | None = None,
) -> SpeedPlan:
    """Every lever's choice. The preset's and the self-checks' (`failed`) levers are decided
    as switched off, so the levers that depend on them see them off, and carry that reason."""
    off = turned_off(opt, preset, failed or {})
    opt = dataclasses.replace(opt, **dict.fromkeys(off, "off"))
    plan = _decide(opt, hw, job, shape)
    choices = tuple(
        Choice(c.lever, False, off[c.lever]) if c.lever in off else c for c in plan.choices
    )
    return SpeedPlan(choices, preset)


def checked_plan(
    decide_with: Callable[..., SpeedPlan],
    check_levers: Callable[[tuple[Lever, ...]], dict[str, str]],
) -> SpeedPlan:
    """The plan with every lever that is on having passed its self-check.

    Only the levers a plan turns on are checked (a probe costs a moment; a lever that is
    off runs nothing). One failing is turned off, which may turn another on (liger where
    compile fails): that one is checked too, until every lever on has passed.
    `decide_with(failed=...)` decides; `check_levers` says why levers fail.
    """
    failed: dict[str, str] = {}
    checked: set[str] = set()
    while True:
        plan = decide_with(failed=failed)
        unchecked = tuple(
            lever for lever in LEVERS if plan.on(lever.SWITCH) and lever.SWITCH not in checked
        )
        if not unchecked:
            return plan
        checked.update(lever.SWITCH for lever in unchecked)
        failed.update(check_levers(unchecked))


def _decide(opt: SpeedOptions, hw: Hardware, job: Job, shape: ModelShape | None) -> SpeedPlan:
    flex = flex_attention.decide(opt, hw, job)
    # Whether the model compiles does not depend on the micro-batch chosen below. The
    # compile lever is asked with flex attention as decided before the varlen kernel may
    # take its place, so a model not compiled keeps that reason (a short run, ...).
    flex_wanted = flex.on
    # Whether the varlen kernel attends for this model (flexAttention: on keeps flex
    # attention): a compile of the decoder layers alone needs it (compile_model.compile_form).
    varlen = varlen_attention.decide(opt, hw, job, shape)
    if varlen.on and flex.on and opt.flexAttention == "on" and opt.varlenAttention == "auto":
        varlen = Choice(varlen.lever, False, "flexAttention is on: its kernel attends instead")
    varlen_serves = varlen.on
    compiling = compile_model.decide(opt, hw, job, flex_wanted, job.per_device, varlen_serves)
    # Under auto the varlen kernel attends where the model is not compiled and inside
    # compiled decoder layers; a whole compiled model keeps flex attention, the measured
    # pair.
    if compiling.on and compiling.variant == compile_model.WHOLE:
        varlen = varlen_attention.decide(opt, hw, job, shape, compiled=True)
    if varlen.on and flex.on:  # flex attention stands down
        flex = Choice(flex.lever, False, "varlenAttention is on: its kernel attends instead")
    sparse = flex.on or varlen.on  # attention cost linear in the documents' lengths
    light = light_metrics.decide(opt, hw, job)
    copies = cast_weights_once.decide(opt, hw, job)  # its copies count in the batch estimate
    # The lean head keeps its logits only over static batches (lean_steps.use_lean_steps):
    # the compile lever pads when it compiles, flex attention when the model is not.
    static = any(
        "pad_to_multiple_of" in choice.sft
        for choice in (compiling, flex_attention.with_static_batches(flex, job, job.per_device))
    )
    sized = functools.partial(
        micro_batch.decide,
        opt,
        hw,
        job,
        shape,
        attention_sparse=sparse,
        lean_head=light.on and static,
    )
    micro = sized(weight_copies=copies.on)
    if copies.on and opt.castWeightsOncePerStep == "auto":
        # The copies save about 1% (measured), and their memory (2 B per parameter) is
        # only checked by the micro-batch estimate: without one, or where they would
        # shrink the micro-batch or turn checkpointing on, they are not worth it.
        roomier = sized(weight_copies=False)
        reason = None
        if not roomier.on:
            reason = f"no fitting micro-batch estimate (autoMicroBatch: {roomier.reason})"
        elif not micro.on:
            reason = (
                f"nothing fits with them (without them: {micro_batch.describe_batch(roomier, job)})"
            )
        elif roomier.sft != micro.sft:
            reason = (
                f"they would change the micro-batch (without them: "
                f"{micro_batch.describe_batch(roomier, job)}; with them: "
                f"{micro_batch.describe_batch(micro, job)})"
            )
        if reason:
            copies = Choice(copies.lever, False, f"auto: {reason}")
            micro = roomier
    per_device = int(micro.sft.get("per_device_train_batch_size", job.per_device))
    compiled = compile_model.decide(opt, hw, job, flex_wanted, per_device, varlen_serves)
    if "pad_to_multiple_of" not in compiled.sft:
        flex = flex_attention.with_static_batches(flex, job, per_device)
    choices = (
        flex,
        varlen,
        micro,
        liger_kernel.decide(opt, hw, job, compiled=compiled.on),
        compiled,
        light,
        data_workers.decide(opt, hw, job),
        copies,
        bf16_residual_stream.decide(opt, hw, job),
        fuse_gradient_accumulation.decide(opt, hw, job, copies),
        fp8_matmuls.decide(opt, hw, job, copies),
        rotary_tables_once.decide(opt, compiled),
        parallel_save.decide(opt, hw),
    )
    return SpeedPlan(choices)


def options_from(spec: Any, env: dict[str, str] | None = None) -> SpeedOptions:
    return speed_settings(spec, env)[0]


def speed_settings(spec: Any, env: dict[str, str] | None = None) -> tuple[SpeedOptions, Preset]:
    """The switches and the preset: spec.training.speed, then $SFTJOB_SPEED on top."""
    env = dict(os.environ if env is None else env)
    from_spec = getattr(spec.training, "speed", None)
    if from_spec is not None and hasattr(from_spec, "model_dump"):
        from_spec = from_spec.model_dump(exclude_none=True)
    raw = env.get(ENV_SPEED, "").strip()
    try:
        from_env = json.loads(raw) if raw else None
        if from_env is not None and not isinstance(from_env, dict):
            raise ValueError("not a JSON object")
        layers = [dict(layer or {}) for layer in (from_spec, from_env)]
        preset = "default"
        for layer in layers:
            preset = layer.pop(PRESET_KEY, preset)
        if preset not in PRESETS:
            raise ValueError(f"speed.preset must be one of {PRESETS}, got {preset!r}")
        options = SpeedOptions.parse(*layers)
        refused = preset_refusals(options, preset)
        if refused:
            raise ValueError(
                "speed.preset exact keeps only the levers that change no number: "
                + "; ".join(refused)
                + " (set the switch to auto or off, or use preset default)"
            )
        return options, preset
    except ValueError as exc:  # JSONDecodeError included
        raise ConfigError(f"speed options ({ENV_SPEED} or spec.training.speed): {exc}") from None


def job_from(config: Any, dataset_rows: int | None = None, liger: str = "auto") -> Job:
    spec = config.spec
    training = spec.training
    resolved = config.resolved
    per_device = int(resolved["perDeviceTrainBatchSize"])
    accumulation = int(resolved["gradientAccumulationSteps"])
    method = str(resolved["method"])
    return Job(
        method=method,
        per_device=per_device,
        accumulation=accumulation,
        max_length=int(training.maxLength),
        padding_free=bool(
            training.packing
            and training.packingStrategy in ("bfd", "bfd_split")
            or training.extraArgs.get("padding_free")
        ),
        checkpointing=bool(training.gradientCheckpointing),
        bf16=bool(resolved["bf16"]),
        distributed=str(spec.distributed),
        attn_set=bool(spec.model.attnImplementation),
        shrunk=(per_device, accumulation)
        != (training.perDeviceTrainBatchSize, training.gradientAccumulationSteps),
        extra_args=tuple(training.extraArgs),
        world_size=world_size(config),
        run_tokens_per_gpu=run_tokens_per_gpu(config, per_device * accumulation, dataset_rows),
        compile_payback_tokens=compile_payback_tokens(liger),
        regional_payback_tokens=compile_payback_tokens(liger, regional=True, method=method),
        whole_over_regional_tokens=advice.whole_over_regional_tokens(method),
        compile_regions=compile_regions_env(),
        rows=dataset_rows,
    )


def compile_regions_env(env: Mapping[str, str] | None = None) -> str:
    """$SFTJOB_COMPILE_REGIONS as the planner reads it: "on", "off", else "auto"."""
    value = (os.environ if env is None else env).get(compile_model.ENV_COMPILE_REGIONS, "")
    value = value.strip().lower()
    return value if value in ("on", "off") else "auto"


def compile_payback_tokens(
    liger: str = "auto", regional: bool = False, method: str = "full"
) -> int:
    """Tokens per GPU after which a cold compile pays back, by what trains uncompiled here.

    Uncompiled, liger's kernels (the image's gpu extra) raise the rate a compile must beat
    (44.1k against 33.1k tokens/s on an H100), so compiling pays back later: the whole
    model after 48.7M tokens against 14.1M, a full fine-tune's decoder layers alone
    (`regional`) after about 4M against 1M, where liger is absent or `liger`
    (speed.ligerKernel) is off. LoRA's layers pay back after about 1M tokens per GPU,
    with liger (so without it too) (sftjob_operator.advice).
    """
    installed = importlib.util.find_spec("liger_kernel") is not None
    return advice.compile_payback_tokens(
        liger=liger != "off" and installed, regional=regional, method=method
    )


def run_tokens_per_gpu(
    config: Any, sequences_per_step: int, dataset_rows: int | None = None
) -> int | None:
    """At most the tokens one GPU trains, or None when neither the plan nor the data says.

    A packed row holds at most maxLength tokens and at least one sample, so: the
    operator's planned optimizer steps (or maxSteps) x the sequences one GPU takes a step x
    maxLength; without them, this GPU's share of the training rows x the epochs x
    maxLength. An upper bound: a run it calls long may still be short.
    """
    training = config.spec.training
    max_length = int(training.maxLength)
    steps = (config.plan or {}).get("totalSteps") or training.maxSteps
    if steps:
        return int(steps) * sequences_per_step * max_length
    if dataset_rows is None:
        return None
    rows = math.ceil(dataset_rows / max(world_size(config), 1))
    return math.ceil(rows * float(training.numTrainEpochs)) * max_length


def world_size(config: Any) -> int:
    """Training processes in the run: the pod topology, or the launcher's WORLD_SIZE."""
    from .settings import topology_from_env

    launched = int(os.environ.get("WORLD_SIZE") or 1)
    return max(topology_from_env(config).world_size, launched)


def model_config(model: Any) -> Any:
    """The model's config.json (transformers' config), or None when it cannot be read."""
    try:
        from transformers import AutoConfig

        source = model.path or model.name
        return AutoConfig.from_pretrained(
            source, revision=model.revision, trust_remote_code=model.trustRemoteCode
        )
    except Exception as exc:  # the model load reports real problems; this only sizes
        log.info("speed: cannot read the model config (%s): batch sizing off", exc)
        return None


def compile_cache_key(
    plan: SpeedPlan,
    job: Job,
    hardware: Hardware,
    model: Any,
    model_config_json: Mapping[str, Any] | None,
    lora: Any,
) -> str:
    """The name of this run's compiled artifacts (compile_cache.key_facts), from what the
    plan fixes before the model loads. `model`: spec.model; `lora`: the resolved adapter."""
    sft = plan.sft_kwargs()
    run = {
        "per_device": int(sft.get("per_device_train_batch_size", job.per_device)),
        "max_length": job.max_length,
        "pad_to_multiple_of": plan.static_length,
        "bf16": job.bf16,
        "checkpointing": bool(sft.get("gradient_checkpointing", job.checkpointing)),
        "world_size": job.world_size,
        "method": job.method,
        "lora": lora if job.method != "full" else None,
        "attention": plan.model_updates.get("attn_implementation") or model.attnImplementation,
        "regional": plan.variant(compile_model.SWITCH) == compile_model.REGIONAL,
    }
    facts = compile_cache.key_facts(
        model_config_json if model_config_json is not None else {"unread": str(model.path)},
        hardware.name,
        run,
        {choice.lever: choice.on for choice in plan.choices},
    )
    return compile_cache.cache_key(facts)


def plan_speed(config: Any, dataset_rows: int | None = None) -> SpeedPlan:
    """The one entry point train.py calls: levers decided for this config on this machine.

    When the plan compiles, it looks for the compiled artifacts of the run's shape first:
    a short run compiles only with them at hand (compile_model.short_cold_run), so the
    levers are decided again knowing whether they are there.
    """
    spec = config.spec
    options, preset = speed_settings(spec)
    job = job_from(config, dataset_rows, options.ligerKernel)
    hardware = detect_hardware(use_cpu=bool(config.resolved["useCpu"]))
    device = "cuda" if hardware.cuda else "cpu"
    output = str(config.resolved["outputPath"])
    read = model_config(spec.model)
    shape = None if read is None else ModelShape.from_config(read.get_text_config())
    checks = checks_once(options, device)

    def planned(job: Job) -> SpeedPlan:
        decide_with = functools.partial(decide, options, hardware, job, shape, preset=preset)
        return checked_plan(decide_with, checks)

    def key_of(plan: SpeedPlan) -> str:
        config_json = None if read is None else read.to_dict()
        lora = config.resolved.get("lora")
        return compile_cache_key(plan, job, hardware, spec.model, config_json, lora)

    # With the cache turned off nothing is looked up: a short run is then a cold one.
    dirs = compile_cache.cache_dirs(output) if compile_cache.enabled() else []
    plan = planned_with_compile_cache(planned, job, key_of, dirs)
    plan = dataclasses.replace(plan, output_dir=output)
    plan.log()
    if plan.kernels_lever is not None:
        # Before anything asks inductor for its cache: the first ask pins the /tmp default.
        keep_compiled_kernels(output)
    if plan.on(compile_model.SWITCH) and plan.on(flex_attention.SWITCH):
        block_mask_in_graph()
    if plan.on(varlen_attention.SWITCH):  # the name the model is loaded with
        from .levers.packed_flash import register

        register()
    return plan


def planned_with_compile_cache(
    planned: Callable[[Job], SpeedPlan],
    job: Job,
    key_of: Callable[[SpeedPlan], str],
    cache_dirs: list[Path],
) -> SpeedPlan:
    """The plan decided knowing whether its compiled artifacts are at hand, with their key.

    Decided once not knowing; if that compiles, its key is looked up in `cache_dirs` and
    the plan decided again with the answer (a short run with a cold cache does not
    compile, and its other levers then stand in for inductor's fusions). A plan that
    compiles kernels, the model's or only flex attention's, gets its key (another key
    when the model is not compiled: the levers on or off are part of it).
    """
    plan = planned(job)
    if plan.on(compile_model.SWITCH):
        warm = compile_cache.has_artifacts(key_of(plan), cache_dirs)
        plan = planned(dataclasses.replace(job, compile_cache_warm=warm))
    if plan.kernels_lever is None:
        return plan
    return dataclasses.replace(plan, compile_cache_key=key_of(plan))


def checks_once(opt: SpeedOptions, device: str) -> Callable[[tuple[Lever, ...]], dict[str, str]]:
    """self_checks that probes each lever once, however often the plan is decided."""
    known: dict[str, str | None] = {}

    def check_levers(levers: tuple[Lever, ...]) -> dict[str, str]:
        todo = tuple(lever for lever in levers if lever.SWITCH not in known)
        failed = self_checks(opt, device, todo) if todo else {}
        known.update({lever.SWITCH: failed.get(lever.SWITCH) for lever in todo})
        return {
            lever.SWITCH: reason for lever in levers if (reason := known[lever.SWITCH]) is not None
        }

    return check_levers


def speed_plan_status(trainer: Any) -> dict[str, Any] | None:
    """`status.speedPlan` for a trainer built with a plan (train.build_trainer keeps it)."""
    plan = getattr(trainer, "sftjob_speed_plan", None)
    if plan is None:
        return None
    config = getattr(trainer.model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    status = plan.status(trainer.args, str(attention) if attention else None)
    cache = getattr(trainer, "sftjob_compile_cache", None)
    if cache is not None:  # warm or cold, said first so the bound on a reason keeps it
        for lever in status["levers"]:
            if lever["name"] == plan.kernels_lever:
                lever["reason"] = shortened(f"{cache.describe()}; {lever['reason']}", MAX_REASON)
    return status
