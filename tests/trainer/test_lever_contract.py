"""The levers' version contract: each checks itself at start and turns off with a reason.

The expected facts (verified versions, signatures, probes) are data of each lever's
`CONTRACT`: a test varies them by building a contract with other facts, never by changing
the libraries. With the pinned versions every lever's check passes on CPU; a lever whose
check fails is decided off, with the reason, whatever its switch says.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from lever_jobs import H100, QWEN_15B, SEED_REFERENCE_JOB
from packaging.specifiers import SpecifierSet
from sftjob_trainer.failures import ConfigError
from sftjob_trainer.levers import light_metrics
from sftjob_trainer.levers.contract import (
    SWITCH_NAMES,
    Contract,
    Hardware,
    Signature,
    SpeedOptions,
    check,
    installed_versions,
)
from sftjob_trainer.speed import LEVERS, checked_plan, decide, self_checks, speed_settings

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
CPU = Hardware(cuda=False, memory_gib=16.0)


def pinned(library: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == library:
            return version.strip()
    raise AssertionError(f"constraints.txt does not pin {library}")


def choice(plan: Any, lever: str) -> Any:
    (found,) = [c for c in plan.choices if c.lever == lever]
    return found


def test_every_lever_passes_its_self_check_with_the_pinned_versions() -> None:
    libraries = {name for lever in LEVERS for name in lever.CONTRACT.versions}
    installed = installed_versions(libraries)
    for library, version in installed.items():  # CI runs the pins, as the image does
        assert version is not None and version.split("+")[0] == pinned(library), library
    failures = {lever.SWITCH: check(lever.CONTRACT, "cpu") for lever in LEVERS}
    assert failures == dict.fromkeys(failures), failures
    assert len(LEVERS) == 13
    # The planner runs the same checks at start: with every switch on, none fails.
    assert self_checks(SpeedOptions(**dict.fromkeys(SWITCH_NAMES, "on")), "cpu") == {}


def test_each_lever_states_whether_it_is_exact_and_why() -> None:
    for lever in LEVERS:
        assert isinstance(lever.EXACT, bool) and len(lever.NUMERICS) > 20, lever.SWITCH
    exact = {lever.SWITCH for lever in LEVERS if lever.EXACT}
    assert exact == {
        "dataWorkers",
        "castWeightsOncePerStep",
        "rotaryTablesOnce",
        "parallelSave",
    }


def with_signature(contract: Contract, target: str, **changes: Any) -> Contract:
    """The contract, with the expected facts of `target`'s signature changed."""
    signatures = tuple(
        dataclasses.replace(s, **changes) if s.target == target else s for s in contract.signatures
    )
    assert signatures != contract.signatures, f"{target} is not in the contract"
    return dataclasses.replace(contract, signatures=signatures)


FORWARD_TILE = "trl.kernels.chunked_logprob:_forward_tile"


def test_a_changed_signature_fails_the_check_naming_both() -> None:
    (verified,) = [s for s in light_metrics.CONTRACT.signatures if s.target == FORWARD_TILE]
    assert verified.parameters is not None
    # TRL swapping two positional arguments of its kernel: the lever would pass each in
    # the other's place.
    swapped = list(verified.parameters)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    contract = with_signature(light_metrics.CONTRACT, FORWARD_TILE, parameters=tuple(swapped))
    reason = check(contract, "cpu")
    assert reason is not None
    assert reason == (
        f"{FORWARD_TILE}: parameter 4 is running_max, verified with sum_exp "
        "(21 parameters, verified with 21)"
    )


def test_a_lever_failing_its_check_is_turned_off_with_the_reason() -> None:
    contract = with_signature(light_metrics.CONTRACT, FORWARD_TILE, parameters=("tile", "targets"))
    lever = SimpleNamespace(SWITCH=light_metrics.SWITCH, CONTRACT=contract)
    forced = SpeedOptions(lightMetrics="on")
    failed = self_checks(forced, "cpu", levers=(lever,))
    assert list(failed) == ["lightMetrics"] and FORWARD_TILE in failed["lightMetrics"]

    on = choice(decide(forced, CPU, SEED_REFERENCE_JOB, QWEN_15B), "lightMetrics")
    assert on.on  # with its check passing, "on" turns it on
    plan = decide(forced, CPU, SEED_REFERENCE_JOB, QWEN_15B, failed=failed)
    off = choice(plan, "lightMetrics")
    assert not off.on and off.sft == {}
    assert off.reason == f"self-check failed, turned off: {failed['lightMetrics']}"
    assert not plan.on("lightMetrics") and "logging_nan_inf_filter" not in plan.sft_kwargs()
    status = plan.status(
        SimpleNamespace(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=8,
            activation_checkpointing=True,
        ),
        "sdpa",
    )
    (reported,) = [lever for lever in status["levers"] if lever["name"] == "lightMetrics"]
    assert reported == {"name": "lightMetrics", "on": False, "reason": off.reason}
    assert off.reason == (
        f"self-check failed, turned off: {FORWARD_TILE}: parameter 2 is tile_stride, verified "
        "with targets (21 parameters, verified with 2)"
    )


def test_a_missing_private_attribute_fails_the_check() -> None:
    contract = dataclasses.replace(
        light_metrics.CONTRACT,
        signatures=(Signature("trl.kernels.chunked_logprob:_forward_tile_v2"),),
    )
    reason = check(contract, "cpu")
    assert reason is not None and "_forward_tile_v2 is missing (AttributeError" in reason


def test_versions_outside_the_verified_range_turn_the_levers_off() -> None:
    libraries = {name for lever in LEVERS for name in lever.CONTRACT.versions}
    newer = {**installed_versions(libraries), "torch": "2.14.0"}
    failed = self_checks(SpeedOptions(), "cuda", installed=newer)
    relying_on_torch = {lever.SWITCH for lever in LEVERS if "torch" in lever.CONTRACT.versions}
    assert set(failed) == relying_on_torch and "compile" in failed
    assert failed["compile"] == (
        "torch 2.14.0 is outside the versions it was verified with (<2.14,>=2.11)"
    )
    plan = decide(SpeedOptions(), H100, SEED_REFERENCE_JOB, QWEN_15B, failed=failed)
    assert not plan.on("compile") and not plan.on("flexAttention")
    assert plan.model_updates == {}  # SDPA, as plain TRL runs: nothing unverified runs
    assert choice(plan, "compile").reason.startswith("self-check failed, turned off: torch 2.14")
    # The levers that rely on no torch internals still run where they are verified.
    assert plan.on("dataWorkers")
    without_trl = {**installed_versions(libraries), "trl": None}
    assert check(light_metrics.CONTRACT, "cpu", without_trl) == "trl is not installed"


def test_a_probe_that_differs_or_fails_fails_the_check() -> None:
    base = Contract(versions={"torch": SpecifierSet(">=2.11")})
    differs = dataclasses.replace(base, probe=lambda device: "d weight off by 3.1e-02")
    assert check(differs, "cpu") == "its probe differs from the plain path: d weight off by 3.1e-02"

    def broken(device: str) -> str | None:
        raise RuntimeError(f"no kernel for {device}")

    failed = check(dataclasses.replace(base, probe=broken), "cpu")
    assert failed == "its probe failed: RuntimeError: no kernel for cpu"
    assert check(dataclasses.replace(base, probe=lambda device: None), "cpu") is None


# --------------------------------------------------------------------------- exact preset


def test_the_exact_preset_keeps_only_the_levers_that_change_no_number() -> None:
    default = decide(SpeedOptions(), H100, SEED_REFERENCE_JOB, QWEN_15B)
    exact = decide(SpeedOptions(), H100, SEED_REFERENCE_JOB, QWEN_15B, preset="exact")
    assert exact.preset == "exact"
    on_by_default = {c.lever for c in default.choices if c.on}
    assert {"flexAttention", "compile", "lightMetrics", "bf16ResidualStream"} <= on_by_default
    assert {c.lever for c in exact.choices if c.on} == {"dataWorkers", "parallelSave"}
    for lever in LEVERS:
        made = choice(exact, lever.SWITCH)
        if not lever.EXACT:
            assert not made.on
            assert made.reason == f"preset exact: it changes numbers ({lever.NUMERICS})"
    # The weight copies are sized by the micro-batch estimate, which exact turns off.
    copies = choice(exact, "castWeightsOncePerStep")
    assert not copies.on and "no fitting micro-batch estimate" in copies.reason
    assert exact.model_updates == {}  # the model's own attention, SDPA
    assert exact.sft_kwargs(["activation_checkpointing"]) == {
        "dataloader_num_workers": 2,
        "dataloader_persistent_workers": True,
    }
    forced = SpeedOptions(castWeightsOncePerStep="on", rotaryTablesOnce="on")
    both = decide(forced, H100, SEED_REFERENCE_JOB, QWEN_15B, preset="exact")
    assert both.on("castWeightsOncePerStep") and both.on("rotaryTablesOnce")


def spec_with_speed(speed: dict[str, Any]) -> Any:
    from sftjob_operator.api import SpeedSpec

    return SimpleNamespace(training=SimpleNamespace(speed=SpeedSpec.model_validate(speed)))


def test_the_preset_comes_from_the_spec_and_the_environment() -> None:
    options, preset = speed_settings(spec_with_speed({"preset": "exact"}), env={})
    assert preset == "exact" and options == SpeedOptions()
    _, preset = speed_settings(spec_with_speed({}), env={"SFTJOB_SPEED": '{"preset": "exact"}'})
    assert preset == "exact"
    _, preset = speed_settings(
        spec_with_speed({"preset": "exact"}), env={"SFTJOB_SPEED": '{"preset": "default"}'}
    )
    assert preset == "default"


def test_the_exact_preset_refuses_a_lever_that_changes_numbers() -> None:
    from sftjob_operator.api import NOT_EXACT_LEVERS, SpeedSpec

    # In the spec, the API refuses it (a cross-field rule, also the CRD's CEL)...
    with pytest.raises(ValueError, match="speed.preset exact keeps only the levers"):
        SpeedSpec.model_validate({"preset": "exact", "compile": "on"})
    assert set(NOT_EXACT_LEVERS) == {lever.SWITCH for lever in LEVERS if not lever.EXACT}
    # ... and through $SFTJOB_SPEED on top of the spec, the trainer does.
    with pytest.raises(ConfigError) as refused:
        speed_settings(
            spec_with_speed({"preset": "exact"}), env={"SFTJOB_SPEED": '{"compile": "on"}'}
        )
    message = str(refused.value)
    assert "speed.preset exact keeps only the levers that change no number" in message
    assert "compile: on, but it changes numbers (inductor fuses" in message
    with pytest.raises(ConfigError, match="bf16ResidualStream: on"):
        speed_settings(
            spec_with_speed({"preset": "exact"}),
            env={"SFTJOB_SPEED": '{"bf16ResidualStream": true}'},
        )
    with pytest.raises(ConfigError, match="speed.preset must be one of"):
        speed_settings(spec_with_speed({}), env={"SFTJOB_SPEED": '{"preset": "fast"}'})


def test_the_planner_checks_the_levers_it_turns_on_and_only_those() -> None:
    asked: list[tuple[str, ...]] = []

    def compile_fails(levers: tuple[Any, ...]) -> dict[str, str]:
        asked.append(tuple(lever.SWITCH for lever in levers))
        return {"compile": "its probe differs"} if "compile" in asked[-1] else {}

    decide_on_h100 = functools.partial(decide, SpeedOptions(), H100, SEED_REFERENCE_JOB, QWEN_15B)
    plan = checked_plan(decide_on_h100, compile_fails)
    default = decide_on_h100()
    # Each checked once; the varlen kernel, which takes flex attention's place once the
    # model is not compiled, in a round of its own.
    assert asked == [tuple(c.lever for c in default.choices if c.on), ("varlenAttention",)]
    assert choice(plan, "compile").reason == "self-check failed, turned off: its probe differs"
    # What depended on it follows: the rotary tables are computed once without compiling,
    assert (
        not plan.on("rotaryTablesOnce")
        and "not compiled" in choice(plan, "rotaryTablesOnce").reason
    )
    # and, uncompiled, the varlen kernel attends: nothing padded, nothing compiled.
    assert plan.on("varlenAttention") and not plan.on("flexAttention")
    assert default.on("flexAttention") and not default.on("varlenAttention")
    assert plan.static_length is None and default.static_length == 4 * 2048

    # On CPU every "auto" lever is off: nothing to check, nothing probed at start.
    asked.clear()
    checked_plan(
        functools.partial(decide, SpeedOptions(), CPU, SEED_REFERENCE_JOB, QWEN_15B), compile_fails
    )
    assert asked == []
