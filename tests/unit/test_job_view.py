"""The pure terminal views of `sftjob get`, `sftjob status` and `sftjob watch` (job_view)."""

from __future__ import annotations

import datetime
import re
from typing import Any

import pytest
from sftjob_operator import job_view
from sftjob_operator.job_view import WatchEvent

NOW = datetime.datetime(2026, 1, 1, 1, 0, 0, tzinfo=datetime.UTC)


def job(
    name: str = "run",
    namespace: str = "team-a",
    *,
    phase: str | None = "Running",
    progress: dict[str, Any] | None = None,
    **status: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "tuning.sftjob.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "creationTimestamp": "2026-01-01T00:30:00Z",
            "resourceVersion": "7",
        },
        "spec": {
            "method": "qlora",
            "model": {"name": "Qwen/Qwen2.5-0.5B"},
            "resources": {"nodes": 2, "gpusPerNode": 4},
        },
        "status": {
            "plan": {"effectiveBatchSize": 64, "totalSteps": 200, "worldSize": 8},
            **({"phase": phase} if phase else {}),
            "progress": {
                "step": 12,
                "totalSteps": 200,
                "summary": "12/200 (6%)",
                "loss": 4.67442512512207,
                "lossDisplay": "4.674",
                "eta": "42h27m",
                "epoch": 0.06,
                **(progress or {}),
            },
            **status,
        },
    }
    return body


def column(table: str, name: str) -> list[str]:
    """The cells under a header of a kubectl-style table (columns three spaces apart)."""
    header, *rows = table.splitlines()
    start = header.index(name)
    following = [m.start() for m in re.finditer(r"   (?=\S)", header) if m.start() > start]
    end = following[0] if following else None
    return [row[start:end].strip() for row in rows]


# ----------------------------------------------------------------------------- sftjob get


def test_get_row_shows_the_plan_and_the_operators_column_texts() -> None:
    table = job_view.jobs_table([job()], NOW, all_namespaces=False)
    assert table.splitlines()[0].split() == [
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
    ]
    assert column(table, "PROGRESS") == ["12/200 (6%)"]
    # The rounded text, never the float the column once showed.
    assert column(table, "LOSS") == ["4.674"]
    assert "4.67442512512207" not in table
    assert column(table, "ETA") == ["42h27m"]
    assert column(table, "BATCH") == ["64"]
    assert column(table, "STEPS") == ["200"]
    assert column(table, "METHOD") == ["qlora"]
    assert column(table, "GPUS") == ["8"]
    assert column(table, "AGE") == ["30m"]


@pytest.mark.parametrize("phase", ["Suspended", "Failed", "Succeeded", "Restarting", "Pending"])
def test_no_eta_unless_running(phase: str) -> None:
    # Even where a stale ETA is still in the status (an older operator left it there).
    table = job_view.jobs_table([job(phase=phase)], NOW, all_namespaces=False)
    assert column(table, "ETA") == ["-"]
    assert "42h27m" not in table
    report = job_view.status_text(job(phase=phase), [], NOW, chart=None)
    assert "42h27m" not in report


def test_loss_without_a_display_text_is_rounded_to_four_digits() -> None:
    older = job(progress={"lossDisplay": None, "loss": 1.23456789})
    assert column(job_view.jobs_table([older], NOW, all_namespaces=False), "LOSS") == ["1.235"]


def test_measured_plan_wins_over_the_planned_figures() -> None:
    measured = job(measuredPlan={"effectiveBatchSize": 48, "totalSteps": 150, "measured": True})
    measured["status"]["progress"].pop("totalSteps")
    table = job_view.jobs_table([measured], NOW, all_namespaces=False)
    assert column(table, "BATCH") == ["48"] and column(table, "STEPS") == ["150"]


def test_a_job_the_operator_has_not_seen_is_pending_with_dashes() -> None:
    fresh = job(phase=None)
    fresh["status"] = {}
    fresh["spec"] = {"model": {"path": "/data/m"}}
    (row,) = job_view.jobs_table([fresh], NOW, all_namespaces=False).splitlines()[1:]
    assert row.split() == ["run", "Pending", "-", "-", "-", "-", "-", "lora", "0", "30m"]


def test_all_namespaces_puts_namespace_first_and_sorts() -> None:
    table = job_view.jobs_table(
        [job("b", "team-b"), job("z", "team-a"), job("a", "team-a")], NOW, all_namespaces=True
    )
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["team-a", "a"],
        ["team-a", "z"],
        ["team-b", "b"],
    ]


def test_wide_adds_epoch_eval_loss_and_the_model() -> None:
    wide = job(progress={"evalLoss": 2.3456789, "tokensPerSecond": 1234.56}, attempts=2)
    table = job_view.jobs_table([wide], NOW, all_namespaces=False, wide=True)
    assert column(table, "EPOCH") == ["0.06"]
    assert column(table, "EVAL LOSS") == ["2.346"]
    assert column(table, "TOKENS/S") == ["1235"]
    assert column(table, "ATTEMPTS") == ["2"]
    assert column(table, "MODEL") == ["Qwen/Qwen2.5-0.5B"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (5, "5s"),
        (119, "119s"),
        (303, "5m3s"),
        (600, "10m"),
        (3 * 3600 + 60, "3h1m"),
        (30 * 3600, "30h"),
        (2 * 86400 + 4 * 3600, "2d4h"),
        (800 * 86400, "2y70d"),
    ],
)
def test_age_is_kubectls_human_duration(seconds: int, text: str) -> None:
    assert job_view.human_duration(seconds) == text


def test_not_found_names_the_namespace_and_suggests_get_all() -> None:
    text = job_view.not_found_text("missing", "team-a")
    assert '"missing"' in text and '"team-a"' in text and "sftjob get -A" in text


# ----------------------------------------------------------------------------- watch


def test_watch_events_fold_into_the_table() -> None:
    jobs = {job_view.job_key(j): j for j in [job("a")]}
    jobs = job_view.apply_watch_event(jobs, WatchEvent("ADDED", job("b")))
    moved = job("a", progress={"summary": "100/200 (50%)"})
    jobs = job_view.apply_watch_event(jobs, WatchEvent("MODIFIED", moved))
    jobs = job_view.apply_watch_event(jobs, WatchEvent("BOOKMARK", {"metadata": {}}))
    assert sorted(name for _, name in jobs) == ["a", "b"]
    assert column(job_view.jobs_table(jobs.values(), NOW, all_namespaces=False), "PROGRESS") == [
        "100/200 (50%)",
        "12/200 (6%)",
    ]
    jobs = job_view.apply_watch_event(jobs, WatchEvent("DELETED", job("a")))
    assert list(jobs) == [("team-a", "b")]


def test_all_finished_needs_every_job_done_and_at_least_one() -> None:
    assert not job_view.all_finished([])
    assert not job_view.all_finished([job(phase="Succeeded"), job(phase="Running")])
    assert job_view.all_finished([job(phase="Succeeded"), job(phase="Failed")])


# ----------------------------------------------------------------------------- status


def history(points: int, *, eval_every: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "step": step,
            "loss": round(3.0 * 0.99**step, 4),
            **(
                {"evalLoss": round(3.2 * 0.99**step, 4)}
                if eval_every and step % eval_every == 0
                else {}
            ),
        }
        for step in range(1, points + 1)
    ]


def test_status_shows_conditions_plan_effective_spec_and_events_newest_last() -> None:
    subject = job(
        measuredPlan={"effectiveBatchSize": 64, "totalSteps": 180, "worldSize": 8},
        conditions=[
            {
                "type": "Running",
                "status": "True",
                "reason": "PodsRunning",
                "message": "2 of 2 ranks running",
                "lastTransitionTime": "2026-01-01T00:55:00Z",
            }
        ],
        effective={
            "profile": "research",
            "profileGeneration": 3,
            "fromProfile": [{"field": "spec.image", "value": '"ghcr.io/x:1"'}],
        },
    )
    events = [
        {
            "involvedObject": {"kind": "SFTJob", "name": "run", "uid": "uid-run"},
            "type": "Normal",
            "reason": f"Reason{i}",
            "message": f"event {i}",
            "lastTimestamp": f"2026-01-01T00:{40 + i:02d}:00Z",
        }
        for i in reversed(range(12))
    ] + [
        # Another object's event, and one about an earlier job of the same name (other uid).
        {"involvedObject": {"kind": "Pod", "name": "run"}, "reason": "PodEvent"},
        {"involvedObject": {"kind": "SFTJob", "name": "run", "uid": "old"}, "reason": "Earlier"},
    ]
    report = job_view.status_text(subject, events, NOW, chart=None)
    conditions = report.split("Conditions:")[1].split("\n\n")[0]
    assert re.search(r"Running\s+True\s+PodsRunning\s+5m\s+2 of 2 ranks running", conditions)
    plan = report.split("Plan:")[1].split("\n\n")[0]
    assert re.search(r"totalSteps\s+200\s+180", plan)
    assert 'spec.image = "ghcr.io/x:1"' in report and "research (generation 3)" in report
    shown = re.findall(r"Reason(\d+)", report)
    # The last ten, oldest first: 2..11.
    assert shown == [str(i) for i in range(2, 12)]
    assert "PodEvent" not in report and "Earlier" not in report


def test_status_says_when_there_is_no_history_instead_of_an_empty_chart() -> None:
    report = job_view.status_text(job(phase="Pending"), [], NOW, chart=None)
    assert "no loss history yet" in report
    assert job_view.loss_curves(job()) == []


def test_the_chart_draws_loss_and_eval_loss_over_the_step() -> None:
    pytest.importorskip("plotext")
    subject = job(progress={"history": history(50, eval_every=10)})
    curves = job_view.loss_curves(subject)
    assert [c.label for c in curves] == ["loss", "eval loss"]
    assert curves[1].steps == [10, 20, 30, 40, 50]
    chart = job_view.loss_chart(curves)
    assert "\x1b[" not in chart  # no colour codes unless asked
    assert "loss" in chart and "eval loss" in chart and "step" in chart
    # The y axis spans the curve: its highest and lowest values label it.
    labels = [float(x) for x in re.findall(r"^\s*(\d+\.\d+)┤", chart, re.MULTILINE)]
    assert max(labels) == pytest.approx(3.2 * 0.99**10, abs=0.1)  # the first eval point
    assert min(labels) == pytest.approx(3.0 * 0.99**50, abs=0.1)
    # Whole steps on the x axis, from the first step to the last.
    ticks = chart.splitlines()[-2].split()
    assert ticks[0] == "1" and ticks[-1] == "50"
    # Points are drawn (braille cells), inside the frame.
    assert len(re.findall("[\u2801-\u28ff]", chart)) > 30


def test_a_long_history_keeps_the_chart_its_size() -> None:
    pytest.importorskip("plotext")
    curves = job_view.loss_curves(job(progress={"history": history(5000)}))
    chart = job_view.loss_chart(curves, width=60, height=15)
    lines = chart.splitlines()
    assert len(lines) <= 15 and max(len(line) for line in lines) <= 60
    assert chart.splitlines()[-2].split()[-1] == "5000"


def test_a_single_point_is_still_a_chart() -> None:
    pytest.importorskip("plotext")
    curves = job_view.loss_curves(job(progress={"history": [{"step": 3, "loss": 2.5}]}))
    assert "3" in job_view.loss_chart(curves).splitlines()[-2].split()


def test_the_chart_asks_for_the_cli_extra_when_plotext_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "plotext", None)  # what `import plotext` meets if absent
    with pytest.raises(ImportError, match=r"pip install 'sftjob\[cli\]'"):
        job_view.loss_chart(job_view.loss_curves(job(progress={"history": history(3)})))


def test_screenshot_is_a_png_of_the_text(tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    png = tmp_path / "shot.png"
    job_view.render_screenshot("Name: run\n" + "x" * 80 + "\n", str(png))
    with Image.open(png) as image:
        width, height = image.size
        assert width > 4 * height  # 80 columns by two lines
        low, high = image.convert("L").getextrema()
        assert high - low > 100  # light text on a dark ground, not a blank canvas


def test_braille_cells_become_their_dots_in_the_screenshot() -> None:
    assert job_view.braille_dots("\u2801") == [(0, 0)]  # dot 1: top left
    assert job_view.braille_dots("\u2840") == [(0, 3)]  # dot 7: bottom left
    assert job_view.braille_dots("\u2880") == [(1, 3)]  # dot 8: bottom right
    assert len(job_view.braille_dots("\u28ff")) == 8
    assert job_view.braille_dots("\u2800") == [] and job_view.braille_dots("x") == []
