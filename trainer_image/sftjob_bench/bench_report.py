"""Markdown tables from the bench's JSON lines, for docs/performance.md.

    python -m sftjob_bench.bench_report [--check] full.jsonl [lora.jsonl ...]

Per file: the isolation checks (if any), one row per side with its speed-up over the
reference side of the SAME file (the same process, card and data), and the losses of
both sides step by step with their relative difference. Figures are copied from the
JSON, never retyped, so the document matches what was measured.

--check also judges each file by issue 7's "Done when" (see `acceptance`), prints a
PASS/FAIL line per criterion, and exits 1 if any fails.
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
    if speed.get("lightMetrics", {}).get("on"):
        parts.append("light metrics")
    if speed.get("castWeightsOncePerStep", {}).get("on"):
        parts.append("weights cast once per step")
    if speed.get("bf16ResidualStream", {}).get("on"):
        parts.append("bf16 residual stream")
    if speed.get("fuseGradientAccumulation", {}).get("on"):
        parts.append("gradients accumulated in the matmul")
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


def report(lines: list[dict[str, Any]], title: str = "") -> str:
    sides = {line["side"]: line for line in lines if "side" in line}
    checks = [line for line in lines if line.get("check") == "packed_isolation"]
    out = [f"### {title}".rstrip()] if title else []
    if sides:
        first = next(iter(sides.values()))
        out.append(
            f"Card: {first['settings']['device']}; case {first['case']}; "
            f"{first['settings']['steps']} steps, {first['settings']['timed_steps']} timed."
        )
        out += ["", side_table(sides)]
    if "reference" in sides and "sftjob" in sides:
        reference, ours = sides["reference"], sides["sftjob"]
        every = int(reference.get("settings", {}).get("logging_steps") or 1)
        table, worst = loss_table(reference["losses"], ours["losses"], every)
        same_tokens = reference.get("tokens_total") == ours.get("tokens_total")
        out += [
            "",
            f"Largest relative loss difference: {worst:.1e}; tokens trained on: "
            f"{reference.get('tokens_total'):,} and {ours.get('tokens_total'):,}"
            + ("" if same_tokens else " (NOT the same: the sides did not see the same data)"),
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


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [Path(p) for p in args if p != "--check"]
    if not paths:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    failed = False
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
