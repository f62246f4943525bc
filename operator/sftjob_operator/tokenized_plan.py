"""The row count after TRL's preparation, for a planner that can reach the tokenizer and data.

The operator cannot: it downloads nothing and mounts no volume, so its packed plans stay
rough (the sample count as rows, an upper bound) and say so (`packedEstimate: rough`). The
command line often can: `sftjob plan` on a manifest whose model (or model.tokenizer) and
dataset.path are on this machine runs the model's tokenizer and TRL's preparation over the
data without loading the model (sftjob_trainer.prepared_rows), and the plan is then exact
for those files (`datasetSizeSource: tokenized`, `packedEstimate: tokenized`), with the
rows over maxLength counted. It needs the trainer's packages (torch, transformers, TRL);
without them, or for hub sources, the plan stays as the operator computes it, with a note.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .api import SFTJob, SFTJobSpec
from .plan import PreparedRows, why_rows_can_be_dropped


@dataclass(frozen=True)
class Tokenized:
    """A tokenizer pass's result: the prepared rows, or why there are none."""

    rows: PreparedRows | None = None
    note: str | None = None


def worth_tokenizing(spec: SFTJobSpec) -> bool:
    """Only a plan whose row count is an estimate gains from the pass (packing, dropping)."""
    return spec.training.packing or why_rows_can_be_dropped(spec) is not None


def unreachable(spec: SFTJobSpec, is_dir: Callable[[str], bool] = os.path.isdir) -> str | None:
    """Why this machine cannot run the model's tokenizer over the data, or None."""
    tokenizer = spec.model.tokenizer or spec.model.path
    if tokenizer is None or not is_dir(tokenizer):
        where = spec.model.tokenizer or spec.model.path or spec.model.name
        return f"the tokenizer ({where}) is not a folder on this machine"
    if spec.dataset.path is None or not os.path.exists(spec.dataset.path):
        where = spec.dataset.path or spec.dataset.uri or spec.dataset.name
        return f"the dataset ({where}) is not on this machine"
    eval_path = spec.dataset.eval.path if spec.dataset.eval is not None else None
    if eval_path is not None and not os.path.exists(eval_path):
        return f"dataset.eval.path ({eval_path}) is not on this machine"
    return None


def tokenize(job: SFTJob) -> Tokenized:
    """Run the tokenizer pass for `job`, or say why it cannot run here."""
    why = unreachable(job.spec)
    if why is not None:
        return Tokenized(note=f"no tokenizer pass: {why}")
    try:
        from sftjob_trainer.prepared_rows import tokenized_rows
        from sftjob_trainer.settings import TrainerConfig
    except ImportError as exc:
        return Tokenized(note=f"no tokenizer pass: the trainer's packages are missing ({exc})")
    from .trainer_config import build_trainer_config

    # The rows are counted before any plan exists; the config's plan is not read.
    config = TrainerConfig(raw=build_trainer_config(job), spec=job.spec)
    try:
        counts = tokenized_rows(config)
    except Exception as exc:  # noqa: BLE001 - the trainer will report it; the plan stays rough
        return Tokenized(note=f"no tokenizer pass: {type(exc).__name__}: {exc}")
    return Tokenized(rows=counts.as_prepared_rows())
