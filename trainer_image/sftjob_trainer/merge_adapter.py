"""`output.mergeAdapter`: the base model with the trained LoRA adapter merged in.

The base is loaded again from its source in its stored dtype (`dtype="auto"`), on the
CPU, and the adapter from final/ is merged into it (peft's merge_and_unload). Merging the
trained model in place would merge into QLoRA's 4-bit weights (a lossy re-quantization)
and into a model the Trainer may still wrap; a fresh load is the same for every method.
The result is written to <output>/merged.partial and renamed to merged/ only when
complete, so a crash never leaves a half-written model under the name users load.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from sftjob_operator.api import ModelSource

from .failures import ModelLoadError, load_failure
from .model import _source

log = logging.getLogger("sftjob_trainer.merge_adapter")


def merged_model(model: ModelSource, adapter: Path) -> Any:
    """The base model of `model` with the adapter in `adapter` merged in (on the CPU)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source = _source(model)
    try:
        base = AutoModelForCausalLM.from_pretrained(
            source, revision=model.revision, trust_remote_code=model.trustRemoteCode, dtype="auto"
        )
    except Exception as exc:
        raise load_failure(
            ModelLoadError, f"cannot load model {source} to merge the adapter: {exc}", exc
        ) from None
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def save_merged_model(model: ModelSource, adapter: Path, target: Path) -> Path:
    """Write the merged model and the adapter's tokenizer to `target`, atomically by rename."""
    from transformers import AutoTokenizer

    merged = merged_model(model, adapter)
    partial = target.with_name(f"{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(str(partial))
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(partial))
    if target.exists():  # this job's earlier result (a resumed run that finished again)
        shutil.rmtree(target)
    partial.rename(target)
    log.info("merged the adapter into %s: %s", _source(model), target)
    return target
