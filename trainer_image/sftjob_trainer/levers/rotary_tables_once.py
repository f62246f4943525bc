"""The rotaryTablesOnce lever: rotary tables computed once per forward (rotary_tables.py).

Compiled, inductor inlines the rotary embedding's cos/sin tables (a short pointwise chain)
into every layer's query/key rotation, forward and backward, so each layer recomputes them;
an opaque copy of the tables makes them one buffer computed once per forward
(rotary_tables.py; the same values, except that bf16 tables are rounded to bf16 as eager
rounds them). +1.8% and +2.4% on the bench's full case (session 8, each GPU both ways). On
with compile under "auto".
"""

from __future__ import annotations

from typing import Any

from .contract import Choice, Contract, Plan, Signature, SpeedOptions, deferred_probe, verified

SWITCH = "rotaryTablesOnce"

EXACT = True
NUMERICS = (
    "eager, a copy of the rotary tables (bit for bit, tests/trainer/test_rotary_tables.py); "
    "only compiled bf16 tables round otherwise, and compiling is not exact"
)


CONTRACT = Contract(
    versions=verified("torch", "transformers"),
    signatures=(
        Signature("torch.library:custom_op"),
        Signature(
            "transformers:TrainerCallback.on_train_begin",
            ("self", "args", "state", "control", "kwargs"),
        ),
    ),
    probe=deferred_probe(".rotary_tables", "probe_rotary_table"),
)


def decide(opt: SpeedOptions, compiled: Choice) -> Choice:
    name = SWITCH
    if opt.rotaryTablesOnce == "off":
        return Choice(name, False, "turned off: compiled layers may recompute the rotary tables")
    if opt.rotaryTablesOnce == "auto" and not compiled.on:
        return Choice(name, False, "not compiled: eager computes the rotary tables once already")
    return Choice(
        name,
        True,
        "the rotary cos/sin tables are computed once per forward into one buffer, not "
        "recomputed inside every layer's compiled rotation (the same values; bf16 tables "
        "rounded to bf16 as eager rounds them)",
    )


def apply(trainer: Any, plan: Plan) -> str:
    """The hook on the rotary modules (rotary_tables.py), while training runs."""
    from .rotary_tables import use_rotary_tables_once

    return use_rotary_tables_once(trainer)
