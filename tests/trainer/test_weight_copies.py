"""castWeightsOncePerStep: bf16 weight copies made once per step give autocast's arithmetic."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from sftjob_trainer.settings import load_config
from sftjob_trainer.speed import Hardware, Job, SpeedOptions, cast_weights_once
from sftjob_trainer.train import build_trainer
from sftjob_trainer.weight_copies import LinearWithWeightCopies, WeightCopies
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(300)]

MICRO_STEPS = 3
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def tiny_model(tied: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=tied,
    )
    return Qwen2ForCausalLM(config).float()


def train_steps(
    model: Any, copies: WeightCopies | None, steps: int, after_step: Any = None
) -> list[dict[str, Any]]:
    """`steps` optimizer steps of MICRO_STEPS micro-steps under CPU bf16 autocast."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(steps):
        for _ in range(MICRO_STEPS):
            ids = torch.randint(0, 256, (2, 24), generator=generator)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / MICRO_STEPS
            loss.backward()
        # (a compiled model names its parameters "_orig_mod.<name>")
        grads.append(
            {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if copies is not None:
            copies.refresh()
        if after_step is not None:
            after_step()
    return grads


@pytest.mark.parametrize("tied", [True, False])
def test_copies_give_autocasts_gradients_and_weights_bit_for_bit(tied: bool) -> None:
    reference = tiny_model(tied)
    model = copy.deepcopy(reference)
    copies = WeightCopies(model)
    # 7 linear layers per decoder layer; the LM head too when it is not the embedding.
    assert copies.layers == 2 * 7 + (0 if tied else 1)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LinearWithWeightCopies)
    assert type(model.lm_head) is torch.nn.Linear if tied else LinearWithWeightCopies
    # The copies are not part of the checkpoint.
    assert model.state_dict().keys() == reference.state_dict().keys()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight_copy.dtype == torch.bfloat16 and q_proj.bias_copy is not None
    assert q_proj.weight.dtype == torch.float32

    expected = train_steps(reference, None, steps=3)
    got = train_steps(model, copies, steps=3)
    for step, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert want.keys() == have.keys()
        for name in want:
            assert torch.equal(want[name], have[name]), f"step {step}: {name}.grad differs"
    for (name, a), (_, b) in zip(
        reference.named_parameters(), model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), f"{name} differs after 3 steps"
        assert b.dtype == torch.float32
    # After the last refresh the copies are the parameters rounded to bf16.
    assert torch.equal(q_proj.weight_copy, q_proj.weight.to(torch.bfloat16))
    assert q_proj.weight_copy.grad is None  # handed to the parameter, not kept


def test_stale_copies_are_what_the_refresh_prevents() -> None:
    # Without the refresh after each step the layers would compute with old weights:
    # the check above must be able to fail.
    reference = tiny_model(tied=True)
    model = copy.deepcopy(reference)
    copies = WeightCopies(model)
    expected = train_steps(reference, None, steps=2)
    got = train_steps(model, None, steps=2)  # never refreshed
    assert copies.layers
    assert torch.equal(expected[0][Q_PROJ], got[0][Q_PROJ])
    assert not torch.equal(expected[1][Q_PROJ], got[1][Q_PROJ])


def test_frozen_weights_get_copies_without_gradients() -> None:
    model = tiny_model(tied=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight.requires_grad_(True)
    WeightCopies(model)
    assert q_proj.weight_copy.requires_grad and not q_proj.bias_copy.requires_grad
    ids = torch.arange(12).reshape(1, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert q_proj.weight.grad is not None and q_proj.weight.grad.dtype == torch.float32
    assert q_proj.bias.grad is None


def test_lever_rules() -> None:
    job = Job("full", 2, 8, 2048, True, True, True)
    cpu, gpu = Hardware(cuda=False), Hardware(cuda=True, memory_gib=79.1)

    def choose(switch: str, job: Job = job, hw: Hardware = gpu) -> Any:
        return cast_weights_once(SpeedOptions(castWeightsOncePerStep=switch), hw, job)  # type: ignore[arg-type]

    assert not choose("auto").on and "not yet measured" in choose("auto").reason
    assert choose("on").on and choose("on", hw=cpu).on
    assert not choose("off").on
    no_bf16 = Job("full", 2, 8, 2048, True, True, False)
    assert not choose("on", job=no_bf16).on and "bf16" in choose("on", job=no_bf16).reason
    two = Job("full", 2, 8, 2048, True, True, True, world_size=2)
    assert not choose("on", job=two).on and "2 processes" in choose("on", job=two).reason


class Losses(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def test_trainer_with_copies_learns_the_same(make_config: Any, tmp_path: Any) -> None:
    """Through the real SFTTrainer on CPU with bf16 autocast: the same losses and weights."""

    def run(switch: str) -> tuple[list[float], dict[str, torch.Tensor], Any]:
        speed = {"castWeightsOncePerStep": switch, "autoMicroBatch": "off", "flexAttention": "off"}
        spec = {
            "training": {
                "maxSteps": 3,
                "loggingSteps": 1,
                "bf16": True,
                "perDeviceTrainBatchSize": 1,
                "gradientAccumulationSteps": 3,
                "speed": speed,
            }
        }
        recorder = Losses()
        trainer = build_trainer(load_config(make_config(spec)), callbacks=[recorder])
        trainer.train()
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        return recorder.losses, weights, trainer

    plain_losses, plain_weights, _ = run("off")
    losses, weights, trainer = run("on")
    assert len(losses) == len(plain_losses) == 3
    assert losses == plain_losses
    assert weights.keys() == plain_weights.keys()
    for name, value in weights.items():
        assert torch.equal(value, plain_weights[name]), name
    layers = [m for m in trainer.model.modules() if isinstance(m, LinearWithWeightCopies)]
    assert layers, "the lever was not applied"


def test_compiled_model_reads_the_refreshed_copies_without_recompiling() -> None:
    # As on the GPU, the model runs through dynamo and AOTAutograd (aot_eager keeps it on
    # CPU): the copies are graph inputs, their gradients come out of the compiled backward
    # into the hook, and refreshing them in place must neither recompile nor be ignored.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    reference = tiny_model(tied=True)
    model = copy.deepcopy(reference)
    copies = WeightCopies(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    expected = train_steps(reference, None, steps=3)
    graphs = [counters["stats"]["unique_graphs"]]
    got = train_steps(
        compiled,
        copies,
        steps=3,
        after_step=lambda: graphs.append(counters["stats"]["unique_graphs"]),
    )
    assert graphs[1] > graphs[0]  # compiled in the first step
    assert graphs[1:] == [graphs[1]] * 3  # and never again
    for want, have in zip(expected, got, strict=True):
        for name in want:
            torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-7)


def test_copies_replaced_by_a_device_move_are_hooked_again_at_train_start() -> None:
    # Module.to() onto another device puts new tensors in the buffers; those would keep
    # their gradients to themselves, and the parameters would silently stop learning.
    model = tiny_model(tied=True)
    copies = WeightCopies(model)
    for module in model.modules():
        if isinstance(module, LinearWithWeightCopies):
            for name in ("weight_copy", "bias_copy"):
                if module._buffers.get(name) is not None:
                    module._buffers[name] = module._buffers[name].detach().clone()
    q_proj = model.model.layers[0].self_attn.q_proj
    ids = torch.arange(12).reshape(1, 12)

    def backward() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()

    backward()
    assert q_proj.weight.grad is None  # the failure the start-of-training check prevents
    copies.callback().on_train_begin(None, None, None)
    backward()
    assert q_proj.weight.grad is not None and q_proj.bias.grad is not None
    assert q_proj.weight_copy.grad is None
    assert torch.equal(q_proj.weight_copy, q_proj.weight.to(torch.bfloat16))
