"""The step plan: exactly the optimizer steps transformers' Trainer will run.

The reference formula (steps_per_epoch = ceil(N / effective_batch)) is what people
quote, but the Trainer counts differently: each process gets ceil(N / per_device)
micro-batches split over the ranks (accelerate pads the last one out to every rank),
accumulation rounds up per rank, fractional epochs round the total up, and
drop_last floors instead. The functions here reproduce the Trainer's arithmetic,
including its float expression for fractional epochs, so `totalSteps` equals
`trainer.state.max_steps` for the same inputs.

N is the row count after preparation. Packing changes it (several samples per row)
and SFTTrainer drops rows whose labels are all masked after truncation to maxLength
(TRL 1.16 `_prepare_dataset`, without packing only: a prompt filling maxLength under
completion-only loss, or every assistant token beyond it under assistant_only_loss).
So with packing, with masks that can empty a row, or with an unknown size the plan is
marked as an estimate, and the trainer reports the measured figures (and how many rows
it truncated and dropped) once it has prepared the data. A planner that can run the
model's tokenizer over the data (`sftjob plan` with local files) passes the prepared
row count it found as `PreparedRows`: the plan is then exact for those files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .api import FieldError, Plan, SFTJobSpec, SpecError


@dataclass(frozen=True)
class BatchShape:
    per_device: int
    accumulation: int
    world_size: int

    @property
    def effective(self) -> int:
        return self.per_device * self.accumulation * self.world_size


# How a packed plan's row count was found: the sample count as rows (an upper bound, as
# packing only merges), or a pass of the model's tokenizer over the data.
PACKED_ESTIMATES = ("rough", "tokenized")


@dataclass(frozen=True)
class PreparedRows:
    """Rows after TRL's preparation, found by running it with the model's tokenizer.

    `rows` is what the Trainer iterates (packed rows with packing); `truncated` and
    `dropped` count the rows over maxLength that were cut or removed.
    """

    rows: int
    truncated: int
    dropped: int


class EmptyDataloader(ValueError):
    """drop_last would leave a rank with no micro-batch: the Trainer cannot start."""


def micro_batches_per_rank(rows: int, per_device: int, world_size: int, drop_last: bool) -> int:
    """Micro-batches each process draws in one epoch."""
    if drop_last:
        return (rows // per_device) // world_size
    return math.ceil(math.ceil(rows / per_device) / world_size)


def steps_per_epoch(rows: int, shape: BatchShape, drop_last: bool = False) -> int:
    """Optimizer steps in one epoch, as the Trainer computes num_update_steps_per_epoch."""
    batches = micro_batches_per_rank(rows, shape.per_device, shape.world_size, drop_last)
    if batches == 0:
        raise EmptyDataloader(
            f"{rows} rows with dataloaderDropLast give no full micro-batch of "
            f"{shape.per_device} on each of {shape.world_size} processes"
        )
    # The Trainer floors batches/accumulation but never goes below one update per epoch,
    # and the last partial accumulation still steps the optimizer: that is a ceil.
    return max(math.ceil(batches / shape.accumulation), 1)


def total_steps(per_epoch: int, epochs: float, max_steps: int | None) -> int:
    if max_steps is not None and max_steps > 0:
        return max_steps
    # Same float expression as the Trainer: math.ceil(num_train_epochs * steps_per_epoch).
    return math.ceil(epochs * per_epoch)


def warmup_steps(total: int, ratio: float, explicit_steps: int | None) -> int:
    """transformers converts a float warmup_steps < 1 as ceil(total * ratio); >= 1 is int()."""
    if explicit_steps is not None:
        return explicit_steps
    if ratio <= 0:
        return 0
    return math.ceil(total * ratio)


def batch_shape(spec: SFTJobSpec) -> BatchShape:
    return BatchShape(
        per_device=spec.training.perDeviceTrainBatchSize,
        accumulation=spec.training.gradientAccumulationSteps,
        world_size=spec.resources.world_size,
    )


def held_out_rows(rows: int, fraction: float) -> int:
    """Rows datasets' train_test_split(test_size=fraction) puts in the test split."""
    return math.ceil(fraction * rows)


def why_rows_can_be_dropped(spec: SFTJobSpec) -> str | None:
    """Why TRL may drop rows over maxLength for this spec (so the row count is not known).

    TRL drops rows whose labels are all masked after truncation; only masks can do that,
    and only without packing (packing never truncates into a row's labels).
    """
    training = spec.training
    if training.packing:
        return None
    extra = training.extraArgs
    if extra.get("assistant_only_loss") is True:
        return (
            "assistant_only_loss: a row whose assistant tokens all lie beyond maxLength "
            f"{training.maxLength} is dropped"
        )
    if (
        spec.dataset.format == "prompt-completion"
        and extra.get("completion_only_loss") is not False
        and extra.get("truncation_mode", "keep_start") == "keep_start"
    ):
        return (
            f"completion-only loss: a row whose prompt fills maxLength {training.maxLength} "
            "is dropped"
        )
    return None


def plan_for(
    spec: SFTJobSpec, dataset_size: int | None = None, prepared: PreparedRows | None = None
) -> Plan:
    """The plan for `spec`; `dataset_size` overrides what the spec declares (limit/numSamples).

    `prepared` is the training rows after preparation, found with the model's tokenizer:
    it replaces every estimate of the row count.
    Raises SpecError when the Trainer could not run the spec at all (an empty dataloader).
    """
    training = spec.training
    shape = batch_shape(spec)
    declared = spec.dataset.known_size()
    notes: list[str] = []
    if prepared is not None:
        rows: int | None = prepared.rows
        source = "tokenized"
    elif dataset_size is not None:
        rows = dataset_size
        source = "override"
        if spec.dataset.limit is not None and spec.dataset.limit < dataset_size:
            rows = spec.dataset.limit
            source = "limit"
    elif declared is not None:
        rows = declared
        source = "limit" if declared == spec.dataset.limit else "numSamples"
    else:
        rows = None
        source = "unknown"

    held_out = spec.dataset.eval.fraction if spec.dataset.eval is not None else None
    if held_out is not None and rows is not None and prepared is None:
        evaluated = held_out_rows(rows, held_out)
        notes.append(f"dataset.eval.fraction {held_out:g} holds out {evaluated} of {rows} rows")
        rows -= evaluated

    estimate = False
    packed_estimate: str | None = None
    if prepared is not None:
        notes.append(
            f"rows counted by running the model's tokenizer and TRL's data preparation over "
            f"the data: {prepared.truncated} rows truncated to maxLength {training.maxLength}, "
            f"{prepared.dropped} dropped"
        )
        if training.packing:
            packed_estimate = "tokenized"
    elif rows is None:
        estimate = True
        notes.append(
            "dataset size unknown until the trainer loads it: set dataset.limit or "
            "dataset.numSamples for an exact plan"
        )
    if training.packing and prepared is None:
        estimate = True
        packed_estimate = "rough"
        notes.append(
            f"packing ({training.packingStrategy}) merges samples into {training.maxLength}-token "
            "rows, so the row count is known only after tokenizing; figures use the sample count "
            "(rough: an upper bound) and the trainer reports the measured plan"
        )
    dropping = why_rows_can_be_dropped(spec) if prepared is None else None
    if dropping is not None:
        estimate = True
        notes.append(
            f"{dropping}, so fewer rows may train than the figures assume; the trainer reports "
            "the measured plan and the rows it truncated and dropped"
        )

    per_epoch: int | None = None
    if rows is not None:
        try:
            per_epoch = steps_per_epoch(rows, shape, training.dataloaderDropLast)
        except EmptyDataloader as exc:
            raise SpecError(
                [
                    FieldError(
                        path="spec.training.dataloaderDropLast",
                        message=f"{exc}: the Trainer would fail. Set dataloaderDropLast: false "
                        "or lower perDeviceTrainBatchSize",
                    )
                ]
            ) from None

    total: int | None
    epochs: float | None
    if training.maxSteps is not None:
        total = training.maxSteps
        epochs = round(total / per_epoch, 4) if per_epoch else None
        if per_epoch:
            notes.append(f"maxSteps {total} overrides numTrainEpochs: {total}/{per_epoch} epochs")
    elif per_epoch is not None:
        total = total_steps(per_epoch, training.numTrainEpochs, None)
        epochs = training.numTrainEpochs
    else:
        total = None
        epochs = training.numTrainEpochs

    warmup = (
        warmup_steps(total, training.warmupRatio, training.warmupSteps)
        if total is not None
        else training.warmupSteps
    )
    return Plan(
        datasetSize=rows,
        datasetSizeSource=source,
        worldSize=shape.world_size,
        effectiveBatchSize=shape.effective,
        perDeviceTrainBatchSize=shape.per_device,
        gradientAccumulationSteps=shape.accumulation,
        stepsPerEpoch=per_epoch,
        totalSteps=total,
        epochs=epochs,
        warmupSteps=warmup,
        estimate=estimate,
        measured=False,
        notes=notes,
        rowsTruncated=prepared.truncated if prepared is not None else None,
        rowsDropped=prepared.dropped if prepared is not None else None,
        packedEstimate=packed_estimate,
    )


def reference_steps_per_epoch(rows: int, effective_batch: int) -> int:
    """The reference's simple formula, kept to explain where the Trainer differs."""
    return math.ceil(rows / effective_batch)
