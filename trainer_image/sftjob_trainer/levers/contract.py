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
  log (None: nothing to log);
- `CONTRACT`: its version contract with the libraries it relies on (`Contract`): the range
  of each library's versions it was verified with, the signatures of the functions it calls
  or patches (private ones included), and, where it changes what is computed, a probe that
  compares its path with the plain one on a few tensors. The planner runs `check` at start
  and turns a lever whose check fails off, with the reason, instead of letting it compute
  something else;
- `EXACT`: whether it changes no number (bit for bit the plain TRL run on CPU, as its tests
  show), and `NUMERICS`, why: `speed.preset: exact` keeps only the exact levers.

A lever imports this module, the shared leaves beside it (device_memory, training_hooks,
token_tally) and its own mechanics (modules without a SWITCH), never another lever and
nothing of the trainer outside levers/ (tests/unit/test_import_cycles.py checks it). The
planner gathers the facts from the config, the environment and the device, asks each
lever in turn, and applies them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

Switch = Literal["auto", "on", "off"]
SWITCHES = ("auto", "on", "off")


@dataclass(frozen=True)
class SpeedOptions:
    """The user's switches, one per lever (spec.training.speed, then $SFTJOB_SPEED)."""

    flexAttention: Switch = "auto"
    varlenAttention: Switch = "auto"
    autoMicroBatch: Switch = "auto"
    ligerKernel: Switch = "auto"
    compile: Switch = "auto"
    lightMetrics: Switch = "auto"
    dataWorkers: Switch = "auto"
    castWeightsOncePerStep: Switch = "auto"
    bf16ResidualStream: Switch = "auto"
    fuseGradientAccumulation: Switch = "auto"
    fp8Matmuls: Switch = "auto"
    rotaryTablesOnce: Switch = "auto"
    parallelSave: Switch = "auto"

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
    capability: tuple[int, int] | None = None  # CUDA compute capability (major, minor)


@dataclass(frozen=True)
class ModelShape:
    params: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int = 0  # 0: unknown, nothing counted for the LM head's logits
    # What in the model's attention a plain causal kernel would not compute (a sliding
    # window, logit soft-capping, attention dropout); None: plain causal attention.
    attention_extras: str | None = None

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
            attention_extras=attention_extras(config),
        )


def attention_extras(config: Any) -> str | None:
    """The config's attention features beyond plain causal softmax attention, or None.

    transformers gives a layer a window where its `layer_types` says "sliding_attention",
    or (older configs) where `sliding_window` is set and `use_sliding_window` not false.
    """
    extras = []
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        if any("sliding" in str(kind) for kind in layer_types):
            extras.append("sliding-window layers")
    elif window and getattr(config, "use_sliding_window", True) is not False:
        extras.append(f"a sliding window of {window}")
    if getattr(config, "attn_logit_softcapping", None):
        extras.append("attention logit soft-capping")
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        extras.append("attention dropout")
    return ", ".join(extras) or None


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
    # At most this many tokens one GPU trains (speed.run_tokens_per_gpu: the planned steps
    # or the training rows, at maxLength each); None when neither is known.
    run_tokens_per_gpu: int | None = None
    # Tokens per GPU after which a cold compile (minutes) has paid for itself (measured).
    compile_payback_tokens: int | None = None
    # Whether compiled artifacts of this run's shape were found (None: not looked up).
    compile_cache_warm: bool | None = None
    # Tokens per GPU after which compiling only the decoder layers (regional, the varlen
    # kernel attending inside) pays back its seconds of compile, and after which the whole
    # model's compile (minutes) beats it (measured; None: regional is never chosen).
    regional_payback_tokens: int | None = None
    whole_over_regional_tokens: int | None = None
    # $SFTJOB_COMPILE_REGIONS: "on" or "off" forces the compile's form, "auto" chooses.
    compile_regions: str = "auto"
    # Rows of training data this process prepares (None: not known when planning).
    rows: int | None = None


@dataclass(frozen=True)
class Choice:
    """One lever's decision: on or off, why, and the settings it adds when on."""

    lever: str
    on: bool
    reason: str
    sft: dict[str, Any] = field(default_factory=dict)  # SFTConfig fields
    model: dict[str, Any] = field(default_factory=dict)  # spec.model (ModelSource) fields
    # Which form of a lever with several is on (compile: "regional" or "whole").
    variant: str = ""


class Plan(Protocol):
    """What a lever's `apply` may read of the plan: which levers are on, the batch shape."""

    def on(self, lever: str) -> bool: ...

    def variant(self, lever: str) -> str: ...

    @property
    def static_length(self) -> int | None: ...


Preset = Literal["default", "exact"]
PRESETS = ("default", "exact")

# The versions the levers were verified with: the GPU measurements of docs/performance.md
# ran torch 2.11, transformers 5.17, trl 1.16.0, accelerate 1.15, peft 0.21.0 (sessions 3
# to 9); the CPU tests run the pins of constraints.txt (torch 2.13.0, transformers 5.24.0,
# trl 1.16.0, peft 0.21.2). A lever names the libraries it relies on (`verified`); a
# version outside its range turns it off until it is verified again.
VERIFIED_VERSIONS: dict[str, str] = {
    "torch": ">=2.11,<2.14",
    "transformers": ">=5.17,<5.25",
    "trl": "==1.16.0",
    "accelerate": ">=1.15,<1.16",
    "peft": ">=0.21,<0.22",
}


def verified(*libraries: str) -> dict[str, SpecifierSet]:
    """The verified range of each of `libraries` (VERIFIED_VERSIONS), for a lever's contract."""
    return {name: SpecifierSet(VERIFIED_VERSIONS[name]) for name in libraries}


@dataclass(frozen=True)
class Signature:
    """A function or class of a library that a lever calls or patches, as verified.

    `target` is "module:qualified.name". `parameters`, when given, are its parameters in
    order (a lever passing a dozen positional arguments depends on each position); a triton
    kernel is read through its `.fn`. `includes` are names that must be among them (a
    config class's fields). With neither, only its presence is checked.
    """

    target: str
    parameters: tuple[str, ...] | None = None
    includes: tuple[str, ...] = ()


def deferred_probe(module: str, function: str, **kwargs: Any) -> Callable[[str], str | None]:
    """A probe that imports its module (`.name` within this package) only when it runs.

    The probes live beside the torch code they check; importing them when a lever module
    loads would import torch for `sftjob plan` and the operator, which never run a probe.
    """

    def probe(device: str) -> str | None:
        found: Callable[..., str | None] = getattr(
            importlib.import_module(module, __package__), function
        )
        return found(device, **kwargs)

    return probe


@dataclass(frozen=True)
class Contract:
    """What a lever was verified with, as data a test can vary (see `check`)."""

    versions: Mapping[str, SpecifierSet]
    signatures: tuple[Signature, ...] = ()
    # A comparison of the lever's path with the plain one on a few tensors, on the device
    # ("cpu" or "cuda"): None when they agree, else what differs.
    probe: Callable[[str], str | None] | None = None


def installed_versions(libraries: Any) -> dict[str, str | None]:
    """The installed version of each library (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in libraries:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def resolve(target: str) -> Any:
    """The object "module:qualified.name" names; AttributeError or ImportError if absent."""
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def parameter_names(obj: Any) -> tuple[str, ...]:
    """The parameters of a function, a class's constructor or a triton kernel (`.fn`)."""
    return tuple(inspect.signature(getattr(obj, "fn", obj)).parameters)


def signature_mismatch(expected: Signature) -> str | None:
    """Why the library's object differs from what the lever was verified with; None if not."""
    try:
        obj = resolve(expected.target)
    except (ImportError, AttributeError) as exc:
        return f"{expected.target} is missing ({type(exc).__name__}: {exc})"
    if expected.parameters is None and not expected.includes:
        return None
    try:
        found = parameter_names(obj)
    except (TypeError, ValueError) as exc:
        return f"{expected.target} has no readable signature ({exc})"
    if expected.parameters is not None and found != expected.parameters:
        verified = expected.parameters
        # The first position that differs (past the shorter list: one was added or removed).
        pairs = zip(found, verified, strict=False)
        at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(found), len(verified)))
        return (
            f"{expected.target}: parameter {at + 1} is {found[at] if at < len(found) else 'absent'}"
            f", verified with {verified[at] if at < len(verified) else 'none'} "
            f"({len(found)} parameters, verified with {len(verified)})"
        )
    missing = [name for name in expected.includes if name not in found]
    if missing:
        return f"{expected.target} has no {', '.join(missing)}"
    return None


def version_mismatch(
    versions: Mapping[str, SpecifierSet], installed: Mapping[str, str | None]
) -> str | None:
    """Why the installed libraries are outside the verified ranges; None if within."""
    for name, verified_range in versions.items():
        found = installed.get(name)
        if found is None:
            return f"{name} is not installed"
        try:
            inside = verified_range.contains(Version(found), prereleases=True)
        except InvalidVersion:
            inside = False
        if not inside:
            return f"{name} {found} is outside the versions it was verified with ({verified_range})"
    return None


def check(
    contract: Contract, device: str = "cpu", installed: Mapping[str, str | None] | None = None
) -> str | None:
    """The lever's self-check: versions, then signatures, then the probe; None when it passes,
    else the first reason it fails (the planner turns the lever off with it)."""
    if installed is None:
        installed = installed_versions(contract.versions)
    reason = version_mismatch(contract.versions, installed)
    if reason is None:
        reason = next(filter(None, map(signature_mismatch, contract.signatures)), None)
    if reason is None and contract.probe is not None:
        try:
            reason = contract.probe(device)
        except Exception as exc:  # a probe that cannot run is a failed check, with its cause
            reason = f"its probe failed: {type(exc).__name__}: {exc}"
        if reason is not None and not reason.startswith("its probe"):
            reason = f"its probe differs from the plain path: {reason}"
    return reason


class Lever(Protocol):
    """A lever module: its switch and its decision (arguments differ from lever to lever)."""

    SWITCH: str
    CONTRACT: Contract
    EXACT: bool
    NUMERICS: str
    decide: Callable[..., Choice]


class TrainerLever(Lever, Protocol):
    """A lever that also acts on the built SFTTrainer when it is on."""

    def apply(self, trainer: Any, plan: Plan) -> str | None: ...
