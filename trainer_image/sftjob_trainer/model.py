"""Loading the base model and tokenizer, and the peft settings of each method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftjob_operator.api import ModelSource

from .failures import ConfigError, ModelLoadError, load_failure


def _source(model: ModelSource) -> str:
    if model.path is not None:
        if not Path(model.path).exists():
            raise ModelLoadError(
                f"model.path {model.path} does not exist (is the volume mounted, the path right?)"
            )
        return model.path
    assert model.name is not None  # the spec requires exactly one of name or path
    return model.name


def quantization_config() -> Any:
    """The 4-bit bitsandbytes config of QLoRA; needs a CUDA GPU and bitsandbytes."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels) and none is visible: "
            "use method: lora, or give the job GPUs (resources.gpusPerNode >= 1)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            "method qlora needs the bitsandbytes package, which this trainer image lacks: "
            "use method: lora or an image with bitsandbytes installed"
        ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**QLORA_QUANTIZATION)


# QLoRA's 4-bit settings (nf4, double quantization, bf16 compute): the paper's recipe.
QLORA_QUANTIZATION = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_use_double_quant": True,
}


def load_tokenizer(model: ModelSource) -> Any:
    from transformers import AutoTokenizer

    source = model.tokenizer or _source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            revision=model.revision if model.tokenizer is None else None,
            trust_remote_code=model.trustRemoteCode,
        )
    except Exception as exc:
        # A hub 5xx or a connection reset is NetworkError (relaunched after a backoff); a
        # missing repo, file or token stays ModelLoadError (never retried).
        raise load_failure(
            ModelLoadError, f"cannot load tokenizer {source}: {type(exc).__name__}: {exc}", exc
        ) from None
    if tokenizer.pad_token is None:
        # Batching needs a pad token; most causal LMs reuse eos, as TRL does.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: ModelSource, *, method: str, use_cpu: bool) -> Any:
    """The base model; float32 weights (TRL's default) with bf16 autocast when enabled."""
    import torch
    from transformers import AutoModelForCausalLM

    source = _source(model)
    kwargs: dict[str, Any] = {
        "revision": model.revision,
        "trust_remote_code": model.trustRemoteCode,
        "dtype": torch.float32,
    }
    if model.attnImplementation:
        kwargs["attn_implementation"] = model.attnImplementation
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config()
        kwargs["dtype"] = torch.bfloat16
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        raise load_failure(
            ModelLoadError, f"cannot load model {source}: {type(exc).__name__}: {exc}", exc
        ) from None
    if use_cpu and method == "qlora":
        raise ConfigError("method qlora cannot run on CPU")
    return loaded


def lora_config(lora: dict[str, Any] | None) -> Any:
    """peft LoraConfig from resolved.lora; None for a full fine-tune."""
    if not lora:
        return None
    from peft import LoraConfig

    targets: Any = list(lora.get("targetModules") or ["all-linear"])
    # peft treats the string "all-linear" specially; inside a list it is a module name.
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=int(lora["r"]),
        lora_alpha=int(lora["alpha"]),
        lora_dropout=float(lora["dropout"]),
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
