"""rotaryTablesOnce: the rotary cos/sin tables pass through an opaque copy, computed once."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from sftjob_bench.bench import QWEN25_15B, TINY
from sftjob_trainer.levers.residual_stream import Bf16ResidualStream
from sftjob_trainer.levers.rotary_tables import (
    RotaryTablesOnce,
    _tables_once,
    rotary_modules,
    rotary_table,
    use_rotary_tables_once,
)
from sftjob_trainer.levers.rotary_tables_once import decide as rotary_tables_once
from sftjob_trainer.speed import (
    Choice,
    Hardware,
    Job,
    ModelShape,
    SpeedOptions,
    decide,
)
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(300)]

LAYERS = 4
QWEN_15B = ModelShape.from_config(Qwen2Config(**QWEN25_15B))  # the bench's full case
PACKED = Job("full", 2, 8, 2048, True, True, True)


def tiny_model(layers: int = TINY["num_hidden_layers"]) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(**{**TINY, "num_hidden_layers": layers, "vocab_size": 256})
    return Qwen2ForCausalLM(config).float()


IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def loss_and_backward(model: Any) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach()


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


class TablesSeen:
    """For each forward: the rotary module's own output (recorded before any other hook
    changes it) and the position embeddings the first decoder layer was handed."""

    def __init__(self) -> None:
        self.computed: list[tuple[torch.Tensor, ...]] = []
        self.received: list[tuple[torch.Tensor, ...]] = []
        self.handles: list[Any] = []

    def attach(self, model: Any) -> None:
        decoder = model.get_decoder()

        def computed(module: Any, args: Any, output: Any) -> None:
            self.computed.append(output)

        def received(module: Any, args: Any, kwargs: Any) -> None:
            self.received.append(kwargs["position_embeddings"])

        self.handles = [
            decoder.rotary_emb.register_forward_hook(computed, prepend=True),
            decoder.layers[0].register_forward_pre_hook(received, with_kwargs=True),
        ]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def copied(self) -> list[bool]:
        """Per forward: whether the layer got new tensors holding the same values."""
        assert self.computed and len(self.computed) == len(self.received)
        out = []
        for mine, theirs in zip(self.computed, self.received, strict=True):
            assert len(mine) == len(theirs) == 2  # cos, sin
            for a, b in zip(mine, theirs, strict=True):
                assert torch.equal(a, b)
            out.append(all(a is not b for a, b in zip(mine, theirs, strict=True)))
        return out


def test_lever_rules() -> None:
    on = Choice("compile", True, "torch.compile")
    off = Choice("compile", False, "turned off")

    def choose(switch: str, compiled: Choice) -> Choice:
        return rotary_tables_once(SpeedOptions(rotaryTablesOnce=switch), compiled)  # type: ignore[arg-type]

    assert not choose("off", on).on and not choose("off", off).on
    assert not choose("auto", off).on and "not compiled" in choose("auto", off).reason
    assert choose("auto", on).on
    assert choose("on", off).on  # forced: eager only pays a copy
    assert all(choose(s, c).lever == "rotaryTablesOnce" for s in ("on", "off") for c in (on, off))
    # The default plan compiles the bench's full case on a GPU, and so keeps the tables
    # once; on CPU nothing is compiled and it is off.
    gpu = Hardware(cuda=True, memory_gib=79.1)
    plan = decide(SpeedOptions(), gpu, PACKED, QWEN_15B)
    assert plan.on("compile") and plan.on("rotaryTablesOnce")
    assert not decide(SpeedOptions(compile="off"), gpu, PACKED, QWEN_15B).on("rotaryTablesOnce")
    cpu = decide(SpeedOptions(), Hardware(cuda=False), PACKED, QWEN_15B).summary()
    assert not cpu["compile"]["on"] and not cpu["rotaryTablesOnce"]["on"]
    assert "not compiled" in cpu["rotaryTablesOnce"]["reason"]


KERNEL = re.compile(r"^(\w+) = async_compile\.\w+\(.*?'''(.*?)'''", re.S | re.M)


def launches_computing(codes: list[str], function: str) -> int:
    """Kernel launches per step whose kernel evaluates `function`, over the generated
    modules (a kernel shared by several layers is written once and launched per layer)."""
    count = 0
    for code in codes:
        for name, source in KERNEL.findall(code):
            if re.search(rf"\b{function}\(", source):
                count += len(re.findall(rf"^\s+{name}\(", code, re.M))
    return count


def test_compiled_the_tables_are_computed_once_with_the_same_values() -> None:
    from torch._inductor.utils import run_and_get_code

    eager = tiny_model(LAYERS)
    eager_loss = loss_and_backward(eager)

    def compiled(lever: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], str, int, int]:
        torch._dynamo.reset()
        model = tiny_model(LAYERS)
        callback = RotaryTablesOnce([model.model.rotary_emb])
        if lever:
            callback.start()
        try:
            loss, codes = run_and_get_code(loss_and_backward, torch.compile(model))
        finally:
            callback.stop()
            torch._dynamo.reset()
        assert len(codes) == 2  # one graph: its forward and its backward
        text = "\n".join(codes)
        cos, sin = launches_computing(codes, "cos"), launches_computing(codes, "sin")
        return loss, gradients(model), text, cos, sin

    plain_loss, plain_grads, plain, plain_cos, plain_sin = compiled(lever=False)
    loss, grads, ours, cos, sin = compiled(lever=True)

    # Plain: the tables are inlined into the layers' rotation kernels (the backward's at
    # least), so cos and sin are evaluated by at least one kernel launch per layer.
    assert len(re.findall(r"\bcos\(", plain)) > 1 and len(re.findall(r"\bsin\(", plain)) > 1
    assert plain_cos >= LAYERS and plain_sin >= LAYERS
    assert "rotary_table" not in plain
    # With the lever: one kernel computes both tables, once, and every rotation reads them.
    assert len(re.findall(r"\bcos\(", ours)) == 1 and len(re.findall(r"\bsin\(", ours)) == 1
    assert (cos, sin) == (1, 1)
    assert "torch.ops.sftjob.rotary_table" in ours
    # The same values: bit for bit what the compiled model computes without it...
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() == gradients(eager).keys()
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name
    # ...and eager's up to what inductor's own bf16 autocast rounding moves (measured: the
    # loss within 1e-5, each gradient within 2.5% of its norm; the same with or without).
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=0)
    for name, want in gradients(eager).items():
        assert (grads[name] - want).norm() <= 0.05 * want.norm(), name


def test_compiled_bf16_tables_change_only_by_their_rounding() -> None:
    """With bf16 tables (the bf16 residual stream makes the hidden states, and so the
    tables, bf16) the inlined chain skips the tables' rounding to bf16: inductor does not
    emulate a cast whose result it never stores. The lever stores them, rounded, as eager
    does. So it moves the loss slightly, by that rounding only:
    with inductor told to emulate such casts, the runs with and without it are bit for
    bit the same."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    def compiled(lever: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], str]:
        model = tiny_model(LAYERS)
        stream = Bf16ResidualStream(model.get_input_embeddings())
        tables = RotaryTablesOnce([model.model.rotary_emb])
        stream.start()
        if lever:
            tables.start()
        try:
            with inductor_config.patch(emulate_precision_casts=True):
                loss, codes = run_and_get_code(loss_and_backward, torch.compile(model))
        finally:
            tables.stop()
            stream.stop()
            torch._dynamo.reset()
        return loss, gradients(model), "\n".join(codes)

    # The premise: with the stream, the layers are handed bf16 tables.
    model, seen = tiny_model(LAYERS), TablesSeen()
    stream = Bf16ResidualStream(model.get_input_embeddings())
    stream.start()
    seen.attach(model)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=IDS)
    finally:
        seen.detach()
        stream.stop()
    assert [table.dtype for table in seen.received[0]] == [torch.bfloat16] * 2

    loss, grads, code = compiled(lever=True)
    plain_loss, plain_grads, plain_code = compiled(lever=False)
    assert "torch.ops.sftjob.rotary_table" in code and "rotary_table" not in plain_code
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name


def test_eager_the_same_bits_and_the_hook_comes_off() -> None:
    plain, model = tiny_model(), tiny_model()
    rotary = model.model.rotary_emb
    assert rotary_modules(model) == [rotary]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_logits = plain(input_ids=IDS, labels=IDS)
    plain_logits.loss.backward()

    callback = RotaryTablesOnce([rotary])
    callback.start()
    callback.start()  # a retry after a failed train(): one hook only
    assert len(rotary._forward_hooks) == 1
    seen = TablesSeen()
    seen.attach(model)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
    finally:
        seen.detach()
    assert seen.copied() == [True]  # the layers were handed the op's copies
    assert torch.equal(out.logits, plain_logits.logits)
    assert torch.equal(out.loss, plain_logits.loss)
    want = gradients(plain)
    assert gradients(model).keys() == want.keys() and want
    for name, grad in gradients(model).items():
        assert torch.equal(grad, want[name]), name

    callback.stop()
    assert not rotary._forward_hooks
    callback.on_train_begin(None, None, None)
    assert len(rotary._forward_hooks) == 1
    callback.on_train_end(None, None, None)
    assert not rotary._forward_hooks and callback.handles == []
    seen.attach(model)
    with torch.no_grad():
        model(input_ids=IDS)
    seen.detach()
    assert seen.copied() == [True, False]  # after training: the tables go straight through


def test_the_hook_leaves_other_outputs_alone_and_the_op_is_a_copy() -> None:
    table = torch.randn(1, 4, 8)
    for output in (table, [table, table], (), (table, "not a tensor"), None):
        assert _tables_once(None, (), output) is output
    cos, sin = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    copied = _tables_once(None, (), (cos, sin))
    assert isinstance(copied, tuple) and len(copied) == 2
    for old, new in zip((cos, sin), copied, strict=True):
        assert torch.equal(old, new) and new.data_ptr() != old.data_ptr()
    # Learned rotary frequencies would get their gradient through the copy unchanged.
    learned = torch.randn(3, 5, requires_grad=True)
    upstream = torch.randn(3, 5)
    rotary_table(learned).backward(upstream)
    assert learned.grad is not None and torch.equal(learned.grad, upstream)


def test_not_applied_without_a_rotary_module(trainer_stand_in: Any, tiny_gpt2: Any) -> None:
    # GPT-2 learns its positions: no rotary tables to keep.
    gpt2 = trainer_stand_in(tiny_gpt2)
    message = use_rotary_tables_once(gpt2)
    assert message.startswith("not applied") and "no rotary embedding module" in message
    assert gpt2.callbacks == []


def lever_callbacks(trainer: Any) -> list[RotaryTablesOnce]:
    return [c for c in trainer.callback_handler.callbacks if isinstance(c, RotaryTablesOnce)]


def test_added_to_a_real_trainer(bf16_trainer: Any) -> None:
    trainer = bf16_trainer({}, [], maxSteps=1)
    assert lever_callbacks(trainer) == []  # auto on CPU: not compiled, so off
    message = use_rotary_tables_once(trainer)
    assert message.startswith("1 module(s) hooked (Qwen2RotaryEmbedding): the (cos, sin)")
    (callback,) = lever_callbacks(trainer)
    assert callback.modules == [trainer.model.get_decoder().rotary_emb]


class Losses(TrainerCallback):  # type: ignore[misc]
    """The logged losses, seen from the trainer."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class TrainingTables(Losses):
    """Losses, and what the first layer was handed at every forward, seen from the trainer."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = TablesSeen()

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **_: Any
    ) -> None:
        self.seen.attach(model)

    def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.seen.detach()


def test_trainer_trains_through_the_copies_and_learns_the_same(bf16_trainer: Any) -> None:
    def run(switch: str) -> tuple[TrainingTables, Any]:
        recorder = TrainingTables()
        trainer = bf16_trainer(
            {"rotaryTablesOnce": switch},
            [recorder],
            maxSteps=3,
            loggingSteps=1,
            gradientAccumulationSteps=2,
        )
        assert len(lever_callbacks(trainer)) == (1 if switch == "on" else 0)
        trainer.train()
        return recorder, trainer

    plain, _ = run("off")
    ours, trainer = run("on")
    assert plain.seen.copied() == [False] * 6  # 3 steps of 2 micro-batches
    assert ours.seen.copied() == [True] * 6  # every forward went through the op
    assert len(ours.losses) == len(plain.losses) == 3
    assert ours.losses == plain.losses  # a copy changes no value
    assert not trainer.model.get_decoder().rotary_emb._forward_hooks  # removed at the end


def test_a_compiled_trainer_computes_the_tables_once_and_learns_the_same(
    bf16_trainer: Any,
) -> None:
    """Trainer compiles the model after train begin, when the hook is in place: the op is
    in the code it generates, cos is evaluated by one kernel launch, and (fp32 tables, as
    on CPU) the logged losses are the run's without the lever, bit for bit."""
    from torch._inductor.utils import run_and_get_code

    def run(switch: str) -> tuple[list[float], list[str]]:
        losses = Losses()
        trainer = bf16_trainer(
            {"compile": "on", "bf16ResidualStream": "off", "rotaryTablesOnce": switch},
            [losses],
            maxSteps=2,
            loggingSteps=1,
        )
        assert trainer.args.torch_compile
        try:
            _, codes = run_and_get_code(trainer.train)
        finally:
            torch._dynamo.reset()
        return losses.losses, codes

    plain, plain_codes = run("off")
    ours, codes = run("on")
    assert "rotary_table" not in "\n".join(plain_codes)
    assert "torch.ops.sftjob.rotary_table" in "\n".join(codes)
    layers = TINY["num_hidden_layers"]
    assert launches_computing(plain_codes, "cos") >= layers
    assert launches_computing(codes, "cos") == launches_computing(codes, "sin") == 1
    assert len(ours) == len(plain) == 2
    assert ours == plain
