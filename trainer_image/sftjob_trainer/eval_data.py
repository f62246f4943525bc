"""The evaluation rows (spec.dataset.eval) and the SFTConfig settings that evaluate on them.

Three sources: a split of the same hub dataset, a file or folder, or a fraction held out of
the training rows (after dataset.limit) with datasets' `train_test_split(test_size, seed)`,
which puts ceil(fraction x rows) rows in the eval split (sftjob_operator.plan.held_out_rows
plans with the same figure). Eval rows are checked like training rows and must have the
training data's format.

Evaluation runs every training.evalSteps steps, else every saveSteps, so each checkpoint has
an eval loss. output.keepBest is transformers' load_best_model_at_end by `eval_loss`
(lower is better): the best checkpoint survives save_total_limit's rotation and is loaded
at the end, so the final model is the best one. transformers accepts save_steps a multiple
of eval_steps, but it records the best evaluation's step and keeps a checkpoint only if one
was saved at that step: a best loss between checkpoints leaves an older one (or none) as
"best". So keepBest evaluates exactly at the checkpoints (evalSteps empty or equal to
saveSteps); the spec's cross-field rules refuse other combinations before a pod starts.
"""

from __future__ import annotations

from typing import Any

from sftjob_operator.api import DatasetSource, SFTJobSpec

from .data import detect_format, load_rows, validate_rows
from .failures import DataError


def split_eval(dataset: Any, source: DatasetSource, fmt: str) -> tuple[Any, Any]:
    """(training rows, eval rows or None) for `source.eval`."""
    spec = source.eval
    if spec is None:
        return dataset, None
    if spec.fraction is not None:
        if len(dataset) < 2:
            raise DataError(
                f"dataset.eval.fraction {spec.fraction:g} needs at least 2 rows to hold out "
                f"from, the dataset has {len(dataset)}"
            )
        parts = dataset.train_test_split(test_size=spec.fraction, seed=spec.seed)
        return parts["train"], parts["test"]
    if spec.split is not None:
        eval_source = source.model_copy(update={"split": spec.split, "limit": None, "eval": None})
    else:
        eval_source = DatasetSource(
            path=spec.path, format=source.format, textField=source.textField
        )
    rows = load_rows(eval_source)
    if len(rows) == 0:
        raise DataError(f"dataset.eval ({spec.split or spec.path}) has no rows")
    eval_fmt = detect_format(list(rows.column_names), source.format, source.textField)
    if eval_fmt != fmt:
        raise DataError(
            f"dataset.eval ({spec.split or spec.path}) is {eval_fmt} data but the training "
            f"data is {fmt}: give eval rows in the training data's format"
        )
    validate_rows(rows, fmt, source.textField)
    return dataset, rows


def eval_sft_kwargs(spec: SFTJobSpec, per_device: int) -> dict[str, Any]:
    """SFTConfig settings for dataset.eval, training.evalSteps and output.keepBest."""
    if spec.dataset.eval is None:
        return {}
    training = spec.training
    kwargs: dict[str, Any] = {
        "eval_strategy": "steps",
        "eval_steps": training.evalSteps or training.saveSteps,
        "per_device_eval_batch_size": per_device,
    }
    if spec.output.keepBest:
        kwargs.update(
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
            greater_is_better=False,
        )
    return kwargs
