"""castWeightsOncePerStep: bf16 weight copies made once per step give autocast's arithmetic."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from sftjob_bench.bench import TINY
from sftjob_trainer.levers.cast_weights_once import decide as cast_weights_once
from sftjob_trainer.levers.fuse_gradient_accumulation import decide as fuse_gradient_accumulation
from sftjob_trainer.levers.weight_copies import (
    LinearAccumulatingInMatmul,
    LinearWithWeightCopies,
    WeightCopies,
    matmul_adds_in_fp32,
)
from sftjob_trainer.speed import (
    Hardware,
    Job,
    ModelShape,
    SpeedOptions,
    decide,
)
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(300)]

MICRO_STEPS = 3
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def tiny_model(tied: bool) -> Qwen2ForCausalLM:
    """The bench's CPU shape (2 layers of 64), with a small vocabulary for these ids."""
    torch.manual_seed(0)
    config = Qwen2Config(**{**TINY, "vocab_size": 256, "tie_word_embeddings": tied})
    return Qwen2ForCausalLM(config).float()


def tiny_lora_model() -> Any:
    """The tied tiny model with rank-4 adapters on every linear layer, no dropout."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(tiny_model(tied=True), config)


def assert_same_adapter_weights(expected: list[dict], got: list[dict]) -> None:
    """Every step's adapter (lora_) tensors bit for bit equal, and some were recorded."""
    for want, have in zip(expected, got, strict=True):
        trained = [name for name in want if "lora_" in name]
        assert trained and want.keys() == have.keys()
        for name in trained:
            assert torch.equal(want[name], have[name]), name


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
            {
                n.removeprefix("_orig_mod."): p.grad.clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if copies is not None:
            copies.refresh()
        if after_step is not None:
            after_step()
    return grads


def assert_trained_bit_for_bit(
    expected: list[dict[str, Any]], got: list[dict[str, Any]], reference: Any, model: Any
) -> None:
    """The same gradients at every step, and the same weights after the last."""
    for step, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert want.keys() == have.keys()
        for name in want:
            assert torch.equal(want[name], have[name]), f"step {step}: {name}.grad differs"
    for (name, a), (_, b) in zip(
        reference.named_parameters(), model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), f"{name} differs after {len(got)} steps"


@pytest.mark.parametrize("tied", [True, False])
def test_copies_give_autocasts_gradients_and_weights_bit_for_bit(tied: bool) -> None:
    reference = tiny_model(tied)
    model = copy.deepcopy(reference)
    copies = WeightCopies(model)
    # 7 linear layers per decoder layer; never the LM head, whose weight the heads read.
    assert copies.layers == 2 * 7
    assert isinstance(model.model.layers[0].self_attn.q_proj, LinearWithWeightCopies)
    assert type(model.lm_head) is torch.nn.Linear
    # The copies are not part of the checkpoint.
    assert model.state_dict().keys() == reference.state_dict().keys()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight_copy.dtype == torch.bfloat16 and q_proj.bias_copy is not None
    assert q_proj.weight.dtype == torch.float32

    expected = train_steps(reference, None, steps=3)
    got = train_steps(model, copies, steps=3)
    assert_trained_bit_for_bit(expected, got, reference, model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
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


def test_frozen_weights_copies_carry_no_gradients() -> None:
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

    assert choose("auto").on
    assert not choose("auto", hw=cpu).on and "CUDA" in choose("auto", hw=cpu).reason
    assert choose("on").on and choose("on", hw=cpu).on
    assert not choose("off").on
    no_bf16 = Job("full", 2, 8, 2048, True, True, False)
    assert not choose("on", job=no_bf16).on and "bf16" in choose("on", job=no_bf16).reason
    two = Job("full", 2, 8, 2048, True, True, True, world_size=2)
    assert not choose("on", job=two).on and "2 processes" in choose("on", job=two).reason
    fsdp = Job("full", 2, 8, 2048, True, True, True, distributed="fsdp")  # even one process
    assert not choose("on", job=fsdp).on and "fsdp" in choose("on", job=fsdp).reason


class Losses(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.layers_with_copies: list[int] = []
        self.fused_layers: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
        layers = [m for m in model.modules() if isinstance(m, LinearWithWeightCopies)]
        self.layers_with_copies.append(len(layers))
        fused = [m for m in model.modules() if isinstance(m, LinearAccumulatingInMatmul)]
        self.fused_layers.append(len(fused))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def test_trainer_with_copies_learns_the_same(bf16_trainer: Any) -> None:
    """Through the real SFTTrainer on CPU with bf16 autocast: the same losses and weights."""

    def run(switch: str) -> tuple[Losses, dict[str, torch.Tensor], Any]:
        recorder = Losses()
        trainer = bf16_trainer(
            {"castWeightsOncePerStep": switch},
            [recorder],
            maxSteps=3,
            loggingSteps=1,
            gradientAccumulationSteps=3,
        )
        trainer.train()
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        return recorder, weights, trainer

    plain, plain_weights, _ = run("off")
    ours, weights, trainer = run("on")
    assert len(ours.losses) == len(plain.losses) == 3
    assert ours.losses == plain.losses
    assert weights.keys() == plain_weights.keys()
    for name, value in weights.items():
        assert torch.equal(value, plain_weights[name]), name
    # The layers computed with copies at every step; plain layers again after training.
    assert plain.layers_with_copies == [0, 0, 0]
    assert len(ours.layers_with_copies) == 3 and min(ours.layers_with_copies) > 0
    assert not any(isinstance(m, LinearWithWeightCopies) for m in trainer.model.modules())


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


def test_copies_replaced_by_a_move_are_leaves_and_hooked_again_at_train_start() -> None:
    # Module.to() puts new tensors in the buffers, made by an autograd op since the copies
    # require grad: without the check at the start of training they would keep their
    # gradients to themselves (or refuse the hook), and the parameters would stop learning.
    model = tiny_model(tied=True)
    copies = WeightCopies(model)
    model.to(torch.float64)  # a real move: new buffer tensors (here of another dtype)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight_copy.grad_fn is not None  # no longer a leaf
    ids = torch.arange(12).reshape(1, 12)

    def backward() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()

    copies.callback().on_train_begin(None, None, None)
    assert q_proj.weight_copy.grad_fn is None and q_proj.weight_copy.requires_grad
    backward()
    assert q_proj.weight.grad is not None and q_proj.bias.grad is not None
    assert q_proj.weight_copy.grad is None
    assert torch.equal(q_proj.weight_copy, q_proj.weight.to(q_proj.weight_copy.dtype))


def test_lora_adapters_learn_the_same_with_copies() -> None:
    torch.manual_seed(0)
    reference = tiny_lora_model()
    model = copy.deepcopy(reference)
    copies = WeightCopies(model)
    # Base layers (frozen) and both adapter matrices (trainable) of the 7 targets per layer.
    assert copies.layers == 2 * 7 * 3
    expected = train_steps(reference, None, steps=2)
    got = train_steps(model, copies, steps=2)
    assert_same_adapter_weights(expected, got)


def test_after_training_the_layers_are_plain_and_unfrozen_layers_learn() -> None:
    model = tiny_model(tied=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    copies = WeightCopies(model)
    callback = copies.callback()
    callback.on_train_begin(None, None, None)
    q_proj = model.model.layers[0].self_attn.q_proj
    ids = torch.arange(12).reshape(1, 12)
    q_proj.weight.requires_grad_(True)  # unfrozen during training
    callback.on_optimizer_step(None, None, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert q_proj.weight.grad is not None and q_proj.weight.grad.dtype == torch.float32
    callback.on_train_end(None, None, None)
    assert not any(isinstance(m, LinearWithWeightCopies) for m in model.modules())
    assert not any("_copy" in name for name, _ in model.named_buffers())
    # A forward outside autocast (as after training) works on the fp32 weights again.
    assert model(input_ids=ids).logits.dtype == torch.float32


def test_a_trainer_set_up_for_sharding_or_several_processes_is_refused() -> None:
    import types

    from sftjob_trainer.levers.weight_copies import use_weight_copies

    def trainer(**kw: Any) -> Any:
        accelerator = types.SimpleNamespace(num_processes=kw.pop("processes", 1))
        args = types.SimpleNamespace(n_gpu=kw.pop("n_gpu", 1))
        callbacks: list[Any] = []
        return types.SimpleNamespace(
            model=tiny_model(tied=True),
            accelerator=accelerator,
            args=args,
            add_callback=callbacks.append,
            callbacks=callbacks,
            **kw,
        )

    for setup, reason in (
        ({"is_fsdp_enabled": True}, "FSDP or DeepSpeed"),
        ({"is_deepspeed_enabled": True}, "FSDP or DeepSpeed"),
        ({"processes": 2}, "2 processes"),
        ({"n_gpu": 2}, "DataParallel"),
    ):
        refused = trainer(**setup)
        said = use_weight_copies(refused)
        assert said.startswith("not applied") and reason in said, said
        assert not refused.callbacks
        assert not any(isinstance(m, LinearWithWeightCopies) for m in refused.model.modules())
    accepted = trainer()
    assert "14 linear layers" in use_weight_copies(accepted) and len(accepted.callbacks) == 1


def test_not_applied_where_the_lm_head_cannot_be_found() -> None:
    from types import SimpleNamespace

    from sftjob_trainer.levers.weight_copies import use_weight_copies
    from transformers import PretrainedConfig, PreTrainedModel

    class Odd(PreTrainedModel):  # embeddings under names transformers does not know
        config_class = PretrainedConfig

        def __init__(self, config: PretrainedConfig) -> None:
            super().__init__(config)
            self.tokens = torch.nn.Embedding(8, 4)
            self.head = torch.nn.Linear(4, 8)

    model = Odd(PretrainedConfig())
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(), accelerator=None)
    assert use_weight_copies(trainer) == (
        "not applied: the model's embeddings or LM head cannot be found"
    )
    assert type(model.head) is torch.nn.Linear  # the head got no copy

    class HeadElsewhere(Odd):  # the embedding is found, the head (named "head") is not
        def __init__(self, config: PretrainedConfig) -> None:
            super().__init__(config)
            self.embed_tokens = torch.nn.Embedding(8, 4)

    model = HeadElsewhere(PretrainedConfig())
    assert model.get_input_embeddings() is model.embed_tokens
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(), accelerator=None)
    assert use_weight_copies(trainer).startswith("not applied")
    assert type(model.head) is torch.nn.Linear


# --- fuseGradientAccumulation: the weight gradient added into .grad inside the matmul ---


def fused_copies(model: Any) -> WeightCopies:
    copies = WeightCopies(model, accumulate_in_matmul=True)
    copies.hand_over_grad_sums()  # as at train begin
    return copies


def train_fused(model: Any, copies: WeightCopies, steps: int, **kw: Any) -> list[dict[str, Any]]:
    """`train_steps` with the sums handed over after each step's zero_grad (on_step_end)."""
    return train_steps(model, copies, steps, after_step=copies.hand_over_grad_sums, **kw)


@pytest.mark.parametrize("tied", [True, False])
def test_fused_accumulation_gives_autocasts_gradients_on_cpu(tied: bool) -> None:
    # On CPU there is no fp32-output matmul: the custom op multiplies in bf16 and adds in
    # fp32, which is autocast's arithmetic, so the gradients must be equal bit for bit.
    # (On CUDA the product stays fp32: checked against float64 by matmul_adds_in_fp32.)
    reference = tiny_model(tied)
    model = copy.deepcopy(reference)
    copies = fused_copies(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LinearAccumulatingInMatmul) and not q_proj.fp32_products
    assert len(copies.grad_sums) == 2 * 7 * 2 - 2 * 4  # weights, plus q/k/v biases
    assert q_proj.weight.grad is q_proj.weight_grad_sum  # handed over, zeroed
    assert model.state_dict().keys() == reference.state_dict().keys()

    expected = train_steps(reference, None, steps=3)
    got = train_fused(model, copies, steps=3)
    assert_trained_bit_for_bit(expected, got, reference, model)
    # The sums are the gradients: the copies themselves never hold one.
    assert q_proj.weight_copy.grad is None


def test_fused_gradients_sit_in_the_sums_until_handed_over() -> None:
    # Without the hand-over after zero_grad the optimizer would see no gradient for the
    # fused layers: the test above must be able to fail.
    model = tiny_model(tied=True)
    copies = WeightCopies(model, accumulate_in_matmul=True)  # never handed over
    got = train_steps(model, copies, steps=1)
    assert Q_PROJ not in got[0]
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.grad is None and q_proj.weight_grad_sum.abs().sum() > 0


def test_fused_accumulation_compiles_into_one_graph_and_accumulates_in_place() -> None:
    # Through dynamo and AOTAutograd (aot_eager keeps it on CPU): the custom op declares
    # the sums it mutates, so the compiled backward adds into them in place, with no graph
    # break and no recompile after the hand-over or the refresh.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # global to the process: earlier tests' graph breaks are not ours
    reference = tiny_model(tied=True)
    model = copy.deepcopy(reference)
    copies = fused_copies(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    expected = train_steps(reference, None, steps=3)
    graphs: list[int] = []

    def after_step() -> None:
        copies.hand_over_grad_sums()
        graphs.append(counters["stats"]["unique_graphs"])

    got = train_steps(compiled, copies, steps=3, after_step=after_step)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[0] > 0 and graphs == [graphs[0]] * 3
    for want, have in zip(expected, got, strict=True):
        assert want.keys() == have.keys()
        for name in want:
            torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reentrant", [False, True])
def test_fused_accumulation_under_checkpointing_adds_each_gradient_once(reentrant: bool) -> None:
    # Checkpointing runs each layer's forward again in the backward: the sums must still
    # get each micro-step's gradient exactly once.
    reference = tiny_model(tied=True)
    model = copy.deepcopy(reference)
    for each in (reference, model):
        each.gradient_checkpointing_enable({"use_reentrant": reentrant})
        each.train()
    copies = fused_copies(model)
    expected = train_steps(reference, None, steps=2)
    got = train_fused(model, copies, steps=2)
    for want, have in zip(expected, got, strict=True):
        assert want.keys() == have.keys()
        for name in want:
            assert torch.equal(want[name], have[name]), name


def test_fused_lora_adapters_learn_the_same_and_frozen_layers_keep_the_hook() -> None:
    torch.manual_seed(0)
    reference = tiny_lora_model()
    model = copy.deepcopy(reference)
    copies = fused_copies(model)
    fused = [m for m in copies.modules if isinstance(m, LinearAccumulatingInMatmul)]
    assert len(fused) == 2 * 7 * 2  # both adapter matrices; the frozen bases keep the hook
    assert all(not m.weight.requires_grad for m in copies.modules if m not in fused)
    expected = train_steps(reference, None, steps=2)
    got = train_fused(model, copies, steps=2)
    assert_same_adapter_weights(expected, got)


def fused_backward(model: Any, ids: torch.Tensor) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()


def test_before_the_step_each_grad_is_what_plain_autograd_would_leave() -> None:
    model = tiny_model(tied=True)
    copies = fused_copies(model)
    callback = copies.callback()
    q_proj = model.model.layers[0].self_attn.q_proj
    k_proj = model.model.layers[0].self_attn.k_proj
    ids = torch.arange(12).reshape(1, 12)
    fused_backward(model, ids)
    callback.on_pre_optimizer_step(None, None, None)  # every .grad is its sum: kept
    assert q_proj.weight.grad is q_proj.weight_grad_sum
    assert q_proj.weight.grad.abs().sum() > 0

    # Frozen during the step: not stepped (None), as with plain autograd.
    copies.hand_over_grad_sums()
    fused_backward(model, ids)
    q_proj.weight.requires_grad_(False)
    callback.on_pre_optimizer_step(None, None, None)
    assert q_proj.weight.grad is None
    assert k_proj.weight.grad is k_proj.weight_grad_sum  # the others keep theirs

    # Unfrozen during the step: stays None this step, gets its sum at the next hand-over.
    q_proj.weight.requires_grad_(True)
    callback.on_pre_optimizer_step(None, None, None)
    assert q_proj.weight.grad is None
    callback.on_step_end(None, None, None)
    assert q_proj.weight.grad is q_proj.weight_grad_sum

    # A step in which no backward reached the layers: None, so AdamW skips them instead
    # of stepping with zeros.
    callback.on_pre_optimizer_step(None, None, None)
    assert all(p.grad is None for p in q_proj.parameters())

    # Someone else's .grad: the step stops, naming the parameter and the switch.
    copies.hand_over_grad_sums()
    fused_backward(model, ids)
    q_proj.weight.grad = torch.zeros_like(q_proj.weight)
    with pytest.raises(RuntimeError, match=r"self_attn\.q_proj\.weight: .*fuseGradientAccum"):
        callback.on_pre_optimizer_step(None, None, None)


def test_an_unused_layer_is_not_stepped_and_a_frozen_one_not_moved() -> None:
    # Through a real optimizer: a layer that gets no gradient in a step, and one frozen
    # during it, end the step where plain autograd leaves them (AdamW skips them).
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "used": torch.nn.Linear(8, 8),
            "unused": torch.nn.Linear(8, 8),
            "frozen": torch.nn.Linear(8, 8),
        }
    )
    copies = WeightCopies(model, accumulate_in_matmul=True)
    callback = copies.callback()
    callback.on_train_begin(None, None, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 8)
    model["frozen"].requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (model["used"](x).float().sum() + model["frozen"](x).float().sum()).backward()
    callback.on_pre_optimizer_step(None, None, None)
    optimizer.step()
    for name, value in model.named_parameters():
        moved = not torch.equal(value, before[name])
        assert moved == name.startswith("used"), name


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to bf16 rounding (2^-8 relative) of the largest entries."""
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 2**-7 * scale, (got, want)


def test_layers_sharing_a_weight_share_its_sum() -> None:
    # (Zamba2 ties its shared block's linear layers across depths.) Two nn.Linear with one
    # weight Parameter: one sum that both add into, which is the parameter's .grad.
    torch.manual_seed(0)
    first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    second.weight = first.weight
    reference = copy.deepcopy(torch.nn.ModuleList([first, second]))
    model = torch.nn.ModuleList([first, second])
    copies = WeightCopies(model, accumulate_in_matmul=True)
    assert first.weight_grad_sum is second.weight_grad_sum
    assert len(copies.grad_sums) == 3  # the shared weight and two biases
    # A move (as `.to()` to another device does) gives each module its own new buffer.
    model._apply(lambda tensor: tensor.clone())
    assert first.weight_grad_sum is not second.weight_grad_sum
    copies.callback().on_train_begin(None, None, None)  # shared again
    assert first.weight_grad_sum is second.weight_grad_sum
    x = torch.randn(4, 8)
    for net in (reference, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net[1](net[0](x)).float().sum().backward()
    copies.check_grad_sums()  # no "replaced" error: one .grad for the one parameter
    # Both layers' gradients, each added in fp32 (autocast casts the shared weight once
    # and sums the two bf16 gradients in bf16 first, hence the tolerance; one layer's
    # gradient alone would be about half).
    assert_bf16_close(first.weight.grad, reference[0].weight.grad)
    assert torch.equal(second.bias.grad, reference[1].bias.grad)


def test_a_weight_used_only_through_its_second_layer_still_learns() -> None:
    torch.manual_seed(0)
    first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    second.weight = first.weight
    copies = WeightCopies(torch.nn.ModuleList([first, second]), accumulate_in_matmul=True)
    copies.hand_over_grad_sums()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        second(torch.randn(4, 8)).float().sum().backward()
    copies.check_grad_sums()
    assert first.weight.grad is first.weight_grad_sum and first.weight.grad.abs().sum() > 0
    assert first.bias.grad is None  # the first layer's own bias had no backward


class Blocks(torch.nn.Module):
    """Linear blocks with a graph break inside each (as some decoder layers have), and a
    weight shared by the first and last, used on both sides of breaks."""

    def __init__(self, count: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(count))
        self.blocks[-1].weight = self.blocks[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
            torch._dynamo.graph_break()
        return self.blocks[0](x)  # the first layer again, in another graph


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_across_graph_breaks_each_use_adds_once_without_recompiles(
    backend: str,
) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    reference = Blocks(6)
    model = copy.deepcopy(reference)
    copies = WeightCopies(model, accumulate_in_matmul=True)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 8)
    graphs = []
    for _ in range(2):
        copies.hand_over_grad_sums()
        reference.zero_grad()
        for net in (reference, compiled):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                net(x).float().sum().backward()
        copies.check_grad_sums()
        for (name, want), (_, have) in zip(
            reference.named_parameters(), model.named_parameters(), strict=True
        ):
            assert have.grad is not None, name
            assert_bf16_close(have.grad, want.grad)
        graphs.append(counters["stats"]["unique_graphs"])
    # The blocks share their code: one graph serves all six (a per-layer constant in the
    # graph would compile one per layer), and the second step compiles nothing new.
    assert graphs[0] <= 3 and graphs[1] == graphs[0], graphs


def test_a_layer_called_twice_in_one_forward_adds_both_gradients() -> None:
    # The sums are not saved tensors: the first backward's add does not trip autograd's
    # version check for the second.
    torch.manual_seed(0)
    reference = torch.nn.Linear(8, 8)
    layer = copy.deepcopy(reference)
    copies = WeightCopies(torch.nn.ModuleList([layer]), accumulate_in_matmul=True)
    copies.hand_over_grad_sums()
    x = torch.randn(4, 8)
    for net in (reference, layer):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(net(x)).float().sum().backward()
    assert_bf16_close(layer.weight.grad, reference.weight.grad)  # (as above)
    assert_bf16_close(layer.bias.grad, reference.bias.grad)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_the_sums_survive_saved_tensor_hooks_that_hand_back_new_tensors(
    backend: str | None,
) -> None:
    # Activation offloading packs saved tensors away and unpacks new ones: the sums ride
    # outside them, so the adds still reach the parameters' .grad, eager or compiled.
    torch._dynamo.reset()
    torch.manual_seed(0)
    reference = torch.nn.Linear(8, 8)
    layer = copy.deepcopy(reference)
    copies = WeightCopies(torch.nn.ModuleList([layer]), accumulate_in_matmul=True)
    copies.hand_over_grad_sums()
    run = torch.compile(layer, backend=backend) if backend else layer
    x = torch.randn(4, 8, requires_grad=True)
    for net in (reference, run):
        offloading = torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)
        with offloading, torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x).float().sum()
        out.backward()
    assert torch.equal(layer.weight.grad, reference.weight.grad)


def test_a_bias_frozen_at_the_start_learns_once_unfrozen() -> None:
    model = tiny_model(tied=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.bias.requires_grad_(False)
    copies = fused_copies(model)
    callback = copies.callback()
    ids = torch.arange(12).reshape(1, 12)
    fused_backward(model, ids)
    callback.on_pre_optimizer_step(None, None, None)
    assert q_proj.bias.grad is None
    q_proj.bias.requires_grad_(True)
    callback.on_step_end(None, None, None)
    fused_backward(model, ids)
    callback.on_pre_optimizer_step(None, None, None)
    assert q_proj.bias.grad is q_proj.bias_grad_sum and q_proj.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("fp32_products", [False, True])
def test_the_op_adds_the_product_and_the_column_sums(fp32_products: bool) -> None:
    # The fp32 branch runs as an fp32 matmul off CUDA: the adding, not cuBLAS's epilogue,
    # is what this checks (matmul_adds_in_fp32 checks the CUDA kernel on the device).
    generator = torch.Generator().manual_seed(0)
    grad_output = torch.randn(3, 5, 6, generator=generator).to(torch.bfloat16)
    input = torch.randn(3, 5, 4, generator=generator).to(torch.bfloat16)
    weight_sum, bias_sum = torch.ones(6, 4), torch.ones(6)
    for _ in range(2):
        torch.ops.sftjob.accumulate_linear_grads(
            weight_sum, bias_sum, grad_output, input, fp32_products
        )
    g, x = grad_output.reshape(15, 6), input.reshape(15, 4)
    if fp32_products:
        product, columns = g.float().t() @ x.float(), g.float().sum(0)
    else:
        product, columns = (g.t() @ x).float(), g.sum(0).float()
    torch.testing.assert_close(weight_sum, 1 + 2 * product, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias_sum, 1 + 2 * columns, rtol=1e-6, atol=1e-6)


def test_not_fused_with_activation_offloading(trainer_stand_in: Any) -> None:
    from sftjob_trainer.levers.weight_copies import use_weight_copies

    model = tiny_model(tied=True)
    trainer = trainer_stand_in(model, activation_offloading=True)
    said = use_weight_copies(trainer, accumulate_in_matmul=True)
    assert said.endswith("fuseGradientAccumulation: not applied with activation_offloading")
    assert not any(isinstance(m, LinearAccumulatingInMatmul) for m in model.modules())
    assert any(isinstance(m, LinearWithWeightCopies) for m in model.modules())


def test_trainer_with_fused_accumulation_learns_the_same(bf16_trainer: Any) -> None:
    """Through the real SFTTrainer on CPU (bf16 products, autocast's arithmetic): the same
    losses and weights as the plain layers; plain layers and no gradients afterwards."""

    def run(speed: dict[str, str]) -> tuple[Losses, dict[str, torch.Tensor], Any]:
        recorder = Losses()
        trainer = bf16_trainer(
            speed, [recorder], maxSteps=3, loggingSteps=1, gradientAccumulationSteps=3
        )
        trainer.train()
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        return recorder, weights, trainer

    plain, plain_weights, _ = run({"castWeightsOncePerStep": "off"})
    ours, weights, trainer = run({"castWeightsOncePerStep": "on", "fuseGradientAccumulation": "on"})
    assert len(ours.losses) == 3 and ours.losses == plain.losses
    for name, value in weights.items():
        assert torch.equal(value, plain_weights[name]), name
    assert len(ours.layers_with_copies) == 3 and min(ours.layers_with_copies) > 0
    # Every copied layer of the tiny model is trainable, so every one was fused.
    assert ours.fused_layers == ours.layers_with_copies
    assert not any(isinstance(m, LinearWithWeightCopies) for m in trainer.model.modules())
    assert not any("_grad_sum" in name for name, _ in trainer.model.named_buffers())
    assert all(p.grad is None for p in trainer.model.parameters())


def test_fused_lever_rules_and_the_cpu_check() -> None:
    job = Job("full", 2, 8, 2048, True, True, True)
    cpu, gpu = Hardware(cuda=False), Hardware(cuda=True, memory_gib=79.1)
    copies_on = cast_weights_once(SpeedOptions(castWeightsOncePerStep="on"), gpu, job)
    copies_off = cast_weights_once(SpeedOptions(castWeightsOncePerStep="off"), gpu, job)

    def choose(switch: str, hw: Hardware = gpu, copies: Any = copies_on) -> Any:
        options = SpeedOptions(fuseGradientAccumulation=switch)  # type: ignore[arg-type]
        return fuse_gradient_accumulation(options, hw, job, copies)

    assert choose("auto").on
    assert not choose("auto", hw=cpu).on and "CUDA" in choose("auto", hw=cpu).reason
    assert choose("on", hw=cpu).on
    assert not choose("off").on
    lora = Job("lora", 2, 8, 2048, True, True, True)
    lora_copies = cast_weights_once(SpeedOptions(), gpu, lora)
    options = SpeedOptions()
    assert not fuse_gradient_accumulation(options, gpu, lora, lora_copies).on  # no gain
    forced = SpeedOptions(fuseGradientAccumulation="on")
    assert fuse_gradient_accumulation(forced, gpu, lora, lora_copies).on
    assert not choose("on", copies=copies_off).on
    assert "castWeightsOncePerStep is off" in choose("on", copies=copies_off).reason
    # The default plan for the bench's full case on an H100 has both; without a
    # micro-batch estimate (shape unknown) the auto copies are off, and so is this.
    qwen_15b = ModelShape(
        params=1_543_655_424, hidden=1536, layers=28, intermediate=8960, vocab=151_936
    )
    packed = Job("full", 2, 8, 2048, True, True, True)
    assert decide(SpeedOptions(), gpu, packed, qwen_15b).on("fuseGradientAccumulation")
    without_estimate = decide(SpeedOptions(), gpu, packed, None).summary()
    assert not without_estimate["fuseGradientAccumulation"]["on"]
    assert not decide(SpeedOptions(), cpu, packed, qwen_15b).on("fuseGradientAccumulation")
    assert matmul_adds_in_fp32(torch.device("cpu")) == "no fp32-output matmul on cpu"
