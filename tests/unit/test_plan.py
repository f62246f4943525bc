"""The step plan against the reference's worked examples and a simulated Trainer loop.

The simulator below walks the dataloader the way transformers' Trainer and accelerate
do (micro-batches sharded over ranks with even batches, accumulation, the last partial
accumulation still stepping, epochs cut at max_steps), counting optimizer steps one by
one. It shares no arithmetic with plan.py, so a formula slip there shows up here.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from sftjob_operator.api import SpecError, parse_spec
from sftjob_operator.plan import PreparedRows, plan_for, reference_steps_per_epoch


def make_spec(
    rows: int | None = None,
    *,
    gpus: int = 1,
    nodes: int = 1,
    per_device: int = 2,
    accumulation: int = 8,
    epochs: float = 3,
    max_steps: int | None = None,
    drop_last: bool = False,
    packing: bool = False,
    warmup_ratio: float = 0.03,
):
    dataset: dict[str, Any] = {"name": "org/data"}
    if rows is not None:
        dataset["limit"] = rows
    training: dict[str, Any] = {
        "perDeviceTrainBatchSize": per_device,
        "gradientAccumulationSteps": accumulation,
        "numTrainEpochs": epochs,
        "dataloaderDropLast": drop_last,
        "packing": packing,
        "warmupRatio": warmup_ratio,
    }
    if max_steps is not None:
        training["maxSteps"] = max_steps
    return parse_spec(
        {
            "model": {"name": "org/model"},
            "dataset": dataset,
            "training": training,
            "resources": {"nodes": nodes, "gpusPerNode": gpus},
        }
    )


def simulated_rank_batches(rows: int, per_device: int, world: int, drop_last: bool) -> int:
    """Micro-batches rank 0 receives, by dealing batches out one at a time."""
    batches = []
    start = 0
    while start < rows:
        size = min(per_device, rows - start)
        if size == per_device or not drop_last:
            batches.append(size)
        start += per_device
    dealt = [0] * world
    for index in range(len(batches)):
        dealt[index % world] += 1
    if drop_last:
        # accelerate drops the trailing round that not every rank can fill.
        return min(dealt)
    # even_batches: ranks short of a batch are topped up by cycling from the start.
    return max(dealt)


def simulated_trainer_steps(rows, per_device, accumulation, world, epochs, max_steps, drop_last):
    per_rank = simulated_rank_batches(rows, per_device, world, drop_last)
    updates_per_epoch = 0
    for micro in range(1, per_rank + 1):
        if micro % accumulation == 0 or micro == per_rank:
            updates_per_epoch += 1
    updates_per_epoch = max(updates_per_epoch, 1)
    target = max_steps if max_steps else math.ceil(epochs * updates_per_epoch)
    done = 0
    epoch = 0
    while done < target:
        for _ in range(updates_per_epoch):
            done += 1
            if done >= target:
                break
        epoch += 1
    return updates_per_epoch, done


# The reference's worked examples, which the plan must reproduce exactly.
def test_reference_example_three_epochs() -> None:
    plan = plan_for(make_spec(10_000, gpus=2, per_device=4, accumulation=8, epochs=3))
    assert (plan.effectiveBatchSize, plan.stepsPerEpoch, plan.totalSteps) == (64, 157, 471)
    assert reference_steps_per_epoch(10_000, 64) == 157


def test_reference_example_max_steps() -> None:
    plan = plan_for(make_spec(10_000, gpus=2, per_device=4, accumulation=8, max_steps=1000))
    assert (plan.effectiveBatchSize, plan.stepsPerEpoch, plan.totalSteps) == (64, 157, 1000)
    assert plan.epochs == pytest.approx(6.37, abs=0.005)


def test_reference_example_small() -> None:
    plan = plan_for(make_spec(1_000, gpus=1, per_device=2, accumulation=8, epochs=3))
    assert (plan.effectiveBatchSize, plan.stepsPerEpoch, plan.totalSteps) == (16, 63, 189)
    assert plan.warmupSteps == math.ceil(189 * 0.03) == 6
    assert plan.estimate is False


def test_nested_rounding_equals_the_simple_formula_without_drop_last() -> None:
    # ceil(ceil(ceil(N/p)/w)/a) == ceil(N/(p*w*a)) for positive integers, so the reference
    # formula holds unless drop_last floors instead: there the Trainer runs fewer steps.
    assert (
        plan_for(make_spec(17, gpus=4, per_device=1, accumulation=4, epochs=1)).stepsPerEpoch == 2
    )
    assert reference_steps_per_epoch(17, 16) == 2
    dropped = plan_for(
        make_spec(10, gpus=2, per_device=3, accumulation=1, epochs=1, drop_last=True)
    )
    assert dropped.stepsPerEpoch == 1  # floor(floor(10/3)/2); the simple formula says 2
    assert reference_steps_per_epoch(10, 6) == 2


def test_dataset_smaller_than_one_batch_still_steps_once() -> None:
    plan = plan_for(make_spec(3, gpus=2, per_device=4, accumulation=8, epochs=3))
    assert (plan.stepsPerEpoch, plan.totalSteps) == (1, 3)


def test_fractional_epochs_round_up_and_stop_mid_epoch() -> None:
    plan = plan_for(make_spec(1_000, per_device=2, accumulation=8, epochs=1.5))
    assert plan.totalSteps == math.ceil(1.5 * 63) == 95


def test_drop_last_with_an_empty_dataloader_is_an_invalid_spec() -> None:
    with pytest.raises(SpecError) as caught:
        plan_for(make_spec(5, gpus=4, per_device=2, drop_last=True))
    assert caught.value.errors[0].path == "spec.training.dataloaderDropLast"
    assert "Trainer would fail" in caught.value.errors[0].message


def test_unknown_size_is_pending() -> None:
    plan = plan_for(make_spec(None))
    assert plan.estimate is True
    assert plan.totalSteps is None and plan.stepsPerEpoch is None
    assert any("dataset size unknown" in n for n in plan.notes)


def test_unknown_size_with_max_steps_still_knows_the_total() -> None:
    plan = plan_for(make_spec(None, max_steps=500))
    assert plan.totalSteps == 500 and plan.warmupSteps == 15
    assert plan.stepsPerEpoch is None


def test_packing_marks_the_plan_as_an_estimate() -> None:
    plan = plan_for(make_spec(1_000, packing=True))
    assert plan.estimate is True
    assert (plan.stepsPerEpoch, plan.totalSteps) == (63, 189)


def test_dataset_size_override_and_limit() -> None:
    spec = make_spec(None)
    assert plan_for(spec, dataset_size=320).datasetSize == 320
    # limit caps whatever the dataset really holds, like .select(range(limit)).
    capped = plan_for(make_spec(100), dataset_size=5000)
    assert (capped.datasetSize, capped.datasetSizeSource) == (100, "limit")


def test_cpu_job_world_size_is_one_process_per_node() -> None:
    plan = plan_for(make_spec(100, gpus=0, nodes=2, per_device=4, accumulation=2, epochs=1))
    assert plan.worldSize == 2 and plan.effectiveBatchSize == 16
    assert plan.stepsPerEpoch == 7  # ceil(ceil(100/4)/2)=13 -> ceil(13/2)=7


def test_warmup_ratio_zero_means_no_warmup() -> None:
    assert plan_for(make_spec(1000, warmup_ratio=0)).warmupSteps == 0


def random_configs(count: int, seed: int = 20261128):
    rng = random.Random(seed)
    for _ in range(count):
        yield {
            "rows": rng.choice([rng.randint(1, 40), rng.randint(1, 3000), rng.randint(1, 120_000)]),
            "gpus": rng.choice([0, 1, 2, 4, 8]),
            "nodes": rng.choice([1, 1, 2, 3, 4]),
            "per_device": rng.choice([1, 2, 3, 4, 8, 16]),
            "accumulation": rng.choice([1, 2, 3, 4, 8, 16, 32]),
            "epochs": rng.choice([1, 2, 3, 0.5, 1.5, 2.7, 0.1, 4.25]),
            "max_steps": rng.choice([None, None, None, 1, 37, 1000]),
            "drop_last": rng.random() < 0.3,
        }


GRID = list(random_configs(600))


def test_grid_is_large_and_covers_the_hard_cases() -> None:
    assert len(GRID) >= 500
    assert any(c["drop_last"] for c in GRID)
    assert any(c["max_steps"] for c in GRID)
    assert any(c["nodes"] > 1 for c in GRID)
    assert any(c["epochs"] % 1 for c in GRID)
    assert any(c["rows"] < c["per_device"] * max(c["gpus"], 1) * c["nodes"] for c in GRID)


@pytest.mark.parametrize("config", GRID, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_plan_matches_the_simulated_trainer(config: dict[str, Any]) -> None:
    spec = make_spec(**config)
    world = config["nodes"] * max(config["gpus"], 1)
    expected_empty = config["drop_last"] and (config["rows"] // config["per_device"]) < world
    if expected_empty:
        with pytest.raises(SpecError):
            plan_for(spec)
        return
    plan = plan_for(spec)
    per_epoch, total = simulated_trainer_steps(
        config["rows"],
        config["per_device"],
        config["accumulation"],
        world,
        config["epochs"],
        config["max_steps"],
        config["drop_last"],
    )
    assert plan.worldSize == world
    assert plan.effectiveBatchSize == config["per_device"] * config["accumulation"] * world
    assert (plan.stepsPerEpoch, plan.totalSteps) == (per_epoch, total)
    assert plan.warmupSteps == math.ceil(total * 0.03)


def spec_with(dataset: dict[str, Any], training: dict[str, Any]):
    return parse_spec(
        {
            "model": {"name": "org/model"},
            "dataset": {"name": "org/data", "limit": 1000, **dataset},
            "training": training,
            "resources": {"gpusPerNode": 1},
        }
    )


@pytest.mark.parametrize(
    ("dataset", "training", "why"),
    [
        # TRL drops rows left with no trainable token after truncation: only masks do that.
        ({"format": "prompt-completion"}, {}, "prompt fills maxLength"),
        ({}, {"extraArgs": {"assistant_only_loss": True}}, "assistant tokens all lie beyond"),
        ({"format": "messages"}, {"extraArgs": {"assistant_only_loss": True}}, "assistant"),
    ],
)
def test_rows_that_can_be_dropped_make_the_plan_an_estimate(dataset, training, why) -> None:
    plan = plan_for(spec_with(dataset, training))
    assert plan.estimate is True
    assert any(why in note for note in plan.notes)
    assert plan.totalSteps == 189  # still the figures for every row: an upper bound


@pytest.mark.parametrize(
    ("dataset", "training"),
    [
        ({"format": "messages"}, {}),  # labels are the tokens: a cut row keeps some
        ({"format": "text"}, {}),
        ({"format": "prompt-completion"}, {"extraArgs": {"completion_only_loss": False}}),
        ({"format": "prompt-completion"}, {"extraArgs": {"truncation_mode": "keep_end"}}),
    ],
)
def test_rows_cut_but_never_dropped_keep_the_plan_exact(dataset, training) -> None:
    plan = plan_for(spec_with(dataset, training))
    assert plan.estimate is False and plan.packedEstimate is None


def test_packed_plans_say_how_rough_they_are() -> None:
    rough = plan_for(make_spec(1_000, packing=True))
    assert (rough.estimate, rough.packedEstimate) == (True, "rough")
    # Packing never empties a row's labels: dropping is not what makes it an estimate.
    packed_prompts = plan_for(spec_with({"format": "prompt-completion"}, {"packing": True}))
    assert not any("dropped" in note for note in packed_prompts.notes)


def test_a_tokenized_row_count_makes_the_plan_exact() -> None:
    prepared = PreparedRows(rows=371, truncated=4, dropped=0)
    plan = plan_for(make_spec(1_000, packing=True), prepared=prepared)
    assert (plan.estimate, plan.packedEstimate, plan.datasetSizeSource) == (
        False,
        "tokenized",
        "tokenized",
    )
    assert (plan.datasetSize, plan.stepsPerEpoch, plan.totalSteps) == (371, 24, 72)
    assert (plan.rowsTruncated, plan.rowsDropped) == (4, 0)


def test_a_held_out_fraction_leaves_the_rest_to_train_on() -> None:
    spec = spec_with({"eval": {"fraction": 0.1, "seed": 3}}, {})
    plan = plan_for(spec)
    # datasets' train_test_split(test_size=0.1) holds out ceil(0.1 x 1000) = 100 rows.
    assert plan.datasetSize == 900 and plan.stepsPerEpoch == math.ceil(900 / 16)
    assert any("holds out 100 of 1000 rows" in note for note in plan.notes)
