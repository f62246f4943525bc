"""The ligerKernel lever: liger's Triton kernels for the layers' norms and activations.

Liger's RMSNorm/SwiGLU/RoPE kernels when liger_kernel imports. TRL 1.16 already fuses the LM
head with the loss (chunked, no full logits) and refuses liger's fused linear cross-entropy,
so only the layer kernels are left to gain.
"""

from __future__ import annotations

from .contract import Choice, Contract, Hardware, Job, Signature, SpeedOptions, verified

SWITCH = "ligerKernel"

EXACT = False
NUMERICS = "liger's Triton kernels for norms and activations round otherwise"
CONTRACT = Contract(
    versions=verified("transformers", "trl"),
    signatures=(Signature("trl:SFTConfig", includes=("use_liger_kernel",)),),
)


def decide(opt: SpeedOptions, hw: Hardware, job: Job, compiled: bool = False) -> Choice:
    name = SWITCH
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
