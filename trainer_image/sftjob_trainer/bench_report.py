"""Markdown tables from the bench's JSON lines, for docs/performance.md.

    python -m sftjob_trainer.bench_report full.jsonl [lora.jsonl ...]

Per file: the isolation checks (if any), one row per side with its speed-up over the
reference side of the SAME file (the same process, card and data), and the losses of
both sides step by step with their relative difference. Figures are copied from the
JSON, never retyped, so the document matches what was measured.
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


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for path in paths:
        print(report(read_lines(path), title=path.stem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
