"""What every lever and the planner (speed.py) share: switches, facts, choices, the Lever shape.

A lever is one module under `sftjob_trainer/levers/` with
- `SWITCH`: its name, which is its field of `SpeedOptions` (`spec.training.speed.<SWITCH>`)
  and the `lever` of the `Choice` it returns;
- `decide(...)`: a pure function of the facts below (and, for a few, of a lever decided
  before it, passed in by the planner) returning a `Choice`: on or off, the reason (logged
  at start, so a slow or odd run can be traced to a lever) and the settings it adds to
  SFTConfig or to spec.model;
- `apply(trainer, plan)`, for a lever that acts on the built SFTTrainer rather than on its
  arguments: called by the planner only when the lever is on; returns what it did, for the
  log (None: nothing to log).

A lever imports this module, the shared leaves beside it (device_memory, training_hooks,
token_tally) and its own mechanics (modules without a SWITCH), never another lever and
nothing of the trainer outside levers/ (tests/unit/test_import_cycles.py checks it). The
planner gathers the facts from the config, the environment and the device, asks each
lever in turn, and applies them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol

Switch = Literal["auto", "on", "off"]
SWITCHES = ("auto", "on", "off")


@dataclass(frozen=True)
class SpeedOptions:
    """The user's switches, one per lever (spec.training.speed, then $SFTJOB_SPEED)."""

    flexAttention: Switch = "auto"
    autoMicroBatch: Switch = "auto"
    ligerKernel: Switch = "auto"
    compile: Switch = "auto"
    lightMetrics: Switch = "auto"
    dataWorkers: Switch = "auto"
    castWeightsOncePerStep: Switch = "auto"
    bf16ResidualStream: Switch = "auto"
    fuseGradientAccumulation: Switch = "auto"
    rotaryTablesOnce: Switch = "auto"

    @classmethod
    def parse(cls, *layers: dict[str, Any] | None) -> SpeedOptions:
        """Merge layers (later wins); booleans are accepted for the three-way switches."""
        merged: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        for layer in layers:
            for key, value in (layer or {}).items():
                if key not in names:
                    raise ValueError(f"unknown speed option {key!r}; known: {sorted(names)}")
                merged[key] = value
        for key in SWITCH_NAMES:
            value = merged.get(key)
            if isinstance(value, bool):
                merged[key] = "on" if value else "off"
            elif value is not None and value not in SWITCHES:
                raise ValueError(f"speed.{key} must be one of {SWITCHES}, got {value!r}")
        return cls(**merged)


SWITCH_NAMES = tuple(f.name for f in fields(SpeedOptions))


@dataclass(frozen=True)
class Hardware:
    """The device a training process runs on (the planner detects it)."""

    cuda: bool
    memory_gib: float | None = None  # of one device
    name: str = "cpu"
    cpus: float | None = None  # CPUs for each training process on this node


@dataclass(frozen=True)
class ModelShape:
    params: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int = 0  # 0: unknown, nothing counted for the LM head's logits

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        hidden = int(config.hidden_size)
        layers = int(config.num_hidden_layers)
        intermediate = int(getattr(config, "intermediate_size", 4 * hidden))
        vocab = int(config.vocab_size)
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", heads) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        attn = hidden * head_dim * (2 * heads + 2 * kv)
        per_layer = attn + 3 * hidden * intermediate + 2 * hidden
        embeddings = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
        return cls(
            params=layers * per_layer + embeddings,
            hidden=hidden,
            layers=layers,
            intermediate=intermediate,
            vocab=vocab,
        )


@dataclass(frozen=True)
class Job:
    """The facts of the run the levers look at."""

    method: str  # full | lora | qlora
    per_device: int
    accumulation: int
    max_length: int
    padding_free: bool  # packing with bfd/bfd_split (TRL turns padding_free on)
    checkpointing: bool  # what the spec asks; False is respected, True may be lifted
    bf16: bool
    distributed: str = "none"
    attn_set: bool = False  # model.attnImplementation given by the user
    shrunk: bool = False  # the operator shrank the batch after an OOM
    extra_args: tuple[str, ...] = ()
    world_size: int = 1  # training processes in the whole run


@dataclass(frozen=True)
class Choice:
    """One lever's decision: on or off, why, and the settings it adds when on."""

    lever: str
    on: bool
    reason: str
    sft: dict[str, Any] = field(default_factory=dict)  # SFTConfig fields
    model: dict[str, Any] = field(default_factory=dict)  # spec.model (ModelSource) fields


class Plan(Protocol):
    """What a lever's `apply` may read of the plan: which levers are on, the batch shape."""

    def on(self, lever: str) -> bool: ...

    @property
    def static_length(self) -> int | None: ...


class Lever(Protocol):
    """A lever module: its switch and its decision (arguments differ from lever to lever)."""

    SWITCH: str
    decide: Callable[..., Choice]


class TrainerLever(Lever, Protocol):
    """A lever that also acts on the built SFTTrainer when it is on."""

    def apply(self, trainer: Any, plan: Plan) -> str | None: ...
