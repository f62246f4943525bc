"""Pure terminal views of SFTJobs for `sftjob get`, `sftjob status` and `sftjob watch`.

Everything here takes jobs and Events as the API returns them (plain dicts, camelCase)
and the time to measure ages against, and returns text: no API call, no clock, no
terminal. kube.JobReader reads; cli.py wires the two.

The columns show what `kubectl get sft` shows, with the same texts (the operator writes
them: `status.progress.summary` as `12/200 (6%)`, `lossDisplay` to 4 significant digits)
plus the plan; the ETA only while the job is Running, whatever the status holds.

`python -m sftjob_operator.job_view --render-screenshot TXT PNG` draws a captured
`sftjob status` as a PNG (monospace text with matplotlib), as in docs/screenshots/.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Job = Mapping[str, Any]
JobKey = tuple[str, str]  # (namespace, name)

RUNNING = "Running"
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
NO_VALUE = "-"
# `sftjob status` shows this many of the job's Events, the newest last (as kubectl describe).
EVENTS_SHOWN = 10
CHART_WIDTH, CHART_HEIGHT = 72, 18
PLOTEXT_MISSING = "the loss curve needs plotext: pip install 'sftjob[cli]' (or plotext==6.1.0)"

GET_COLUMNS = (
    "NAME",
    "PHASE",
    "PROGRESS",
    "LOSS",
    "ETA",
    "BATCH",
    "STEPS",
    "METHOD",
    "GPUS",
    "AGE",
)
# -o wide adds these after the columns above.
WIDE_COLUMNS = ("EPOCH", "EVAL LOSS", "TOKENS/S", "NODES", "ATTEMPTS", "RESTARTS", "MODEL")
# What the plan section compares, planned (from the spec) against measured (the trainer's).
PLAN_FIELDS = (
    "datasetSize",
    "worldSize",
    "effectiveBatchSize",
    "perDeviceTrainBatchSize",
    "gradientAccumulationSteps",
    "stepsPerEpoch",
    "totalSteps",
    "epochs",
    "warmupSteps",
)


# ----------------------------------------------------------------------------- time


def parse_time(text: str | None) -> datetime.datetime | None:
    """An RFC 3339 timestamp of the API (`2026-01-02T03:04:05Z`, or with a fraction)."""
    if not text:
        return None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def human_duration(seconds: float) -> str:
    """apimachinery's HumanDuration, what kubectl shows as AGE (`90s`, `5m3s`, `3h`, `2d4h`)."""
    s = int(max(seconds, 0))
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if s < 120:
        return f"{s}s"
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 192:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 730:
        return f"{days}d"
    return f"{days // 365}y{days % 365}d"


def age(timestamp: str | None, now: datetime.datetime) -> str:
    when = parse_time(timestamp)
    return "<unknown>" if when is None else human_duration((now - when).total_seconds())


# ----------------------------------------------------------------------------- one job


def _status(job: Job) -> Mapping[str, Any]:
    return job.get("status") or {}


def _progress(job: Job) -> Mapping[str, Any]:
    return _status(job).get("progress") or {}


def _spec(job: Job) -> Mapping[str, Any]:
    return job.get("spec") or {}


def phase(job: Job) -> str:
    """The job's phase; `Pending` before the operator has written one (as the demo shows)."""
    return str(_status(job).get("phase") or "Pending")


def is_finished(job: Job) -> bool:
    return phase(job) in FINISHED_PHASES


def job_key(job: Job) -> JobKey:
    metadata = job.get("metadata") or {}
    return (str(metadata.get("namespace") or ""), str(metadata.get("name") or ""))


def _text(value: Any) -> str:
    return NO_VALUE if value is None or value == "" else str(value)


def _number(value: Any) -> str:
    """A float to 4 significant digits (as the operator rounds loss), an int as is."""
    if value is None:
        return NO_VALUE
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _plan_value(job: Job, field: str) -> Any:
    """A plan figure, the trainer's measured one where it reported it."""
    status = _status(job)
    for plan in (status.get("measuredPlan") or {}, status.get("plan") or {}):
        if plan.get(field) is not None:
            return plan[field]
    return None


def total_steps(job: Job) -> Any:
    return _progress(job).get("totalSteps") or _plan_value(job, "totalSteps")


def gpus(job: Job) -> int:
    resources = _spec(job).get("resources") or {}
    return int(resources.get("nodes") or 1) * int(resources.get("gpusPerNode") or 0)


def progress_text(job: Job) -> str:
    """`12/200 (6%)` as the operator words it; `0/200` before the first report."""
    progress = _progress(job)
    if progress.get("summary"):
        return str(progress["summary"])
    steps = total_steps(job)
    return f"0/{steps}" if steps and phase(job) not in FINISHED_PHASES else NO_VALUE


def loss_text(job: Job) -> str:
    progress = _progress(job)
    if progress.get("lossDisplay"):
        return str(progress["lossDisplay"])
    return _number(progress.get("loss"))


def eta_text(job: Job) -> str:
    """The ETA only while the job runs: a suspended, failed or finished job has none."""
    return _text(_progress(job).get("eta")) if phase(job) == RUNNING else NO_VALUE


def job_row(job: Job, now: datetime.datetime, *, wide: bool = False) -> list[str]:
    """One line of `sftjob get`, in GET_COLUMNS order (then WIDE_COLUMNS with `wide`)."""
    spec, status, progress = _spec(job), _status(job), _progress(job)
    metadata = job.get("metadata") or {}
    row = [
        _text(metadata.get("name")),
        phase(job),
        progress_text(job),
        loss_text(job),
        eta_text(job),
        _text(_plan_value(job, "effectiveBatchSize")),
        _text(total_steps(job)),
        _text(spec.get("method") or "lora"),
        str(gpus(job)),
        age(metadata.get("creationTimestamp"), now),
    ]
    if wide:
        epoch = progress.get("epoch")
        row += [
            NO_VALUE if epoch is None else f"{float(epoch):.2f}",
            _number(progress.get("evalLoss")),
            NO_VALUE
            if progress.get("tokensPerSecond") is None
            else f"{float(progress['tokensPerSecond']):.0f}",
            _text((spec.get("resources") or {}).get("nodes") or 1),
            _text(status.get("attempts")),
            _text(status.get("restarts") or 0),
            _text((spec.get("model") or {}).get("name") or (spec.get("model") or {}).get("path")),
        ]
    return row


# ----------------------------------------------------------------------------- tables


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell, three spaces apart, as kubectl prints them."""
    lines = [list(header), *(list(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def sort_jobs(jobs: Iterable[Job]) -> list[Job]:
    return sorted(jobs, key=job_key)


def jobs_table(
    jobs: Iterable[Job], now: datetime.datetime, *, all_namespaces: bool, wide: bool = False
) -> str:
    """The `sftjob get` table: NAMESPACE first with -A, as kubectl does."""
    header = list(GET_COLUMNS) + (list(WIDE_COLUMNS) if wide else [])
    rows = []
    for job in sort_jobs(jobs):
        row = job_row(job, now, wide=wide)
        rows.append([job_key(job)[0], *row] if all_namespaces else row)
    return format_table(["NAMESPACE", *header] if all_namespaces else header, rows)


def no_jobs_text(namespace: str | None) -> str:
    """kubectl's wording when nothing is found."""
    if namespace is None:
        return "No resources found"
    return f"No resources found in {namespace} namespace."


def not_found_text(name: str, namespace: str) -> str:
    return (
        f'error: sftjob "{name}" not found in namespace "{namespace}" '
        "(list every job with `sftjob get -A`)"
    )


# ----------------------------------------------------------------------------- watch


@dataclass(frozen=True)
class WatchEvent:
    """One event of a watch: ADDED, MODIFIED, DELETED or BOOKMARK, and its object."""

    type: str
    object: Mapping[str, Any]


def apply_watch_event(jobs: Mapping[JobKey, Job], event: WatchEvent) -> dict[JobKey, Job]:
    """The jobs after one watch event (a BOOKMARK changes none)."""
    updated = dict(jobs)
    if event.type in ("ADDED", "MODIFIED"):
        updated[job_key(event.object)] = event.object
    elif event.type == "DELETED":
        updated.pop(job_key(event.object), None)
    return updated


def resource_version(obj: Mapping[str, Any]) -> str | None:
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return str(version) if version else None


def all_finished(jobs: Iterable[Job]) -> bool:
    """Every job has Succeeded or Failed (and there is at least one)."""
    listed = list(jobs)
    return bool(listed) and all(is_finished(job) for job in listed)


# ----------------------------------------------------------------------------- status


def _section(title: str, body: str) -> str:
    return f"{title}:\n{body}"


def _indent(text: str, spaces: int = 2) -> str:
    return "\n".join((" " * spaces + line) if line else line for line in text.splitlines())


def conditions_table(job: Job, now: datetime.datetime) -> str:
    conditions = _status(job).get("conditions") or []
    if not conditions:
        return "  none yet"
    rows = [
        [
            str(c.get("type") or ""),
            str(c.get("status") or ""),
            _text(c.get("reason")),
            age(c.get("lastTransitionTime"), now) if c.get("lastTransitionTime") else NO_VALUE,
            str(c.get("message") or ""),
        ]
        for c in conditions
    ]
    return _indent(format_table(["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], rows))


def plan_table(job: Job) -> str:
    """The plan derived from the spec beside the one the trainer measured."""
    status = _status(job)
    planned, measured = status.get("plan") or {}, status.get("measuredPlan") or {}
    if not planned and not measured:
        if is_finished(job):
            return "  none: the job ended before it was planned (see Conditions)"
        return "  none yet: the operator has not planned this job"
    rows = [
        [field, _number(planned.get(field)), _number(measured.get(field)) if measured else ""]
        for field in PLAN_FIELDS
        if planned.get(field) is not None or measured.get(field) is not None
    ]
    header = ["", "PLANNED", "MEASURED" if measured else "MEASURED (not reported yet)"]
    lines = [format_table(header, rows)]
    if planned.get("estimate"):
        lines.append("planned figures are an estimate")
    lines += [f"note: {note}" for note in planned.get("notes") or []]
    return _indent("\n".join(lines))


def effective_text(job: Job) -> str:
    """What the job runs beyond its own spec: its profile's additions, the current batch."""
    status = _status(job)
    effective = status.get("effective") or {}
    lines: list[str] = []
    if effective.get("profile"):
        generation = effective.get("profileGeneration")
        lines.append(
            f"profile {effective['profile']}"
            + (f" (generation {generation})" if generation is not None else "")
        )
        added = effective.get("fromProfile") or []
        lines += [f"  {item['field']} = {item['value']}" for item in added]
        if not added:
            lines.append("  the profile added nothing")
    else:
        lines.append("no profile recorded: the job's own spec")
    training = status.get("effectiveTraining") or {}
    if training:
        lines.append(
            f"micro-batch {training.get('perDeviceTrainBatchSize')} x accumulation "
            f"{training.get('gradientAccumulationSteps')} (this attempt)"
        )
    return _indent("\n".join(lines))


def event_time(event: Mapping[str, Any]) -> str | None:
    """When an Event last happened: core/v1's lastTimestamp, else events.k8s.io's eventTime."""
    metadata = event.get("metadata") or {}
    series = event.get("series") or {}
    return (
        event.get("lastTimestamp")
        or series.get("lastObservedTime")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or metadata.get("creationTimestamp")
    )


def _about_job(event: Mapping[str, Any], name: Any, uid: Any) -> bool:
    """An Event about this SFTJob: its name, and its uid where both name one (a job deleted
    and created again under the same name keeps the earlier one's Events for a while)."""
    subject = event.get("involvedObject") or {}
    if subject.get("kind") != "SFTJob" or subject.get("name") != name:
        return False
    return not uid or not subject.get("uid") or subject.get("uid") == uid


EARLIEST = datetime.datetime.min.replace(tzinfo=datetime.UTC)


def job_events(job: Job, events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The Events about this job, oldest first."""
    metadata = job.get("metadata") or {}
    mine = [e for e in events if _about_job(e, metadata.get("name"), metadata.get("uid"))]
    return sorted(mine, key=lambda e: parse_time(event_time(e)) or EARLIEST)


def events_table(job: Job, events: Iterable[Mapping[str, Any]], now: datetime.datetime) -> str:
    shown = job_events(job, events)[-EVENTS_SHOWN:]
    if not shown:
        return "  none"
    rows = [
        [
            age(event_time(e), now),
            _text(e.get("type")),
            _text(e.get("reason")),
            " ".join(str(e.get("message") or "").split()),
        ]
        for e in shown
    ]
    return _indent(format_table(["AGE", "TYPE", "REASON", "MESSAGE"], rows))


def _nodes_text(job: Job) -> str:
    nodes = int((_spec(job).get("resources") or {}).get("nodes") or 1)
    return f"{nodes} node{'' if nodes == 1 else 's'}"


def summary_text(job: Job, now: datetime.datetime) -> str:
    metadata, status, progress = job.get("metadata") or {}, _status(job), _progress(job)
    spec = _spec(job)
    model = spec.get("model") or {}
    fields = [
        ("Name", _text(metadata.get("name"))),
        ("Namespace", _text(metadata.get("namespace"))),
        ("Phase", phase(job)),
        ("Age", age(metadata.get("creationTimestamp"), now)),
        (
            "Method",
            f"{spec.get('method') or 'lora'} of {_text(model.get('name') or model.get('path'))}",
        ),
        ("GPUs", f"{gpus(job)} on {_nodes_text(job)}"),
        ("Progress", progress_text(job)),
        ("Epoch", NO_VALUE if progress.get("epoch") is None else f"{float(progress['epoch']):.2f}"),
        ("Loss", loss_text(job)),
        ("Eval loss", _number(progress.get("evalLoss"))),
        (
            "Tokens/s",
            NO_VALUE
            if progress.get("tokensPerSecond") is None
            else f"{float(progress['tokensPerSecond']):.0f}",
        ),
        ("ETA", eta_text(job)),
        ("Attempts", f"{status.get('attempts') or 0} (restarts {status.get('restarts') or 0})"),
    ]
    if status.get("outputPath"):
        fields.append(("Output", str(status["outputPath"])))
    failure = status.get("lastFailure") or {}
    if failure:
        fields.append(
            ("Last failure", f"{failure.get('reason')}: {failure.get('message') or ''}".strip())
        )
    width = max(len(label) for label, _ in fields) + 2
    return "\n".join(f"{label + ':':<{width}}{value}" for label, value in fields)


# ----------------------------------------------------------------------------- the chart


@dataclass(frozen=True)
class Curve:
    label: str
    steps: list[int]
    values: list[float]


def loss_curves(job: Job) -> list[Curve]:
    """Loss, and eval loss where there is one, over the step, from status.progress.history."""
    history = _progress(job).get("history") or []
    curves = []
    for field, label in (("loss", "loss"), ("evalLoss", "eval loss")):
        points = [
            (int(p["step"]), float(p[field]))
            for p in history
            if p.get(field) is not None and p.get("step") is not None
        ]
        if points:
            curves.append(Curve(label, [s for s, _ in points], [v for _, v in points]))
    return curves


def no_history_text(job: Job) -> str:
    return (
        f"no loss history yet: the trainer has reported no logged step ({phase(job)}); "
        "the curve appears after the first logging step"
    )


def step_ticks(curves: Sequence[Curve], count: int = 6) -> list[int]:
    """Whole steps for the x axis (plotext's own ticks are fractions: 33.7)."""
    steps = [s for curve in curves for s in curve.steps]
    if not steps:
        return []
    low, high = min(steps), max(steps)
    if high - low < count:
        return list(range(low, high + 1))
    return sorted({round(low + (high - low) * i / (count - 1)) for i in range(count)})


def loss_chart(
    curves: Sequence[Curve],
    *,
    width: int = CHART_WIDTH,
    height: int = CHART_HEIGHT,
    color: bool = False,
) -> str:
    """The curves drawn in the terminal by plotext (imported here: the `cli` extra).

    Raises ImportError with PLOTEXT_MISSING when plotext is not installed.
    """
    try:
        import plotext
    except ImportError as exc:
        raise ImportError(PLOTEXT_MISSING) from exc

    figure = plotext.figure
    figure.clear()  # plotext draws on one module-level figure: start from a blank one
    for curve in curves:
        # The training loss as a line; eval loss as its few points, which a line of dots
        # would blur into the loss line where the two meet.
        line = curve.label == "loss"
        signal = figure.signal(curve.steps, curve.values, marker="braille" if line else "dot")
        signal.label(curve.label)
        if line and len(curve.steps) > 1:
            signal.lines()
        figure.draw(signal)
    figure.plot_size(width, height)
    figure.theme("clear")
    figure.title("loss")
    figure.label("step")
    figure.ruler("x").ticks(step_ticks(curves))
    # Loss falls from the top left: the legend goes top right, out of the curve's way.
    figure.legend(x=width - 8, y=0, ha="right")
    text = str(figure.build())
    figure.clear()
    return text if color else str(plotext.uncolorize(text))


def status_text(
    job: Job,
    events: Iterable[Mapping[str, Any]],
    now: datetime.datetime,
    *,
    chart: str | None,
) -> str:
    """The whole `sftjob status` report; `chart` is loss_chart's text, None without history."""
    curve = chart if chart is not None else "  " + no_history_text(job)
    return "\n\n".join(
        [
            summary_text(job, now),
            _section("Conditions", conditions_table(job, now)),
            _section("Plan", plan_table(job)),
            _section("Effective spec", effective_text(job)),
            _section("Loss curve", curve),
            _section(f"Events (last {EVENTS_SHOWN}, newest last)", events_table(job, events, now)),
        ]
    )


# ----------------------------------------------------------------------------- -o json|yaml


def as_list(jobs: Iterable[Job]) -> dict[str, Any]:
    """Several jobs as kubectl prints them with -o json: a v1 List."""
    return {"apiVersion": "v1", "kind": "List", "items": list(sort_jobs(jobs)), "metadata": {}}


def dump(obj: Any, output: str) -> str:
    if output == "json":
        return json.dumps(obj, indent=2)
    import yaml

    return str(yaml.safe_dump(obj, sort_keys=False))


# ----------------------------------------------------------------------------- screenshot

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
BRAILLE_BLANK = 0x2800
# The dot of each bit of a braille cell (Unicode's order): (column 0-1, row 0-3).
BRAILLE_DOTS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (0, 3), (1, 3))


def braille_dots(char: str) -> list[tuple[int, int]]:
    """The raised dots of a braille character (plotext's curve), none for other characters."""
    bits = ord(char) - BRAILLE_BLANK
    if not 0 <= bits <= 0xFF:
        return []
    return [dot for bit, dot in enumerate(BRAILLE_DOTS) if bits >> bit & 1]


def render_screenshot(text: str, png_path: str) -> None:
    """A PNG of terminal text: monospace on a dark background (matplotlib, the cli extra).

    Each line is placed on its own grid row, and braille cells (the curve) are drawn as
    their dots: DejaVu Sans Mono has no braille, and a fallback font's glyphs are narrower
    than a column, which would bend the chart.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ANSI_ESCAPE.sub("", text).rstrip("\n").splitlines()
    columns = max((len(line) for line in lines), default=1)
    size, margin = 10.0, 14.0  # points
    column, row = size * 0.6021, size * 1.2  # DejaVu Sans Mono's advance; a terminal's line
    width, height = columns * column + 2 * margin, len(lines) * row + 2 * margin
    figure = plt.figure(figsize=(width / 72, height / 72), dpi=144)
    figure.patch.set_facecolor("#1e1e1e")
    ink = "#e8e8e8"
    dots_x: list[float] = []
    dots_y: list[float] = []
    for index, line in enumerate(lines):
        top = height - margin - index * row
        plain = "".join(" " if braille_dots(c) else c for c in line)
        figure.text(
            margin / width,
            (top - 0.8 * row) / height,
            plain,
            family="DejaVu Sans Mono",
            fontsize=size,
            color=ink,
            va="baseline",
            ha="left",
        )
        for position, char in enumerate(line):
            for dot_column, dot_row in braille_dots(char):
                dots_x.append((margin + (position + 0.3 + 0.4 * dot_column) * column) / width)
                dots_y.append((top - (0.125 + 0.25 * dot_row) * row) / height)
    canvas = figure.add_axes((0.0, 0.0, 1.0, 1.0))  # figure fractions as data coordinates
    canvas.set_axis_off()
    canvas.set_xlim(0, 1)
    canvas.set_ylim(0, 1)
    canvas.scatter(dots_x, dots_y, s=2.5, color=ink, marker="s", linewidths=0)
    figure.savefig(png_path, facecolor=figure.get_facecolor())
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sftjob_operator.job_view")
    parser.add_argument(
        "--render-screenshot",
        nargs=2,
        metavar=("TEXT", "PNG"),
        required=True,
        help="draw a captured terminal text file as a PNG",
    )
    args = parser.parse_args(argv)
    text_path, png_path = args.render_screenshot
    with open(text_path, encoding="utf-8") as source:
        render_screenshot(source.read(), png_path)
    print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
