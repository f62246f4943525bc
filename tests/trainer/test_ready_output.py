"""Output that is ready to use: the model card with its loss curve, and the merged model
(issue 22). A real tiny LoRA run through the pod entrypoint; the checks load what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import yaml
from sftjob_trainer.train import newest_checkpoint

PNG_SIZE = (640, 360)


@pytest.fixture(scope="module")
def lora_run(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from sftjob_operator.api import parse_sftjob
    from sftjob_operator.trainer_config import build_trainer_config
    from sftjob_trainer.tiny import tiny_sftjob

    folder = tmp_path_factory.mktemp("ready")
    output = folder / "output"
    spec = {
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
        # A large rate so the adapter moves the logits well beyond float noise.
        "training": {"learningRate": 3e-2, "maxSteps": 6},
        "dataset": {"limit": 24},
        "output": {"mergeAdapter": True},
    }
    document = tiny_sftjob(tiny.model, tiny.data["chat"], output, spec, name="card-demo")
    config = folder / "config.json"
    config.write_text(json.dumps(build_trainer_config(parse_sftjob(document))))
    log = folder / "termination-log"
    done = subprocess.run(
        [sys.executable, "-m", "sftjob_trainer", "--config", str(config)],
        env={**os.environ, "SFTJOB_REPORT": "console", "SFTJOB_TERMINATION_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return {"output": output, "model": tiny.model, "outcome": json.loads(log.read_text())}


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    matter, _ = card[4:].split("\n---\n", 1)
    return yaml.safe_load(matter)


def test_the_model_card_says_what_ran_and_matches_the_log(lora_run):
    output = lora_run["output"]
    card = (output / "README.md").read_text()
    matter = front_matter(card)
    state = json.loads(
        (newest_checkpoint(output / "checkpoints") / "trainer_state.json").read_text()
    )
    logged = [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]

    assert matter["library_name"] == "peft"
    assert {"sftjob", "trl", "sft", "lora"} <= set(matter["tags"])
    assert "base_model" not in matter  # a local path is no hub id; the text names it
    assert f"`{lora_run['model']}` (local path)" in card
    (result,) = matter["model-index"][0]["results"]
    (metric,) = result["metrics"]
    assert metric["name"] == "Final train loss" and metric["value"] == logged[-1][1]
    assert f"Final train loss: **{logged[-1][1]:.4f}** (step 6)" in card
    assert "| rows | 24 |" in card
    assert "| optimizer steps | 6 |" in card
    assert "| effective batch | 4 = 4 per device x 1 accumulation x 1 process(es) |" in card
    assert "| learning rate | `0.03` |" in card and "| lora r | `4` |" in card
    assert "sftjob 0.1.0" in card and "trl 1." in card
    assert "![Training loss by step](loss-curve.png)" in card
    assert 'AutoModelForCausalLM.from_pretrained("merged")' in card


def test_the_loss_curve_is_a_small_png_with_a_drawn_curve(lora_run):
    from PIL import Image

    with Image.open(lora_run["output"] / "loss-curve.png") as image:
        assert image.format == "PNG" and image.size == PNG_SIZE
        pixels = image.convert("RGB")
        colours = pixels.getcolors(maxcolors=PNG_SIZE[0] * PNG_SIZE[1])
    assert colours is not None and len(colours) > 20  # axes, labels and a line, not blank
    # matplotlib's tab:blue (31, 119, 180) is the train-loss line.
    assert sum(count for count, rgb in colours if rgb == (31, 119, 180)) > 100


def test_the_merged_model_gives_the_logits_of_base_plus_adapter(lora_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = lora_run["output"]
    assert not (output / "merged.partial").exists()
    tokenizer = AutoTokenizer.from_pretrained(output / "merged")
    tokens = tokenizer("the cat sat on the mat", return_tensors="pt")
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(output / "merged")
        assert not hasattr(merged, "peft_config")  # a plain transformers model
        merged_logits = merged(**tokens).logits
        base = AutoModelForCausalLM.from_pretrained(lora_run["model"])
        base_logits = base(**tokens).logits
        adapted = PeftModel.from_pretrained(base, output / "final")
        adapted_logits = adapted(**tokens).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-5, atol=1e-5)


def test_a_full_fine_tune_of_a_hub_model_with_eval_names_both_losses():
    from sftjob_trainer.model_card import CardFacts, losses, render_card

    history = [
        {"loss": 2.5, "step": 10},
        {"eval_loss": 2.4, "step": 10},
        {"loss": 1.5, "step": 20},
        {"eval_loss": 1.75, "step": 20},
        {"train_loss": 2.0, "step": 20},
    ]
    facts = CardFacts(
        title="qwen-full",
        base_model="Qwen/Qwen2.5-0.5B",
        base_model_is_hub_id=True,
        dataset="trl-lib/Capybara",
        dataset_is_hub_id=True,
        dataset_split="train",
        dataset_rows=1000,
        method="full",
        steps=20,
        planned_steps=20,
        epochs=1.0,
        effective_batch=16,
        per_device=2,
        accumulation=8,
        world_size=1,
        hyperparameters={"learning rate": 2e-5},
        train_losses=losses(history, "loss"),
        eval_losses=losses(history, "eval_loss"),
        versions={"sftjob": "0.1.0"},
    )
    card = render_card(facts)
    matter = front_matter(card)
    assert matter["base_model"] == "Qwen/Qwen2.5-0.5B"
    assert matter["library_name"] == "transformers" and "full" not in matter["tags"]
    assert matter["datasets"] == ["trl-lib/Capybara"]
    metrics = matter["model-index"][0]["results"][0]["metrics"]
    assert [(m["name"], m["value"]) for m in metrics] == [
        ("Final train loss", 1.5),
        ("Eval loss", 1.75),
    ]
    assert "Eval loss: **1.7500** (step 20)" in card
    assert 'AutoModelForCausalLM.from_pretrained("final")' in card and "merged" not in card
