"""The model card: README.md and loss-curve.png in the output folder, written at the end.

Hugging Face conventions (https://huggingface.co/docs/hub/model-cards): YAML front matter
with base_model (a hub id; a local model path is named in the text only), library_name
(peft for an adapter, transformers for a full model), tags, datasets (hub ids) and a
model-index whose metrics are the final train loss and, when the run evaluated, the eval
loss, exactly as the Trainer logged them (trainer_state.json's log_history). The body
says what ran: data source and rows, method, the plan, hyperparameters, results with the
loss curve, how to load the result, and the versions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("sftjob_trainer.model_card")

CURVE_SIZE_INCHES = (6.4, 3.6)
CURVE_DPI = 100  # 640 x 360 pixels


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says, gathered from the config and the finished Trainer."""

    title: str
    base_model: str
    base_model_is_hub_id: bool
    dataset: str
    dataset_is_hub_id: bool
    dataset_split: str
    dataset_rows: int | None
    method: str
    steps: int
    planned_steps: int | None
    epochs: float | None
    effective_batch: int
    per_device: int
    accumulation: int
    world_size: int
    hyperparameters: dict[str, Any]
    train_losses: list[tuple[int, float]]
    eval_losses: list[tuple[int, float]]
    versions: dict[str, str]
    merged: bool = False
    curve_file: str | None = None
    lora: dict[str, Any] = field(default_factory=dict)


def losses(log_history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) for each log_history entry with `key`, as the Trainer logged it."""
    return [
        (int(entry["step"]), float(entry[key]))
        for entry in log_history
        if key in entry and "step" in entry
    ]


def front_matter(facts: CardFacts) -> dict[str, Any]:
    adapter = facts.method in ("lora", "qlora")
    matter: dict[str, Any] = {}
    if facts.base_model_is_hub_id:
        matter["base_model"] = facts.base_model
    matter["library_name"] = "peft" if adapter else "transformers"
    matter["pipeline_tag"] = "text-generation"
    matter["tags"] = ["sftjob", "trl", "sft", *([facts.method] if adapter else [])]
    if facts.dataset_is_hub_id:
        matter["datasets"] = [facts.dataset]
    metrics = []
    if facts.train_losses:
        metrics.append(
            {"type": "loss", "name": "Final train loss", "value": facts.train_losses[-1][1]}
        )
    if facts.eval_losses:
        metrics.append({"type": "loss", "name": "Eval loss", "value": facts.eval_losses[-1][1]})
    if metrics:
        matter["model-index"] = [
            {
                "name": facts.title,
                "results": [
                    {
                        "task": {"type": "text-generation", "name": "Supervised fine-tuning"},
                        "dataset": {
                            "name": facts.dataset,
                            "type": facts.dataset,
                            "split": facts.dataset_split,
                        },
                        "metrics": metrics,
                    }
                ],
            }
        ]
    return matter


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _usage(facts: CardFacts) -> str:
    if facts.method == "full":
        return (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model = AutoModelForCausalLM.from_pretrained("final")\n'
            'tokenizer = AutoTokenizer.from_pretrained("final")\n```'
        )
    text = (
        "The LoRA adapter is in `final/`:\n\n"
        "```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import "
        "AutoTokenizer\n\n"
        'model = AutoPeftModelForCausalLM.from_pretrained("final")\n'
        'tokenizer = AutoTokenizer.from_pretrained("final")\n```'
    )
    if facts.merged:
        text += (
            "\n\nThe base model with the adapter merged in is in `merged/` (a plain "
            "transformers model):\n\n```python\nfrom transformers import AutoModelForCausalLM\n\n"
            'model = AutoModelForCausalLM.from_pretrained("merged")\n```'
        )
    return text


def render_card(facts: CardFacts) -> str:
    matter = yaml.safe_dump(front_matter(facts), sort_keys=False).strip()
    steps = f"{facts.steps}" + (
        f" (planned {facts.planned_steps})"
        if facts.planned_steps not in (None, facts.steps)
        else ""
    )
    plan = _table(
        [
            ("optimizer steps", steps),
            ("epochs", format(facts.epochs, "g") if facts.epochs is not None else "n/a"),
            (
                "effective batch",
                f"{facts.effective_batch} = {facts.per_device} per device x "
                f"{facts.accumulation} accumulation x {facts.world_size} process(es)",
            ),
        ]
    )
    hyper = _table(
        [(name, f"`{value}`") for name, value in facts.hyperparameters.items()]
        + [(f"lora {name}", f"`{value}`") for name, value in facts.lora.items()]
    )
    results = []
    if facts.train_losses:
        step, value = facts.train_losses[-1]
        results.append(f"- Final train loss: **{value:.4f}** (step {step})")
    if facts.eval_losses:
        step, value = facts.eval_losses[-1]
        results.append(f"- Eval loss: **{value:.4f}** (step {step})")
    if not results:
        results.append("- No loss was logged.")
    if facts.curve_file:
        results.append(f"\n![Training loss by step]({facts.curve_file})")
    versions = ", ".join(f"{name} {version}" for name, version in facts.versions.items())
    source = f"`{facts.base_model}`" + ("" if facts.base_model_is_hub_id else " (local path)")
    return f"""---
{matter}
---

# {facts.title}

Fine-tuned from {source} with supervised fine-tuning (TRL's SFTTrainer, method
{facts.method}) by the sftjob trainer.

## Training data

{_table([("source", f"`{facts.dataset}`"), ("split", facts.dataset_split), ("rows", facts.dataset_rows if facts.dataset_rows is not None else "n/a")])}

## Training plan

{plan}

## Hyperparameters

{hyper}

## Results

{chr(10).join(results)}

## How to use

{_usage(facts)}

## Versions

{versions}
"""


def plot_loss(
    train: list[tuple[int, float]], evaluation: list[tuple[int, float]], path: Path
) -> bool:
    """The loss curve as a small PNG; False (and a log line) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display in a pod
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: the model card has no loss curve")
        return False
    figure = Figure(figsize=CURVE_SIZE_INCHES, dpi=CURVE_DPI)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evaluation:
        axes.plot(*zip(*evaluation, strict=True), "o-", label="eval loss", color="tab:orange")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png", dpi=CURVE_DPI)
    os.replace(temporary, path)
    return True


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("sftjob", "trl", "transformers", "peft", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def write_model_card(output: Path, facts: CardFacts, *, card: str, curve: str) -> Path:
    """Write the curve (when there is a loss to plot) and README.md; returns the card's path."""
    curve_file = None
    if (facts.train_losses or facts.eval_losses) and plot_loss(
        facts.train_losses, facts.eval_losses, output / curve
    ):
        curve_file = curve
    text = render_card(dataclasses.replace(facts, curve_file=curve_file))
    target = output / card
    temporary = target.with_name(f".{card}.tmp")
    temporary.write_text(text)
    os.replace(temporary, target)
    return target


def facts_from_run(
    config: Any,
    trainer: Any,
    *,
    dataset_rows: int | None,
    merged: bool,
) -> CardFacts:
    """Gather the card's facts from a TrainerConfig and the SFTTrainer that finished."""
    spec = config.spec
    args = trainer.args
    state = trainer.state
    model = spec.model
    dataset = spec.dataset
    dataset_source = dataset.name or dataset.path or getattr(dataset, "uri", None) or "?"
    training = spec.training
    hyper: dict[str, Any] = {
        "learning rate": config.resolved["learningRate"],
        "schedule": training.lrSchedulerType,
        "warm-up": (
            f"{training.warmupSteps} steps"
            if training.warmupSteps is not None
            else f"ratio {training.warmupRatio}"
        ),
        "epochs": training.numTrainEpochs,
        "max steps": training.maxSteps if training.maxSteps is not None else "none",
        "max length": training.maxLength,
        "packing": training.packing,
        "seed": training.seed,
        "bf16": config.resolved["bf16"],
    }
    if training.extraArgs:
        hyper["extraArgs"] = training.extraArgs
    return CardFacts(
        title=config.job_name
        or (config.raw.get("job") or {}).get("manifestName")
        or Path(config.output_path).name,
        base_model=model.name or str(model.path),
        base_model_is_hub_id=model.name is not None,
        dataset=str(dataset_source),
        dataset_is_hub_id=dataset.name is not None,
        dataset_split=dataset.split,
        dataset_rows=dataset_rows,
        method=config.resolved["method"],
        steps=int(state.global_step),
        planned_steps=(config.plan or {}).get("totalSteps"),
        epochs=float(state.epoch) if state.epoch is not None else None,
        effective_batch=args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * args.world_size,
        per_device=args.per_device_train_batch_size,
        accumulation=args.gradient_accumulation_steps,
        world_size=args.world_size,
        hyperparameters=hyper,
        train_losses=losses(state.log_history, "loss"),
        eval_losses=losses(state.log_history, "eval_loss"),
        versions=library_versions(),
        merged=merged,
        lora=dict(config.resolved.get("lora") or {}),
    )
