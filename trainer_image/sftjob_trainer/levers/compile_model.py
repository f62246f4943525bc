"""The compile lever: torch.compile over static batches, its kernel cache and block mask.

SFTConfig torch_compile, with every packed micro-batch padded to one static shape so the
model compiles once (CUDA with flex attention under "auto"). The launcher and the planner
also keep inductor's compiled kernels on the output volume (keep_compiled_kernels), and
the planner lets a compiled model trace flex attention's block mask (block_mask_in_graph).
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import Any

from .compile_cache import OUTPUT_CACHE_ROOT
from .contract import Choice, Contract, Hardware, Job, Plan, Signature, SpeedOptions, verified
from .static_batches import SIGNATURES as STATIC_BATCH_SIGNATURES
from .static_batches import static_length

SWITCH = "compile"

EXACT = False
NUMERICS = "inductor fuses and reorders the model's operations (other rounding)"
CONTRACT = Contract(
    versions=verified("torch", "transformers", "trl"),
    signatures=(
        Signature("trl:SFTConfig", includes=("torch_compile",)),
        *STATIC_BATCH_SIGNATURES,
        # block_mask_in_graph calls the library's mask with these, by position.
        Signature(
            "transformers.masking_utils:flex_attention_mask",
            (
                "batch_size",
                "q_length",
                "kv_length",
                "q_offset",
                "kv_offset",
                "mask_function",
                "attention_mask",
                "device",
                "kwargs",
            ),
        ),
        Signature(
            "transformers.masking_utils:add_offsets_to_mask_function",
            ("mask_function", "q_offset", "kv_offset"),
        ),
        Signature("transformers.masking_utils:causal_mask_function"),
        Signature("transformers.masking_utils:AttentionMaskInterface.register"),
    ),
)
# The planner's logger: the cache and static-batch lines read as they did in speed.py.
log = logging.getLogger("sftjob_trainer.speed")


REGIONAL = "regional"  # each decoder layer compiled once, in place; the rest eager
WHOLE = "whole"  # the whole model compiled (accelerate's torch.compile)


def decide(
    opt: SpeedOptions,
    hw: Hardware,
    job: Job,
    flex: bool,
    per_device: int,
    varlen_serves: bool = False,
) -> Choice:
    """torch.compile, with every packed micro-batch padded to ONE shape.

    TRL's padding-free batches change length with every micro-batch (and carry varlen
    keys whose sizes change too); a compiled model then recompiles again and again (about
    200 s of a 274 s run, measured). Padding each micro-batch to per_device x maxLength
    (padding tokens at position 0, so flex or SDPA puts each in its own document, labels
    -100) gives one graph. The padding is masked out of the loss and not counted as tokens.

    Its form (compile_form): the decoder layers only, with the varlen kernel attending
    inside them (`varlen_serves`: that kernel can attend for this model), or the whole
    model with flex attention.
    """
    name = SWITCH
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
    form = compile_form(job, varlen_serves)
    if opt.compile == "auto":
        short = short_cold_run(job, form)
        if short is not None:
            return Choice(name, False, short)
    sft: dict[str, Any] = {"torch_compile": True}
    static = static_length(job, per_device)
    if static is not None:
        sft["pad_to_multiple_of"] = static
    if form == REGIONAL:  # short: status.speedPlan keeps 256 characters, the cache's first
        batches = (
            f"micro-batches padded to {static} tokens"
            if static is not None
            else "batch shapes vary: expect recompiles"
        )
        reason = (
            f"decoder layers compiled (one graph, the varlen kernel inside), {batches}"
            + form_note(job, form)
        )
    elif static is None:
        reason = "torch.compile (batch shapes vary: expect recompiles)"
    else:
        reason = (
            f"torch.compile with every micro-batch padded to {static} tokens (one graph; "
            "padding masked, not trained on, not counted)"
        )
    return Choice(name, True, reason, sft=sft, variant=form)


def compile_form(job: Job, varlen_serves: bool) -> str:
    """REGIONAL or WHOLE: which compile finishes a run of this size first (measured).

    Compiling one decoder layer for all of them takes seconds cold (about 8 s for the 1.5B
    shape on an H100, 12 s with LoRA adapters) where the whole model takes minutes
    (~150 s; ~190 s with the adapters), for most of the whole model's speed (the varlen
    kernel in compiled layers: 45-48k tokens/s against 50-51k, LoRA 47.5k against 49.8k;
    uncompiled, 40-44k and LoRA 29.3k). So a run under `whole_over_regional_tokens` per
    GPU (~75M, LoRA ~178M) compiles its layers; one over it, or of unknown length, the
    whole model (the measured pair with flex attention). Regional needs the varlen kernel
    (the pair measured on the GPU), a full fine-tune or LoRA (the planner gives other
    methods no `whole_over_regional_tokens`) and one training process (all it has run as
    on a GPU; the whole model compiled under DDP was measured); $SFTJOB_COMPILE_REGIONS=on
    or off forces either form.
    """
    if job.compile_regions in ("on", "off"):
        return REGIONAL if job.compile_regions == "on" else WHOLE
    tokens, whole_from = job.run_tokens_per_gpu, job.whole_over_regional_tokens
    if (
        not varlen_serves
        or job.world_size != 1
        or tokens is None
        or whole_from is None
        or tokens >= whole_from
    ):
        return WHOLE
    return REGIONAL


def form_note(job: Job, form: str) -> str:
    """Why this form, when auto chose it by the run's size."""
    if job.compile_regions != "auto" or job.run_tokens_per_gpu is None:
        return ""
    whole_from = job.whole_over_regional_tokens
    if form == REGIONAL and whole_from is not None:
        return (
            f": at most {job.run_tokens_per_gpu / 1e6:.1f}M tokens per GPU, under the "
            f"{whole_from / 1e6:.0f}M where the whole model's compile pays back"
        )
    return ""


ENV_INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR"
COMPILE_CACHE = f"{OUTPUT_CACHE_ROOT}/torchinductor"
# Triton compiles the kernels that are not inductor's (liger's, TRL's log-probability head)
# into its own cache, ~/.triton by default: a pod loses it. The second uncompiled job on one
# H200 machine reached its first step 3.6 s sooner than the first (train() to first step 1.8
# s against 5.4 s, session 18), its Triton kernels already built.
ENV_TRITON_CACHE = "TRITON_CACHE_DIR"
TRITON_CACHE = f"{OUTPUT_CACHE_ROOT}/triton"


def keep_compiled_kernels(output_dir: str, env: MutableMapping[str, str] | None = None) -> str:
    """Keep inductor's compiled kernels (and Triton's) beside the checkpoints, unless told
    otherwise.

    The default cache is in /tmp, which a restarted pod loses: a resume after an OOM or a
    preemption would compile for minutes again. On the output volume the next attempt
    finds the kernels already built (inductor's cache tolerates concurrent ranks).
    """
    env = os.environ if env is None else env
    if not env.get(ENV_INDUCTOR_CACHE):
        env[ENV_INDUCTOR_CACHE] = os.path.join(output_dir, COMPILE_CACHE)
    if not env.get(ENV_TRITON_CACHE):
        env[ENV_TRITON_CACHE] = os.path.join(output_dir, TRITON_CACHE)
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


ENV_COMPILE_REGIONS = "SFTJOB_COMPILE_REGIONS"


def short_cold_run(job: Job, form: str = WHOLE) -> str | None:
    """Why compiling would make this run finish later, or None.

    A cold compile costs time before the first step (about 150 s for a 1.5B model on an
    H100, about 8 s for its decoder layers alone) and pays that back only after some
    millions of tokens per GPU (the measured break-even the operator's ShortRunCompiles
    advisory quotes). With the compiled artifacts of this shape at hand (compile_cache.py)
    the cost is seconds, so a warm cache always compiles; a run not known to be short
    compiles too.
    """
    tokens = job.run_tokens_per_gpu
    payback = job.regional_payback_tokens if form == REGIONAL else job.compile_payback_tokens
    if tokens is None or payback is None or tokens >= payback:
        return None
    if job.compile_cache_warm is not False:  # warm, or not looked up yet
        return None
    return (
        f"a short run with a cold compile cache: at most {tokens / 1e6:.1f}M tokens per GPU, "
        f"under the {payback / 1e6:.1f}M after which compiling pays back; compile: on "
        "compiles anyway (and keeps the artifacts for the next job of this shape)"
    )


def compile_regions(trainer: Any) -> int:
    """Compile each repeated block (decoder layer) once instead of the whole model; the
    blocks compiled (0: none found, the whole model is compiled as usual).

    The blocks share one compiled graph, so a model of 28 layers compiles one layer, not
    28 inlined ones (on CPU, a 4-layer Qwen2: 10.5 s against 41.2 s, the same loss to the
    bit and gradients within 3e-8). What runs between the blocks (embedding, final norm,
    LM head and loss) runs eagerly. compile_form says when.

    The blocks are compiled in place (`module.compile()`), and accelerate's own compile
    is turned off. Its `use_regional_compilation` builds a NEW model object with compiled
    copies of the blocks, but the lean LM head (lightMetrics) has replaced the model's
    forward with one that calls the ORIGINAL model's layers: on the GPU, where that lever
    is on, nothing but flex attention was compiled (session 14: the same three graphs as
    an uncompiled run, and its speed).
    """
    plugin = getattr(getattr(trainer.accelerator, "state", None), "dynamo_plugin", None)
    if plugin is None:
        log.warning("speed compile: no dynamo plugin on the accelerator; whole model compiled")
        return 0
    from accelerate.utils import DynamoBackend

    blocks = compile_repeated_blocks(trainer.model, **plugin.to_kwargs())
    if blocks:
        plugin.backend = DynamoBackend.NO  # the blocks are compiled: not the model again
    return blocks


def compile_repeated_blocks(model: Any, **compile_kwargs: Any) -> int:
    """`.compile()` in place every block of each list of blocks of one class (a model's
    decoder layers); nothing inside a compiled block is compiled again. Blocks compiled."""
    import torch

    compiled = 0
    pending = [model]
    while pending:
        module = pending.pop()
        children = list(module.children())
        repeated = (
            isinstance(module, torch.nn.ModuleList)
            and len(children) > 1
            and len({type(child) for child in children}) == 1
        )
        if repeated:
            for block in children:
                block.compile(**compile_kwargs)
            compiled += len(children)
        else:
            pending.extend(children)
    return compiled


def apply(trainer: Any, plan: Plan) -> str | None:
    """Regional compilation where the plan compiles that way. (The plan applies the static
    batches and the compile cache itself: an uncompiled run with flex attention has them
    too.)"""
    if plan.variant(SWITCH) != REGIONAL:
        return None
    blocks = compile_regions(trainer)
    if not blocks:
        return "regional compilation asked, but no repeated blocks found: whole model compiled"
    return f"regional compilation ({blocks} repeated blocks compiled in place, one graph)"
