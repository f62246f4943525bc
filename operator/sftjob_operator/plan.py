"""The step plan: exactly the optimizer steps transformers' Trainer will run.

The reference formula (steps_per_epoch = ceil(N / effective_batch)) is what people
quote, but the Trainer counts differently: each process gets ceil(N / per_device)
micro-batches split over the ranks (accelerate pads the last one out to every rank),
accumulation rounds up per rank, fractional epochs round the total up, and
drop_last floors instead. The functions here reproduce the Trainer's arithmetic,
including its float expression for fractional epochs, so `totalSteps` equals
`trainer.state.max_steps` for the same inputs.

N is the row count after preparation. Packing changes it (several samples per row)
and SFTTrainer drops rows whose labels are all masked, so with packing or an
unknown size the plan is marked as an estimate and the trainer reports the
measured figures once it has prepared the data.
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


def plan_for(spec: SFTJobSpec, dataset_size: int | None = None) -> Plan:
    """The plan for `spec`; `dataset_size` overrides what the spec declares (limit/numSamples).

    Raises SpecError when the Trainer could not run the spec at all (an empty dataloader).
    """
    training = spec.training
    shape = batch_shape(spec)
    declared = spec.dataset.known_size()
    notes: list[str] = []
    if dataset_size is not None:
        rows: int | None = dataset_size
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

    estimate = False
    if rows is None:
        estimate = True
        notes.append(
            "dataset size unknown until the trainer loads it: set dataset.limit or "
            "dataset.numSamples for an exact plan"
        )
    if training.packing:
        estimate = True
        notes.append(
            f"packing ({training.packingStrategy}) merges samples into {training.maxLength}-token "
            "rows, so the row count is known only after tokenizing; figures use the sample count "
            "and the trainer reports the measured plan"
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
    )


def reference_steps_per_epoch(rows: int, effective_batch: int) -> int:
    """The reference's simple formula, kept to explain where the Trainer differs."""
    return math.ceil(rows / effective_batch)
