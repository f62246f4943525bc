"""bf16ResidualStream: hidden states between layers in bf16, removed when training ends."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sftjob_bench.bench import TINY
from sftjob_trainer.levers.bf16_residual_stream import decide as bf16_residual_stream
from sftjob_trainer.levers.residual_stream import (
    Bf16ResidualStream,
    use_bf16_residual_stream,
)
from sftjob_trainer.speed import Hardware, Job, SpeedOptions
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    TrainerCallback,
)

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(300)]


def tiny_model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**{**TINY, "vocab_size": 256})).float()


def layer_output_dtypes(model: Any, run: Any) -> list[torch.dtype]:
    """The dtype of each decoder layer's hidden-state output while `run()` runs."""
    seen: list[torch.dtype] = []

    def record(module: Any, args: Any, output: Any) -> None:
        seen.append((output[0] if isinstance(output, tuple) else output).dtype)

    handles = [layer.register_forward_hook(record) for layer in model.model.layers]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_lever_rules() -> None:
    job = Job("full", 2, 8, 2048, True, True, True)
    cpu, gpu = Hardware(cuda=False), Hardware(cuda=True, memory_gib=79.1)

    def choose(switch: str, job: Job = job, hw: Hardware = gpu) -> Any:
        return bf16_residual_stream(SpeedOptions(bf16ResidualStream=switch), hw, job)  # type: ignore[arg-type]

    assert choose("auto").on and "bf16" in choose("auto").reason
    assert not choose("auto", hw=cpu).on and "CUDA" in choose("auto", hw=cpu).reason
    assert choose("on", hw=cpu).on  # forced on CPU: autocast runs there too
    assert not choose("off").on
    no_bf16 = Job("full", 2, 8, 2048, True, True, False)
    assert not choose("on", job=no_bf16).on and "bf16 is off" in choose("on", job=no_bf16).reason
    for method in ("lora", "qlora"):  # no gain measured for adapters
        adapters = Job(method, 2, 8, 2048, True, True, True)
        assert not choose("auto", job=adapters).on and method in choose("auto", job=adapters).reason
        assert choose("on", job=adapters).on


def test_the_stream_is_bf16_and_gradients_reach_the_fp32_weights() -> None:
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids).loss

    holder: dict[str, torch.Tensor] = {}
    plain = layer_output_dtypes(model, lambda: holder.update(fp32=loss()))
    assert plain == [torch.float32] * TINY["num_hidden_layers"]  # autocast alone: fp32 stream

    stream = Bf16ResidualStream(model.get_input_embeddings())
    stream.on_train_begin(None, None, None)
    stream.on_train_begin(None, None, None)  # a retry after a failed train(): one cast only
    assert len(model.get_input_embeddings()._forward_hooks) == 1
    bf16 = layer_output_dtypes(model, lambda: holder.update(bf16=loss()))
    assert bf16 == [torch.bfloat16] * TINY["num_hidden_layers"]
    # The rounding of the residual additions moves the loss a little, not a lot.
    torch.testing.assert_close(holder["bf16"], holder["fp32"], rtol=1e-2, atol=0)
    holder["bf16"].backward()
    embedding = model.get_input_embeddings().weight
    assert embedding.dtype == torch.float32 and embedding.grad is not None
    assert embedding.grad.dtype == torch.float32 and embedding.grad.abs().sum() > 0

    stream.on_train_end(None, None, None)
    assert layer_output_dtypes(model, loss) == [torch.float32] * TINY["num_hidden_layers"]


class StreamDtypes(TrainerCallback):  # type: ignore[misc]
    """Losses, and the first layer's output dtype at every step, seen from the trainer."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.dtypes: list[torch.dtype] = []
        self.handle: Any = None

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **_: Any
    ) -> None:
        layer = model.get_decoder().layers[0]

        def record(module: Any, inputs: Any, output: Any) -> None:
            self.dtypes.append((output[0] if isinstance(output, tuple) else output).dtype)

        self.handle = layer.register_forward_hook(record)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.handle.remove()


def test_trainer_with_the_bf16_stream_learns_nearly_the_same(bf16_trainer: Any) -> None:
    """Through the real SFTTrainer on CPU with bf16 autocast; the model is plain afterwards."""

    def run(switch: str) -> tuple[StreamDtypes, Any]:
        recorder = StreamDtypes()
        trainer = bf16_trainer(
            {"bf16ResidualStream": switch},
            [recorder],
            maxSteps=3,
            loggingSteps=1,
            gradientAccumulationSteps=2,
        )
        trainer.train()
        return recorder, trainer

    plain, _ = run("off")
    ours, trainer = run("on")
    assert set(plain.dtypes) == {torch.float32}
    assert ours.dtypes and set(ours.dtypes) == {torch.bfloat16}
    assert len(ours.losses) == len(plain.losses) == 3
    assert ours.losses != plain.losses  # the rounding is real...
    for got, want in zip(ours.losses, plain.losses, strict=True):
        assert got == pytest.approx(want, rel=1e-2)  # ...and small
    # After training: no cast left, the stream is fp32 again.
    model = trainer.model
    ids = torch.tensor([[1, 2, 3, 4]], device=model.device)
    with torch.no_grad():
        dtypes = layer_output_dtypes(model, lambda: model(input_ids=ids))
    assert set(dtypes) == {torch.float32}


def test_the_plan_carries_the_stream_for_full_fine_tunes_on_a_gpu() -> None:
    from sftjob_trainer.speed import decide

    gpu = Hardware(cuda=True, memory_gib=79.1)
    full = Job("full", 2, 8, 2048, True, True, True)
    lora = Job("lora", 2, 8, 2048, True, True, True)
    assert decide(SpeedOptions(), gpu, full, None).on("bf16ResidualStream")
    assert not decide(SpeedOptions(), gpu, lora, None).on("bf16ResidualStream")
    assert not decide(SpeedOptions(), Hardware(cuda=False), full, None).on("bf16ResidualStream")


def test_a_second_train_call_casts_again(bf16_trainer: Any) -> None:
    recorder = StreamDtypes()
    trainer = bf16_trainer({"bf16ResidualStream": "on"}, [recorder], maxSteps=2)
    trainer.train()
    first = len(recorder.dtypes)
    trainer.args.max_steps = 4
    trainer.train()  # e.g. a notebook training on: the stream is bf16 again, then fp32
    assert first > 0 and len(recorder.dtypes) > first
    assert set(recorder.dtypes) == {torch.bfloat16}
    assert not trainer.model.get_input_embeddings()._forward_hooks


def test_not_applied_where_it_would_not_take_or_cannot_find_the_embedding(
    trainer_stand_in: Any, tiny_gpt2: Any
) -> None:
    # GPT-2 adds its learned fp32 position embeddings after the token embedding.
    trainer = trainer_stand_in(tiny_gpt2)
    not_applied = (
        "not applied: with the cast the hidden states between layers are still float32 "
        "(the model adds fp32 tensors after its embedding: learned positions, MoE experts "
        "or norms with fp32 weights), so it would round without gaining"
    )
    assert use_bf16_residual_stream(trainer) == not_applied
    assert trainer.callbacks == []
    # A mixture of experts sums its experts into a buffer shaped like the fp32 norm output.
    moe = Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_experts=4,
            num_experts_per_tok=2,
            vocab_size=64,
        )
    )
    trainer = trainer_stand_in(moe)
    assert use_bf16_residual_stream(trainer).startswith("not applied: with the cast")
    assert trainer.callbacks == [] and not moe.get_input_embeddings()._forward_hooks

    class Odd(PreTrainedModel):  # an embedding transformers cannot find by name
        config_class = PretrainedConfig

        def __init__(self, config: PretrainedConfig) -> None:
            super().__init__(config)
            self.tokens = torch.nn.Embedding(8, 4)

    trainer = trainer_stand_in(Odd(PretrainedConfig()))
    assert use_bf16_residual_stream(trainer) == (
        "not applied: the model's input embedding cannot be found"
    )
    qwen = trainer_stand_in(tiny_model())
    assert use_bf16_residual_stream(qwen) == "Embedding output cast to bf16 while training runs"
    assert len(qwen.callbacks) == 1


def test_lora_adapters_learn_through_the_bf16_stream_with_checkpointing(
    bf16_trainer: Any,
) -> None:
    # peft and transformers hook the same embedding (enable_input_require_grads) so that
    # checkpointed layers see an input that requires grad; with the cast in between the
    # adapters must still get their gradients.
    recorder = StreamDtypes()
    trainer = bf16_trainer(
        {"bf16ResidualStream": "on"},
        [recorder],
        method="lora",
        maxSteps=2,
        gradientCheckpointing=True,
        learningRate=1e-2,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert before and set(recorder.dtypes) == {torch.bfloat16}
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, value in before.items() if torch.equal(after[n].detach(), value)]
    assert unchanged == []  # lora_B starts at zero: each one moved, so each got a gradient


def test_the_check_leaves_the_random_state_as_it_found_it(trainer_stand_in: Any) -> None:
    # With attention dropout the probe's forward draws random numbers.
    model = Qwen2ForCausalLM(Qwen2Config(**{**TINY, "vocab_size": 256, "attention_dropout": 0.5}))
    model.train()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert use_bf16_residual_stream(trainer_stand_in(model)).startswith("Embedding output cast")
    assert torch.equal(torch.rand(4), expected)


def test_the_check_compiles_nothing_under_flex_attention(trainer_stand_in: Any) -> None:
    # transformers compiles flex_attention and its block mask on their first eager call:
    # two graphs (12 s on this CPU, a Triton kernel on a GPU) that training never uses.
    from torch._dynamo.utils import counters

    model = tiny_model()
    model.set_attn_implementation("flex_attention")
    frames = counters["frames"]["total"]
    trainer = trainer_stand_in(model)
    # Checked (no "not checked: ..." note): the stream is bf16 under flex attention too.
    assert use_bf16_residual_stream(trainer) == "Embedding output cast to bf16 while training runs"
    assert counters["frames"]["total"] == frames
    assert model.config._attn_implementation == "flex_attention"


def test_the_check_runs_under_the_varlen_kernel(trainer_stand_in: Any) -> None:
    # The varlen kernel refuses a row without TRL's document boundaries: the check's
    # forward describes its row as the padding-free collator does, so the stream is
    # checked (no "not checked: ValueError ..." note, as session 19's GPU logs had).
    from sftjob_trainer.levers.packed_flash import IMPLEMENTATION, reference_causal, register
    from sftjob_trainer.levers.residual_stream import packed_row_kwargs

    register(kernel=reference_causal)
    model = tiny_model()
    model.set_attn_implementation(IMPLEMENTATION)
    ids = torch.zeros((1, 4), dtype=torch.long)
    with pytest.raises(ValueError, match="needs packed padding-free batches"):
        model(input_ids=ids)  # the plain row, as the check sent it before
    assert use_bf16_residual_stream(trainer_stand_in(model)) == (
        "Embedding output cast to bf16 while training runs"
    )
    # Other attentions get the plain row.
    assert packed_row_kwargs(tiny_model(), ids) == {}
