"""Markdown tables from the bench's JSON lines, for docs/performance.md.

    python -m sftjob_bench.bench_report [--check] full.jsonl [lora.jsonl ...]

Per file: the isolation checks (if any), one row per side with its speed-up over the
reference side of the SAME file (the same process, card and data), and the losses of
both sides step by step with their relative difference. Figures are copied from the
JSON, never retyped, so the document matches what was measured.

--check also judges each file by issue 7's "Done when" (see `acceptance`), prints a
PASS/FAIL line per criterion, and exits 1 if any fails. `--check --goals 24` judges issue
24's goals over all the files given together instead (see `goals_24`): the end-to-end
reference job (`--case reference-job`), a warm start, and the steady-state full and LoRA
runs.

End-to-end lines (`"kind": "end_to_end"`, from `--case reference-job`) also get a table
of their whole-job figures: wall time, phases, tokens/s over the whole run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def describe(settings: dict[str, Any]) -> str:
    """The settings that differ between the sides, in a few words."""
    parts = [
        f"per_device {settings['per_device']}",
        f"accum {settings['accumulation']}",
        "checkpointing" if settings["gradient_checkpointing"] else "no checkpointing",
        str(settings["attn_implementation"]),
    ]
    if settings.get("torch_compile"):
        parts.append("torch.compile")
    if settings.get("use_liger_kernel"):
        parts.append("liger")
    speed = settings.get("speed") or {}
    if speed.get("varlenAttention", {}).get("on"):
        parts.append("varlen flash kernel")
    if speed.get("lightMetrics", {}).get("on"):
        parts.append("light metrics")
    if speed.get("castWeightsOncePerStep", {}).get("on"):
        parts.append("weights cast once per step")
    if speed.get("bf16ResidualStream", {}).get("on"):
        parts.append("bf16 residual stream")
    if speed.get("fuseGradientAccumulation", {}).get("on"):
        parts.append("gradients accumulated in the matmul")
    if speed.get("fp8Matmuls", {}).get("on"):
        parts.append("fp8 matmuls")
    if speed.get("rotaryTablesOnce", {}).get("on"):
        parts.append("rotary tables once per forward")
    if settings.get("extra_args"):
        parts.append(f"extraArgs {json.dumps(settings['extra_args'])}")
    return ", ".join(parts)


def _number(value: float | None, digits: int = 0, scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value * scale:,.{digits}f}{suffix}"


def side_table(sides: dict[str, dict[str, Any]]) -> str:
    reference = sides.get("reference", {}).get("tokens_per_s")
    rows = [
        "| side | settings | tokens/s | MFU | peak GiB | untimed s | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, side in sides.items():
        rate = side.get("tokens_per_s")
        speedup = f"{rate / reference:.2f}x" if rate and reference else "n/a"
        rows.append(
            f"| {name} | {describe(side['settings'])} | {_number(rate)} | "
            f"{_number(side.get('mfu'), 1, 100, '%')} | {_number(side.get('peak_mem_gib'), 1)} | "
            f"{_number(side.get('untimed_s'), 0)} | {speedup} |"
        )
    return "\n".join(rows)


def loss_table(reference: list[float], ours: list[float], every: int = 1) -> tuple[str, float]:
    """The logged losses (one every `every` steps) and the largest relative difference."""
    rows = ["| step | reference | sftjob | rel. diff |", "|---|---|---|---|"]
    worst = 0.0
    for index, (a, b) in enumerate(zip(reference, ours, strict=False), start=1):
        relative = abs(a - b) / abs(a) if a else abs(b)
        worst = max(worst, relative)
        rows.append(f"| {index * every} | {a:.4f} | {b:.4f} | {relative:.1e} |")
    return "\n".join(rows), worst


PHASES = ("startup_s", "model_load_s", "data_preparation_s", "first_step_s", "training_s", "save_s")


def whole_job(side: dict[str, Any]) -> tuple[float, float, str]:
    """Seconds from process start to the final model saved (issue 24's whole job), and the
    tokens/s over them; a capped side's extrapolated figures, marked.

    Not to process gone: after its model is saved a process only shuts down (the pod's
    worker leaves at once; a script's interpreter may take seconds), and the `exit` column
    shows that apart. A capped side's extra steps come before its save, so its save moves
    by the extrapolated seconds. Lines without `saved_at_s` count to process gone.
    """
    extrapolated = side.get("extrapolated") or {}
    note = " (extrapolated)" if extrapolated else ""
    wall = extrapolated["wall_s"] if extrapolated else side["wall_s"]
    tokens = extrapolated["tokens_total"] if extrapolated else side["tokens_total"]
    saved = wall - (seconds_after_save(side) or 0.0)
    return saved, tokens / saved, note


def end_to_end_table(sides: dict[str, dict[str, Any]]) -> str:
    """Whole-job figures per side: each side its own process, start to model saved."""
    reference = sides.get("reference")
    rows = [
        "| side | start to model saved s | startup | model load | data prep | first step "
        "| training | save | exit | model loaded to 1st step | tokens/s whole job "
        "| speed-up whole job |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, side in sides.items():
        saved, rate, note = whole_job(side)
        speedup = "n/a"
        if reference is not None:
            speedup = f"{whole_job(reference)[0] / saved:.2f}x"
        phases = " | ".join(f"{side['phases'][key]:.1f}" for key in PHASES)
        phases += f" | {exit_seconds(side)}"
        rows.append(
            f"| {name} | {saved:.1f}{note} | {phases} | {side['model_loaded_to_first_step_s']:.1f} "
            f"| {rate:,.0f}{note} | {speedup} |"
        )
    return "\n".join(rows)


def seconds_after_save(side: dict[str, Any]) -> float | None:
    """Model saved to process gone (interpreter shutdown; the sftjob side leaves at once,
    as the pod's worker does), from the line's two marks: lines older than `exit_s` have
    them too. None for lines without `saved_at_s`."""
    if "saved_at_s" not in side:
        return None
    return float(side["wall_s"] - side["saved_at_s"])


def exit_seconds(side: dict[str, Any]) -> str:
    """The exit column: seconds_after_save, or "-" where the line cannot say."""
    after = seconds_after_save(side)
    return "-" if after is None else f"{after:.1f}"


def preparation_lines(sides: dict[str, dict[str, Any]]) -> list[str]:
    """Each side's data preparation by step (e2e.py's `preparation`), largest first, with
    the levers' self-checks and applies of the sftjob side."""
    out = []
    for name, side in sides.items():
        steps = side.get("preparation")
        if not steps:
            continue
        parts = [f"{step} {value:.2f}" for step, value in sorted(steps.items(), key=by_value)]
        out.append(f"- {name} ({side['phases']['data_preparation_s']:.2f} s): {', '.join(parts)}")
        for kind, levers in sorted((side.get("preparation_levers") or {}).items()):
            each = [f"{lever} {value:.2f}" for lever, value in sorted(levers.items(), key=by_value)]
            out.append(f"  - {kind}: {', '.join(each)}")
    return out


def by_value(item: tuple[str, float]) -> tuple[float, str]:
    return -item[1], item[0]


def report(lines: list[dict[str, Any]], title: str = "") -> str:
    sides = {line["side"]: line for line in lines if "side" in line}
    checks = [line for line in lines if line.get("check") == "packed_isolation"]
    out = [f"### {title}".rstrip()] if title else []
    named = [line["side"] for line in lines if "side" in line]
    repeated = sorted({side for side in named if named.count(side) > 1})
    if repeated:  # a pair is one line per side: the last of each is the one reported
        out.append(
            f"Note: {', '.join(repeated)} appears more than once; only its last line is "
            "reported (give each run its own file to see them all)."
        )
    if sides:
        first = next(iter(sides.values()))
        out.append(
            f"Card: {first['settings']['device']}; case {first['case']}; "
            f"{first['settings']['steps']} steps, {first['settings']['timed_steps']} timed."
        )
        out += ["", side_table(sides)]
        if all(side.get("kind") == "end_to_end" for side in sides.values()):
            out += ["", "End to end (each side its own process):", "", end_to_end_table(sides)]
            preparation = preparation_lines(sides)
            if preparation:
                out += ["", "Data preparation by step (seconds, each step's own):", *preparation]
    if "reference" in sides and "sftjob" in sides:
        reference, ours = sides["reference"], sides["sftjob"]
        every = int(reference.get("settings", {}).get("logging_steps") or 1)
        table, worst = loss_table(reference["losses"], ours["losses"], every)
        same_tokens = reference.get("tokens_total") == ours.get("tokens_total")
        capped = any(side.get("extrapolated") for side in (reference, ours))
        out += [
            "",
            f"Largest relative loss difference: {worst:.1e}; tokens trained on: "
            f"{reference.get('tokens_total'):,} and {ours.get('tokens_total'):,}"
            + (
                ""
                if same_tokens
                else " (a capped side: its whole job is extrapolated)"
                if capped
                else " (NOT the same: the sides did not see the same data)"
            ),
            "",
            table,
        ]
    if checks:
        out += [
            "",
            "| attention | max abs diff packed vs alone | diff if unmasked |",
            "|---|---|---|",
        ]
        out += [
            f"| {c['attn_implementation']} | {c['max_abs_diff']:.1e} | "
            f"{c['leak_if_unmasked']:.2f} |"
            for c in checks
        ]
    return "\n".join(out) + "\n"


# Issue 7's bar: speed-up of our defaults over the reference, per case, on one H100.
SPEEDUP_REQUIRED = {"full": 3.5, "lora": 3.0}
# "The same data order and seed give the same curve to about 1%".
LOSS_AGREEMENT = 0.01
# Packed rows against each sequence alone, fp32: rounding, far from the unmasked leak.
ISOLATION_MAX = 1e-4
REQUIRED_CARD = "H100"


def acceptance(lines: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """Issue 7's "Done when", judged on one bench file: (criterion, passed, detail) each."""
    sides = {line["side"]: line for line in lines if "side" in line}
    if "reference" not in sides or "sftjob" not in sides:
        return [("both sides in the same run", False, f"sides found: {sorted(sides)}")]
    reference, ours = sides["reference"], sides["sftjob"]
    case = str(ours["case"])
    card = str(ours["settings"]["device"])
    results = [
        (f"card is an {REQUIRED_CARD}", REQUIRED_CARD in card, card),
        (
            "same data on both sides",
            reference.get("tokens_total") == ours.get("tokens_total")
            and reference["settings"].get("data_sha") == ours["settings"].get("data_sha"),
            f"{reference.get('tokens_total')} and {ours.get('tokens_total')} tokens",
        ),
    ]
    required = SPEEDUP_REQUIRED.get(case)
    if required is not None:
        rate, base = ours.get("tokens_per_s"), reference.get("tokens_per_s")
        speedup = rate / base if rate and base else 0.0
        results.append(
            (f"speed-up at least {required}x ({case})", speedup >= required, f"{speedup:.2f}x")
        )
    _, worst = loss_table(reference["losses"], ours["losses"])
    results.append(
        (
            f"losses agree within {LOSS_AGREEMENT:.0%}",
            bool(reference["losses"])
            and len(reference["losses"]) == len(ours["losses"])
            and worst <= LOSS_AGREEMENT,
            f"largest relative difference {worst:.1e} over {len(ours['losses'])} logs",
        )
    )
    checks = [line for line in lines if line.get("check") == "packed_isolation"]
    if case == "full":  # the issue asks for isolation in the full case's run
        worst_leak = max((c["max_abs_diff"] for c in checks), default=float("inf"))
        results.append(
            (
                "packed sequences isolated (each attention)",
                bool(checks) and worst_leak <= ISOLATION_MAX,
                f"{len(checks)} checks, largest difference {worst_leak:.1e}",
            )
        )
    return results


# Issue 24's goals (same run, same card; ratios).
END_TO_END_REQUIRED = 3.0  # the reference job, whole job, against the seed's snippet
STEADY_REQUIRED_24 = {"full": 4.5, "lora": 6.0}
WARM_START_MAX_S = 20.0  # model loaded to the first optimizer step, compile cache warm


def _sides(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["side"]: line for line in lines if "side" in line}


# A capped reference's extrapolated tokens against the other side's (whole packed rows).
EXTRAPOLATED_TOKENS_AGREEMENT = 0.02


def _same_data(reference: dict[str, Any], ours: dict[str, Any]) -> tuple[bool, str]:
    """The same tokens trained on; for a capped reference, the same packed rows and its
    extrapolated tokens within 2% of the other side's."""
    if not reference.get("extrapolated"):
        same = reference.get("tokens_total") == ours.get("tokens_total")
        return same, f"{reference.get('tokens_total')} and {ours.get('tokens_total')} tokens"
    rows = (reference["settings"].get("packed_rows"), ours["settings"].get("packed_rows"))
    tokens = reference["extrapolated"]["tokens_total"]
    off = abs(tokens - ours["tokens_total"]) / ours["tokens_total"]
    return rows[0] == rows[1] and off <= EXTRAPOLATED_TOKENS_AGREEMENT, (
        f"packed rows {rows[0]} and {rows[1]}; extrapolated {tokens} against "
        f"{ours['tokens_total']} tokens"
    )


def _pair_checks(name: str, reference: dict[str, Any], ours: dict[str, Any]) -> list:
    """Same card, same data and the losses within 1% at every log, for one pair (a capped
    reference: at every log it made)."""
    capped = bool(reference.get("extrapolated"))
    theirs = ours["losses"][: len(reference["losses"])] if capped else ours["losses"]
    _, worst = loss_table(reference["losses"], theirs)
    cards = (reference["settings"]["device"], ours["settings"]["device"])
    same, detail = _same_data(reference, ours)
    return [
        (f"{name}: same card on both sides", cards[0] == cards[1], " and ".join(cards)),
        (f"{name}: same data on both sides", same, detail),
        (
            f"{name}: losses agree within {LOSS_AGREEMENT:.0%} at every log",
            bool(reference["losses"])
            and len(reference["losses"]) == len(theirs)
            and worst <= LOSS_AGREEMENT,
            f"largest relative difference {worst:.1e} over {len(theirs)} logs"
            + (" (the capped reference's)" if capped else ""),
        ),
    ]


def goals_24(files: dict[str, list[dict[str, Any]]]) -> list[tuple[str, bool, str]]:
    """Issue 24's goals, judged over all the files of a measurement together.

    A goal no file measures fails ("not measured"): a check passes only on evidence.
    A capped reference side is judged by its extrapolated whole job, and says so.
    """
    results: list[tuple[str, bool, str]] = []
    end_to_end = steady_seen = 0
    warm: list[tuple[str, float]] = []
    for name, lines in files.items():
        sides = _sides(lines)
        ours = sides.get("sftjob")
        warm_run = (ours or {}).get("compile_cache") or {}
        if ours is not None and ours.get("kind") == "end_to_end" and warm_run.get("warm"):
            warm.append((name, float(ours["model_loaded_to_first_step_s"])))
        if "reference" not in sides or ours is None:
            continue
        reference = sides["reference"]
        results += _pair_checks(name, reference, ours)
        if ours.get("kind") == "end_to_end":
            end_to_end += 1
            (base, _, note), (saved, _, _) = whole_job(reference), whole_job(ours)
            speedup = base / saved
            results.append(
                (
                    f"{name}: whole job at least {END_TO_END_REQUIRED}x the snippet",
                    speedup >= END_TO_END_REQUIRED,
                    f"{speedup:.2f}x ({base:.1f} s{note} against {saved:.1f} s, start to "
                    "model saved)",
                )
            )
            continue
        required = STEADY_REQUIRED_24.get(str(ours["case"]))
        if required is not None:
            steady_seen += 1
            rate, base_rate = ours.get("tokens_per_s"), reference.get("tokens_per_s")
            speedup = rate / base_rate if rate and base_rate else 0.0
            results.append(
                (
                    f"{name}: steady state at least {required}x ({ours['case']})",
                    speedup >= required,
                    f"{speedup:.2f}x",
                )
            )
    if not end_to_end:
        results.append(("end to end: the reference job measured", False, "not measured"))
    if not steady_seen:
        results.append(("steady state: full or LoRA measured", False, "not measured"))
    if warm:
        worst_name, worst = max(warm, key=lambda item: item[1])
        results.append(
            (
                f"warm start: model loaded to first step within {WARM_START_MAX_S:.0f} s",
                worst <= WARM_START_MAX_S,
                f"{worst:.1f} s ({worst_name}; {len(warm)} warm runs)",
            )
        )
    else:
        results.append(("warm start measured (compile cache warm)", False, "not measured"))
    return results


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    goals = None
    if "--goals" in args:
        at = args.index("--goals")
        goals = args[at + 1] if at + 1 < len(args) else ""
        del args[at : at + 2]
        if goals != "24":
            print("--goals: only 24 is known", file=sys.stderr)
            return 2
    paths = [Path(p) for p in args if p != "--check"]
    if not paths:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    failed = False
    if goals == "24":
        files = {path.stem: read_lines(path) for path in paths}
        for name, lines in files.items():
            print(report(lines, title=name))
        if check:
            for criterion, passed, detail in goals_24(files):
                failed = failed or not passed
                print(f"{'PASS' if passed else 'FAIL'} {criterion} ({detail})")
        return 1 if failed else 0
    for path in paths:
        lines = read_lines(path)
        print(report(lines, title=path.stem))
        if check:
            for criterion, passed, detail in acceptance(lines):
                failed = failed or not passed
                print(f"{'PASS' if passed else 'FAIL'} {path.stem}: {criterion} ({detail})")
            print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
