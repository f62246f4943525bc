"""Fast defaults: which speed levers a run uses, decided from the spec and the hardware.

Each lever is a pure function of (options, hardware, job facts) that returns a `Choice`:
the settings it adds and the reason, logged at start so a slow or odd run can be traced
to a lever. Every lever has a switch (see `SpeedOptions`); "auto" means "on where it is
known to help and to be exact, off otherwise, with the reason".

Levers (measured in docs/performance.md: one H100 in session 1, H200s capped at 80 GiB since):
- flexAttention: packed (bfd, padding-free) batches are one concatenated row with
  position_ids resets. SDPA needs a dense block-diagonal mask for that, whose cost grows
  with the square of the micro-batch; flex_attention builds a sparse block mask from the
  same position_ids (transformers' find_packed_sequence_indices), so documents stay
  isolated and larger micro-batches pay off. CUDA only under "auto": on CPU it compiles
  through inductor (about 20 s) and gains nothing.
- autoMicroBatch: with flex attention, the largest micro-batch that fits without
  activation checkpointing (checkpointing only when memory needs it), accumulation
  adjusted so per_device x accumulation stays EXACTLY the same (so the plan's steps and
  the optimizer batch do not change).
- ligerKernel: liger's RMSNorm/SwiGLU/RoPE kernels when liger_kernel imports. TRL 1.16
  already fuses the LM head with the loss (chunked, no full logits) and refuses liger's
  fused linear cross-entropy, so only the layer kernels are left to gain.
- compile: SFTConfig torch_compile, with every packed micro-batch padded to one static
  shape so the model compiles once (CUDA with flex attention under "auto").
- lightMetrics: TRL 1.16 folds entropy and top-1 accuracy into its chunked LM-head
  kernel on every micro-step (no SFTConfig switch turns them off) and reads them, and
  the token count, back to the host each micro-step, which stalls the GPU queue. This
  computes the log-probabilities only, with no host sync (lean_steps.py), and drops the
  two metrics from the logs. On with CUDA under "auto"; "off" keeps the metrics.
- dataWorkers: DataLoader worker processes collate and prefetch the next micro-batches,
  so the training process only queues GPU work (same batches, same order: the sampler
  stays in the training process). On with CUDA and CPUs to spare under "auto".
- castWeightsOncePerStep: linear layers compute with bf16 copies of their fp32 weights,
  made once per optimizer step instead of cast at every micro-step, their gradients added
  into the fp32 parameters by a hook (weight_copies.py; the same arithmetic). One process
  only. About 1% faster on an H200 (session 6); "auto" turns it on with CUDA where the
  micro-batch estimate holds the copies without a smaller micro-batch or checkpointing
  (not for qlora).
- bf16ResidualStream: the input embedding's output is cast to bf16, so the hidden states
  between layers and the residual additions are bf16 rather than fp32 (residual_stream.py;
  weights, gradients and optimizer stay fp32). It rounds the residual additions to bf16:
  losses within 1.3e-4 of the fp32 stream's on the bench; 1.5-2.3% faster there. On with
  CUDA and bf16 for full fine-tunes under "auto" (no gain measured for LoRA).
- fuseGradientAccumulation: with the weight copies, each trainable layer's backward adds
  its weight gradient into the fp32 `.grad` inside the matmul that computes it (cuBLAS
  with fp32 output and beta 1), instead of writing a bf16 gradient and adding it in a
  separate kernel. The product is no longer rounded to bf16 before the add. +1.3% and
  +1.7% on the bench's full case (session 7, each GPU both ways; +1.0% and +0.9% for the
  version after its reviews, session 8), none on LoRA. On with CUDA for full
  fine-tunes wherever the copies are, under "auto".
- rotaryTablesOnce: compiled, inductor inlines the rotary embedding's cos/sin tables
  (a short pointwise chain) into every layer's query/key rotation, forward and backward,
  so each layer recomputes them; an opaque copy of the tables makes them one buffer
  computed once per forward (rotary_tables.py; the same values, except that bf16 tables
  are rounded to bf16 as eager rounds them). +1.8% and +2.4% on the bench's full case
  (session 8, each GPU both ways). On with compile under "auto".

Overrides: the JSON object in $SFTJOB_SPEED (e.g. '{"flexAttention": "off"}'), on top of
`spec.training.speed`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .device_memory import KEPT_LOGITS_SHARE, usable_memory_gib
from .failures import ConfigError

log = logging.getLogger("sftjob_trainer.speed")

ENV_SPEED = "SFTJOB_SPEED"
Switch = Literal["auto", "on", "off"]
SWITCHES = ("auto", "on", "off")
SWITCH_NAMES = (
    "flexAttention",
    "autoMicroBatch",
    "ligerKernel",
    "compile",
    "lightMetrics",
    "dataWorkers",
    "castWeightsOncePerStep",
    "bf16ResidualStream",
    "fuseGradientAccumulation",
    "rotaryTablesOnce",
)
# Keys of TRL's padding-free batches that only varlen kernels (flash attention) read. Their
# lengths and values change with every micro-batch, so a compiled model would recompile.
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# The collator's note of how many padding tokens a static batch carries; taken out of the
# batch before the model sees it and subtracted from TRL's token count.
PADDING_KEY = "sftjob_padding_tokens"

# Fraction of device memory the estimate may fill; the rest absorbs allocator
# fragmentation, the CUDA context and the estimate's error.
MEMORY_HEADROOM = 0.80
# Past this many tokens per micro-batch the kernels are already large: no gain, more risk.
MAX_MICRO_BATCH_TOKENS = 16384
# Below this a micro-batch leaves the GPU under-used: then checkpoint and take more rows.
MIN_MICRO_BATCH_TOKENS = 4096
# DataLoader worker processes per training process (measured: two were enough to take
# collation off the critical path); they need cores beyond the training process's own.
DATA_WORKERS = 2


@dataclass(frozen=True)
class SpeedOptions:
    """The user's switches, one per lever (proposed as spec.training.speed)."""

    flexAttention: Switch = "auto"
    autoMicroBatch: Switch = "auto"
    ligerKernel: Switch = "auto"
    compile: Switch = "auto"
    lightMetrics: Switch = "auto"
    dataWorkers: Switch = "auto"
    castWeightsOncePerStep: Switch = "auto"
    bf16ResidualStream: Switch = "auto"
    fuseGradientAccumulation: Switch = "auto"
    rotaryTablesOnce: Switch = "auto"

    @classmethod
    def parse(cls, *layers: dict[str, Any] | None) -> SpeedOptions:
        """Merge layers (later wins); booleans are accepted for the three-way switches."""
        merged: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        for layer in layers:
            for key, value in (layer or {}).items():
                if key not in names:
                    raise ValueError(f"unknown speed option {key!r}; known: {sorted(names)}")
                merged[key] = value
        for key in SWITCH_NAMES:
            value = merged.get(key)
            if isinstance(value, bool):
                merged[key] = "on" if value else "off"
            elif value is not None and value not in SWITCHES:
                raise ValueError(f"speed.{key} must be one of {SWITCHES}, got {value!r}")
        return cls(**merged)


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    memory_gib: float | None = None  # of one device
    name: str = "cpu"
    cpus: float | None = None  # CPUs for each training process on this node

    @classmethod
    def detect(cls, *, use_cpu: bool) -> Hardware:
        import torch

        cpus = cpus_per_process(os.environ)
        if use_cpu or not torch.cuda.is_available():
            # Host memory, for a forced ("on") lever; "auto" levers stay off without CUDA.
            try:
                host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
            except (ValueError, OSError, AttributeError):
                host = None
            return cls(cuda=False, memory_gib=host, cpus=cpus)
        props = torch.cuda.get_device_properties(0)
        memory = usable_memory_gib(props.total_memory / 2**30, os.environ)
        return cls(cuda=True, memory_gib=memory, name=props.name, cpus=cpus)


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


@dataclass(frozen=True)
class ModelShape:
    params: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int = 0  # 0: unknown, nothing counted for the LM head's logits

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        hidden = int(config.hidden_size)
        layers = int(config.num_hidden_layers)
        intermediate = int(getattr(config, "intermediate_size", 4 * hidden))
        vocab = int(config.vocab_size)
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", heads) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        attn = hidden * head_dim * (2 * heads + 2 * kv)
        per_layer = attn + 3 * hidden * intermediate + 2 * hidden
        embeddings = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
        return cls(
            params=layers * per_layer + embeddings,
            hidden=hidden,
            layers=layers,
            intermediate=intermediate,
            vocab=vocab,
        )


@dataclass(frozen=True)
class Job:
    """The facts of the run the levers look at."""

    method: str  # full | lora | qlora
    per_device: int
    accumulation: int
    max_length: int
    padding_free: bool  # packing with bfd/bfd_split (TRL turns padding_free on)
    checkpointing: bool  # what the spec asks; False is respected, True may be lifted
    bf16: bool
    distributed: str = "none"
    attn_set: bool = False  # model.attnImplementation given by the user
    shrunk: bool = False  # the operator shrank the batch after an OOM
    extra_args: tuple[str, ...] = ()
    world_size: int = 1  # training processes in the whole run


@dataclass(frozen=True)
class Choice:
    lever: str
    on: bool
    reason: str
    sft: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)


# --- the levers -------------------------------------------------------------------------


def flex_attention(opt: SpeedOptions, hw: Hardware, job: Job) -> Choice:
    name = "flexAttention"
    if opt.flexAttention == "off":
        return Choice(name, False, "turned off")
    if job.attn_set:
        return Choice(name, False, "model.attnImplementation is set: kept as given")
    if opt.flexAttention == "on":
        return Choice(name, True, "turned on", model={"attnImplementation": "flex_attention"})
    if not hw.cuda:
        return Choice(
            name,
            False,
            "no CUDA device: flex_attention would compile through "
            "inductor on CPU for no gain; SDPA's block-diagonal mask is exact",
        )
    if not job.padding_free:
        return Choice(name, False, "batches are padded, not packed padding-free: SDPA is fine")
    try:
        from torch.nn.attention.flex_attention import flex_attention as _  # noqa: F401
    except ImportError:
        return Choice(name, False, "this torch has no flex_attention")
    return Choice(
        name,
        True,
        "CUDA and packed padding-free batches: sparse document mask",
        model={"attnImplementation": "flex_attention"},
    )


def activation_bytes_per_token(
    shape: ModelShape, *, checkpointing: bool, lora: bool, bf16: bool
) -> float:
    """Saved activations per token, all layers (calibrated on Qwen2.5-1.5B on an H100).

    Per layer under bf16 autocast: about 8 bytes per MLP unit (gate, up, act, product)
    and 24 per hidden unit (norms, q/k/v, attention output, fp32 residual). That gives
    3.0 MB/token for the 1.5B shape; measured 2.6-3.0 (47-50 GiB at 4 x 2048 tokens).
    With checkpointing only the fp32 layer inputs stay, plus one layer being recomputed.
    """
    scale = 1.0 if bf16 else 2.0
    layer = scale * (8 * shape.intermediate + 24 * shape.hidden)
    if lora:
        layer *= 1.15  # the adapters' inputs (dropout outputs) are kept too
    if checkpointing:
        return 4 * shape.hidden * shape.layers + layer
    return layer * shape.layers


def static_bytes(shape: ModelShape, method: str, weight_copies: bool = False) -> float:
    """Memory that does not grow with the micro-batch, calibrated on the H100 reference runs.

    Full: fp32 weights, gradients and AdamW state (16 B/param) plus buffers (the fused LM
    head's fp32 weight gradient, its tiles, the CUDA context): 26.7 GiB measured at 2 x 2048
    tokens with checkpointing. LoRA: frozen fp32 weights plus what peft and the head keep,
    about 7 B/param (12.4 GiB measured, same batch). QLoRA: 4-bit weights, a guess.
    With castWeightsOncePerStep, the linear layers' bf16 copies stay for the whole run:
    2 B for each parameter outside the embedding (an upper bound where autocast's own
    casts were kept for the backward anyway).
    """
    overhead = 2.5 * 2**30
    per_param = {"full": 16.0, "qlora": 1.5}.get(method, 7.0)
    copies = 2.0 * max(shape.params - shape.vocab * shape.hidden, 0) if weight_copies else 0.0
    return per_param * shape.params + overhead + copies


def kept_logits_bytes(shape: ModelShape, tokens: int, memory_gib: float, bf16: bool) -> float:
    """The logits the lean LM head keeps for a micro-batch, if within its share."""
    size = (2.0 if bf16 else 4.0) * tokens * shape.vocab
    return size if size <= KEPT_LOGITS_SHARE * memory_gib * 2**30 else 0.0


def micro_batch(
    opt: SpeedOptions,
    hw: Hardware,
    job: Job,
    shape: ModelShape | None,
    attention_sparse: bool,
    lean_head: bool = False,
    weight_copies: bool = False,
) -> Choice:
    name = "autoMicroBatch"
    effective = job.per_device * job.accumulation
    if opt.autoMicroBatch == "off":
        return Choice(name, False, "turned off")
    if job.shrunk:
        return Choice(name, False, "the operator shrank the batch after an OOM: kept")
    if opt.autoMicroBatch == "auto":
        if not hw.cuda:
            return Choice(name, False, "no CUDA device: nothing to size against")
        if not attention_sparse:
            return Choice(
                name,
                False,
                "dense-mask attention: a larger packed micro-batch costs "
                "quadratically more attention (measured slower under SDPA)",
            )
    if not job.padding_free:
        return Choice(name, False, "batches are padded: larger micro-batches pad more")
    if job.distributed == "fsdp":
        return Choice(name, False, "fsdp shards memory and checkpoints itself: batch kept")
    if shape is None:
        return Choice(name, False, "model shape unknown (config unreadable): batch kept")
    if hw.memory_gib is None:
        return Choice(name, False, "device memory unknown: batch kept")

    static = static_bytes(shape, job.method, weight_copies)
    budget = MEMORY_HEADROOM * hw.memory_gib * 2**30 - static
    lora = job.method != "full"

    memory_gib = hw.memory_gib

    def batch_bytes(per_device: int, ckpt: bool) -> float:
        tokens = per_device * job.max_length
        per_token = activation_bytes_per_token(shape, checkpointing=ckpt, lora=lora, bf16=job.bf16)
        logits = kept_logits_bytes(shape, tokens, memory_gib, job.bf16) if lean_head else 0.0
        return tokens * per_token + logits

    def fits(per_device: int, ckpt: bool) -> bool:
        return batch_bytes(per_device, ckpt) <= budget

    divisors = [d for d in range(1, effective + 1) if effective % d == 0]
    capped = [d for d in divisors if d * job.max_length <= MAX_MICRO_BATCH_TOKENS] or [1]
    pick: tuple[int, bool] | None = None
    no_ckpt = [d for d in capped if fits(d, False)]
    if no_ckpt and max(no_ckpt) * job.max_length >= min(
        MIN_MICRO_BATCH_TOKENS, max(capped) * job.max_length
    ):
        pick = (max(no_ckpt), False)
    elif job.checkpointing:
        with_ckpt = [d for d in capped if fits(d, True)]
        if with_ckpt:
            pick = (max(with_ckpt), True)
    elif no_ckpt:
        pick = (max(no_ckpt), False)
    if pick is None:
        return Choice(name, False, "no micro-batch fits the memory estimate: batch kept")
    per_device, ckpt = pick
    if not job.checkpointing and ckpt:  # never turn on what the spec turned off
        return Choice(name, False, "checkpointing is off in the spec and nothing fits without it")
    sft: dict[str, Any] = {
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": effective // per_device,
    }
    if ckpt != job.checkpointing:
        sft["gradient_checkpointing"] = ckpt
    estimate = static + batch_bytes(per_device, ckpt)
    # The job's effective batch, as the plan in the status states it (all processes).
    processes = f" x {job.world_size} processes" if job.world_size > 1 else ""
    return Choice(
        name,
        True,
        f"per_device {per_device} x accumulation {effective // per_device}{processes} "
        f"(effective {effective * job.world_size} kept), checkpointing "
        f"{'on' if ckpt else 'off'}; estimate "
        f"{estimate / 2**30:.1f} of {hw.memory_gib:.0f} GiB",
        sft=sft,
    )


def liger(opt: SpeedOptions, hw: Hardware, job: Job, compiled: bool = False) -> Choice:
    name = "ligerKernel"
    if opt.ligerKernel == "off":
        return Choice(name, False, "turned off")
    if "use_liger_kernel" in job.extra_args:
        return Choice(name, False, "use_liger_kernel is set in extraArgs: kept as given")
    if opt.ligerKernel == "auto" and not hw.cuda:
        return Choice(name, False, "no CUDA device: liger's kernels are Triton GPU kernels")
    if opt.ligerKernel == "auto" and compiled:
        return Choice(
            name, False, "the model is compiled: inductor fuses the same norm/activation ops"
        )
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return Choice(name, False, "liger_kernel is not installed in this image")
    return Choice(
        name,
        True,
        "RMSNorm/SwiGLU/RoPE kernels (TRL fuses the LM head itself)",
        sft={"use_liger_kernel": True},
    )


def compile_model(opt: SpeedOptions, hw: Hardware, job: Job, flex: bool, per_device: int) -> Choice:
    """torch.compile, with every packed micro-batch padded to ONE shape.

    TRL's padding-free batches change length with every micro-batch (and carry varlen
    keys whose sizes change too); a compiled model then recompiles again and again (about
    200 s of a 274 s run, measured). Padding each micro-batch to per_device x maxLength
    (padding tokens at position 0, so flex or SDPA puts each in its own document, labels
    -100) gives one graph. The padding is masked out of the loss and not counted as tokens.
    """
    name = "compile"
    if opt.compile == "off":
        return Choice(name, False, "turned off")
    if "torch_compile" in job.extra_args:
        return Choice(name, False, "torch_compile is set in extraArgs: kept as given")
    if job.distributed == "fsdp":
        return Choice(name, False, "fsdp: sharded parameters are not compiled here")
    if opt.compile == "auto":
        if not hw.cuda:
            return Choice(
                name, False, "no CUDA device: compiling on CPU takes minutes and gains little"
            )
        if not flex:
            return Choice(name, False, "needs flex attention over packed batches (one shape)")
        if job.method == "qlora":
            return Choice(
                name, False, "qlora: bitsandbytes 4-bit layers under compile are not measured"
            )
    sft: dict[str, Any] = {"torch_compile": True}
    if not job.padding_free or "pad_to_multiple_of" in job.extra_args:
        return Choice(name, True, "torch.compile (batch shapes vary: expect recompiles)", sft=sft)
    static = per_device * job.max_length
    sft["pad_to_multiple_of"] = static
    return Choice(
        name,
        True,
        f"torch.compile with every micro-batch padded to {static} tokens (one graph; "
        "padding masked, not trained on, not counted)",
        sft=sft,
    )


def light_metrics(opt: SpeedOptions, hw: Hardware, job: Job) -> Choice:
    name = "lightMetrics"
    if opt.lightMetrics == "off":
        return Choice(name, False, "turned off: entropy and mean_token_accuracy are logged")
    if opt.lightMetrics == "auto" and not hw.cuda:
        return Choice(name, False, "no CUDA device: metrics kept (a test run wants them)")
    sft: dict[str, Any] = {}
    if "logging_nan_inf_filter" not in job.extra_args:
        # The filter reads each micro-step's loss on the host: a sync that idles the GPU.
        # Without it a NaN loss is logged as NaN rather than hidden in the average.
        sft["logging_nan_inf_filter"] = False
    return Choice(
        name,
        True,
        "no host sync per micro-step: LM head computes log-probabilities only, tokens "
        "counted on the host; entropy and mean_token_accuracy are not logged",
        sft=sft,
    )


def data_workers(opt: SpeedOptions, hw: Hardware, job: Job) -> Choice:
    name = "dataWorkers"
    if opt.dataWorkers == "off":
        return Choice(name, False, "turned off: batches are collated in the training process")
    if "dataloader_num_workers" in job.extra_args:
        return Choice(name, False, "dataloader_num_workers is set in extraArgs: kept as given")
    if opt.dataWorkers == "auto":
        if not hw.cuda:
            return Choice(name, False, "no CUDA device: workers would take the training's cores")
        if hw.cpus is not None and hw.cpus < DATA_WORKERS + 2:
            return Choice(
                name,
                False,
                f"{hw.cpus:g} CPUs per training process: too few to spare {DATA_WORKERS} "
                "for loading",
            )
    return Choice(
        name,
        True,
        f"{DATA_WORKERS} DataLoader workers collate and prefetch the next micro-batches "
        "(same batches, same order), so the training process only queues GPU work",
        sft={
            "dataloader_num_workers": DATA_WORKERS,
            **(
                {}
                if "dataloader_persistent_workers" in job.extra_args
                else {"dataloader_persistent_workers": True}  # no re-fork at each epoch
            ),
        },
    )


def cast_weights_once(opt: SpeedOptions, hw: Hardware, job: Job) -> Choice:
    name = "castWeightsOncePerStep"
    if opt.castWeightsOncePerStep == "off":
        return Choice(name, False, "turned off: autocast casts the weights at every micro-step")
    if not job.bf16:
        return Choice(name, False, "bf16 is off: there are no casts to save")
    # DDP and FSDP take the gradients autograd puts on the parameters themselves; the
    # copies' gradients reach the parameters through a hook instead.
    if job.distributed == "fsdp":
        return Choice(name, False, "fsdp shards the parameters and takes their own gradients")
    if job.world_size > 1:
        return Choice(
            name, False, f"{job.world_size} processes: DDP reduces the parameters' own gradients"
        )
    if opt.castWeightsOncePerStep == "auto":
        if not hw.cuda:
            return Choice(name, False, "no CUDA device: its gain is measured on GPUs only")
        if job.method == "qlora":
            return Choice(name, False, "qlora: the 4-bit layers are not copied; not measured")
    return Choice(
        name,
        True,
        "linear layers compute with bf16 copies of their fp32 weights, made once per "
        "optimizer step instead of at every micro-step (the same arithmetic)",
    )


def bf16_residual_stream(opt: SpeedOptions, hw: Hardware, job: Job) -> Choice:
    name = "bf16ResidualStream"
    if opt.bf16ResidualStream == "off":
        return Choice(name, False, "turned off: hidden states between layers stay fp32")
    if not job.bf16:
        return Choice(name, False, "bf16 is off: the model computes in fp32")
    if opt.bf16ResidualStream == "auto":
        if not hw.cuda:
            return Choice(name, False, "no CUDA device: its gain is measured on GPUs only")
        if job.method != "full":
            # Measured on the LoRA case: no gain (50,014 against 49,974 tokens/s), and the
            # loss after the first update moved from 0.9% to 1.2% off the reference's.
            return Choice(
                name, False, f"{job.method}: no gain measured for adapters; stream kept fp32"
            )
    return Choice(
        name,
        True,
        "the embedding's output is cast to bf16: hidden states and residual additions "
        "between layers in bf16 (half their memory traffic; weights and optimizer stay fp32)",
    )


def fuse_gradient_accumulation(
    opt: SpeedOptions, hw: Hardware, job: Job, weight_copies: Choice
) -> Choice:
    name = "fuseGradientAccumulation"
    if opt.fuseGradientAccumulation == "off":
        return Choice(
            name, False, "turned off: each bf16 weight gradient is added into .grad by a hook"
        )
    if not weight_copies.on:
        # The copies' layers are the ones whose backward this replaces.
        return Choice(name, False, "castWeightsOncePerStep is off: there is no copy to fuse")
    if opt.fuseGradientAccumulation == "auto":
        if not hw.cuda:
            return Choice(name, False, "no CUDA device: the fp32-output matmul is a cuBLAS one")
        if job.method != "full":
            # Measured on the LoRA case (session 7): 52,412 tokens/s with it, 52,693
            # without (the other GPU); the adapters' gradients are too small to matter.
            return Choice(name, False, f"{job.method}: no gain measured for adapters; hook kept")
    return Choice(
        name,
        True,
        "each weight gradient is accumulated into the fp32 .grad inside the matmul that "
        "computes it (fp32 output, not rounded to bf16; no separate add)",
    )


def rotary_tables_once(opt: SpeedOptions, compiled: Choice) -> Choice:
    name = "rotaryTablesOnce"
    if opt.rotaryTablesOnce == "off":
        return Choice(name, False, "turned off: compiled layers may recompute the rotary tables")
    if opt.rotaryTablesOnce == "auto" and not compiled.on:
        return Choice(name, False, "not compiled: eager computes the rotary tables once already")
    return Choice(
        name,
        True,
        "the rotary cos/sin tables are computed once per forward into one buffer, not "
        "recomputed inside every layer's compiled rotation (the same values; bf16 tables "
        "rounded to bf16 as eager rounds them)",
    )


# --- putting it together ---------------------------------------------------------------


def describe_batch(micro: Choice, job: Job) -> str:
    """'per_device 4, checkpointing off' as a micro-batch choice leaves the job."""
    per_device = micro.sft.get("per_device_train_batch_size", job.per_device)
    ckpt = micro.sft.get("gradient_checkpointing", job.checkpointing)
    return f"per_device {per_device}, checkpointing {'on' if ckpt else 'off'}"


@dataclass(frozen=True)
class SpeedPlan:
    choices: tuple[Choice, ...]

    def sft_kwargs(self, valid_fields: list[str] | None = None) -> dict[str, Any]:
        """SFTConfig overrides; checkpointing under the name this transformers uses."""
        out: dict[str, Any] = {}
        for choice in self.choices:
            out.update(choice.sft)
        if "gradient_checkpointing" in out and "activation_checkpointing" in (valid_fields or []):
            out["activation_checkpointing"] = out.pop("gradient_checkpointing")
        return out

    @property
    def model_updates(self) -> dict[str, Any]:
        """Fields of spec.model (ModelSource) to override when loading."""
        out: dict[str, Any] = {}
        for choice in self.choices:
            out.update(choice.model)
        return out

    def on(self, lever: str) -> bool:
        return any(c.on for c in self.choices if c.lever == lever)

    def summary(self) -> dict[str, Any]:
        return {c.lever: {"on": c.on, "reason": c.reason} for c in self.choices}

    def log(self) -> None:
        for c in self.choices:
            log.info("speed %s: %s (%s)", c.lever, "on" if c.on else "off", c.reason)

    @property
    def static_length(self) -> int | None:
        """Tokens every packed micro-batch is padded to, when the compile lever pads."""
        for choice in self.choices:
            if choice.on and "pad_to_multiple_of" in choice.sft:
                return int(choice.sft["pad_to_multiple_of"])
        return None

    def apply(self, trainer: Any) -> None:
        """The levers that act on the built trainer rather than on its arguments."""
        if self.on("lightMetrics"):
            from .lean_steps import use_lean_steps

            done = use_lean_steps(trainer, static_batches=self.static_length is not None)
            log.info("speed lightMetrics: %s", done)
        if self.static_length is not None:
            use_static_batches(trainer, self.static_length)
        if self.on("castWeightsOncePerStep"):
            from .weight_copies import use_weight_copies

            fused = self.on("fuseGradientAccumulation")
            log.info("speed castWeightsOncePerStep: %s", use_weight_copies(trainer, fused))
        if self.on("bf16ResidualStream"):
            from .residual_stream import use_bf16_residual_stream

            log.info("speed bf16ResidualStream: %s", use_bf16_residual_stream(trainer))
        if self.on("rotaryTablesOnce"):
            from .rotary_tables import use_rotary_tables_once

            log.info("speed rotaryTablesOnce: %s", use_rotary_tables_once(trainer))


def decide(opt: SpeedOptions, hw: Hardware, job: Job, shape: ModelShape | None) -> SpeedPlan:
    flex = flex_attention(opt, hw, job)
    light = light_metrics(opt, hw, job)
    copies = cast_weights_once(opt, hw, job)  # its copies count in the micro-batch estimate
    # The lean head keeps its logits only over static batches (lean_steps.use_lean_steps);
    # whether batches are static does not depend on the micro-batch chosen.
    static = "pad_to_multiple_of" in compile_model(opt, hw, job, flex.on, job.per_device).sft
    sized = functools.partial(
        micro_batch, opt, hw, job, shape, attention_sparse=flex.on, lean_head=light.on and static
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
            reason = f"nothing fits with them (without them: {describe_batch(roomier, job)})"
        elif roomier.sft != micro.sft:
            reason = (
                f"they would change the micro-batch (without them: "
                f"{describe_batch(roomier, job)}; with them: {describe_batch(micro, job)})"
            )
        if reason:
            copies = Choice(copies.lever, False, f"auto: {reason}")
            micro = roomier
    per_device = int(micro.sft.get("per_device_train_batch_size", job.per_device))
    compiled = compile_model(opt, hw, job, flex=flex.on, per_device=per_device)
    choices = (
        flex,
        micro,
        liger(opt, hw, job, compiled=compiled.on),
        compiled,
        light,
        data_workers(opt, hw, job),
        copies,
        bf16_residual_stream(opt, hw, job),
        fuse_gradient_accumulation(opt, hw, job, copies),
        rotary_tables_once(opt, compiled),
    )
    return SpeedPlan(choices)


def options_from(spec: Any, env: dict[str, str] | None = None) -> SpeedOptions:
    env = dict(os.environ if env is None else env)
    from_spec = getattr(spec.training, "speed", None)
    if from_spec is not None and hasattr(from_spec, "model_dump"):
        from_spec = from_spec.model_dump(exclude_none=True)
    raw = env.get(ENV_SPEED, "").strip()
    try:
        from_env = json.loads(raw) if raw else None
        if from_env is not None and not isinstance(from_env, dict):
            raise ValueError("not a JSON object")
        return SpeedOptions.parse(from_spec, from_env)
    except ValueError as exc:  # JSONDecodeError included
        raise ConfigError(f"speed options ({ENV_SPEED} or spec.training.speed): {exc}") from None


def job_from(config: Any) -> Job:
    spec = config.spec
    training = spec.training
    resolved = config.resolved
    per_device = int(resolved["perDeviceTrainBatchSize"])
    accumulation = int(resolved["gradientAccumulationSteps"])
    return Job(
        method=str(resolved["method"]),
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
    )


def world_size(config: Any) -> int:
    """Training processes in the run: the pod topology, or the launcher's WORLD_SIZE."""
    from .settings import topology_from_env

    launched = int(os.environ.get("WORLD_SIZE") or 1)
    return max(topology_from_env(config).world_size, launched)


def model_shape(model: Any) -> ModelShape | None:
    """The shape from the model's config.json; None when it cannot be read."""
    try:
        from transformers import AutoConfig

        source = model.path or model.name
        config = AutoConfig.from_pretrained(
            source, revision=model.revision, trust_remote_code=model.trustRemoteCode
        )
        return ModelShape.from_config(config.get_text_config())
    except Exception as exc:  # the model load reports real problems; this only sizes
        log.info("speed: cannot read the model config (%s): batch sizing off", exc)
        return None


def plan_speed(config: Any) -> SpeedPlan:
    """The one entry point train.py calls: levers decided for this config on this machine."""
    spec = config.spec
    job = job_from(config)
    plan = decide(
        options_from(spec),
        Hardware.detect(use_cpu=bool(config.resolved["useCpu"])),
        job,
        model_shape(spec.model),
    )
    plan.log()
    if plan.on("compile"):
        # Before anything asks inductor for its cache: the first ask pins the /tmp default.
        keep_compiled_kernels(str(config.resolved["outputPath"]))
        if plan.on("flexAttention"):
            block_mask_in_graph()
    return plan


def use_static_batches(trainer: Any, length: int) -> None:
    """Make every packed micro-batch one shape, and keep TRL's token count honest.

    TRL pads the padding-free row to `length` (pad_to_multiple_of, set by the compile
    lever: position 0 and label -100 for each padding token, so under flex attention each
    is a document of its own and nothing attends to it). This drops the varlen keys,
    whose sizes change per batch and which flex attention does not read, and counts the
    padding; TRL counts `position_ids.size(1)` as tokens, so the padding is subtracted
    again (summed over ranks once per log, see lean_steps.TokenTally).
    """
    from .lean_steps import token_tally

    tally = token_tally(trainer)
    collate = trainer.data_collator

    def static_collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(examples)
        for key in VARLEN_KEYS:
            batch.pop(key, None)
        width = int(batch["input_ids"].size(1))
        real = sum(len(example["input_ids"]) for example in examples)
        if width != length:  # a row longer than maxLength: TRL truncates, so never here
            log.warning("static batches: a micro-batch came out %d tokens, not %d", width, length)
        batch[PADDING_KEY] = width - real
        return batch

    trainer.data_collator = static_collate
    compute_loss = trainer.compute_loss

    def compute_loss_without_padding(model: Any, inputs: dict[str, Any], *a: Any, **kw: Any) -> Any:
        padding = int(inputs.pop(PADDING_KEY, 0))
        result = compute_loss(model, inputs, *a, **kw)
        if model.training:
            tally.add(-padding)  # summed over ranks at the next log, with no sync now
        return result

    trainer.compute_loss = compute_loss_without_padding


ENV_INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR"
COMPILE_CACHE = ".sftjob-cache/torchinductor"


def keep_compiled_kernels(output_dir: str, env: MutableMapping[str, str] | None = None) -> str:
    """Keep inductor's compiled kernels beside the checkpoints, unless told otherwise.

    The default cache is in /tmp, which a restarted pod loses: a resume after an OOM or a
    preemption would compile for minutes again. On the output volume the next attempt
    finds the kernels already built (inductor's cache tolerates concurrent ranks).
    """
    env = os.environ if env is None else env
    if not env.get(ENV_INDUCTOR_CACHE):
        env[ENV_INDUCTOR_CACHE] = os.path.join(output_dir, COMPILE_CACHE)
    log.info(
        "compiled kernels (torch.compile, flex attention) cached in %s", env[ENV_INDUCTOR_CACHE]
    )
    return str(env[ENV_INDUCTOR_CACHE])


def block_mask_in_graph() -> None:
    """Let torch.compile trace flex attention's block mask into the model's graph.

    transformers (5.17) builds the mask with create_block_mask(_compile=True), which warns
    that the flag is deprecated on every call. Under torch.compile that warning is a graph
    break: the forward splits into about ten graphs, with the mask built eagerly between
    them, on every micro-step (measured on the GPU with TORCH_LOGS=graph_breaks). While
    tracing, this builds the same mask without the flag; eager calls, and masks that
    carry a padding mask, go to transformers' own function unchanged.
    """
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers import masking_utils

    try:
        library_mask = masking_utils.flex_attention_mask
        offsets = masking_utils.add_offsets_to_mask_function
        causal = masking_utils.causal_mask_function
        interface = masking_utils.AttentionMaskInterface
    except AttributeError as exc:  # another transformers: its own mask, graph breaks and all
        log.info("speed compile: flex block mask left to transformers (%s)", exc)
        return

    def flex_mask(
        batch_size: int,
        q_length: int,
        kv_length: int,
        q_offset: int = 0,
        kv_offset: int = 0,
        mask_function: Any = causal,
        attention_mask: Any = None,
        device: Any = "cpu",
        **kwargs: Any,
    ) -> Any:
        if attention_mask is not None or not torch.compiler.is_compiling():
            return library_mask(
                batch_size,
                q_length,
                kv_length,
                q_offset,
                kv_offset,
                mask_function,
                attention_mask,
                device,
                **kwargs,
            )
        shifted = offsets(mask_function, q_offset, kv_offset)
        return create_block_mask(shifted, batch_size, None, q_length, kv_length, device=device)

    interface.register("flex_attention", flex_mask)
