"""The demo's live table shows the texts of `kubectl get sft`'s columns."""

from __future__ import annotations

from sftjob_local.demo import HEADER, _row


def test_the_demo_row_shows_the_operators_column_texts() -> None:
    progress = {"summary": "12/200 (6%)", "epoch": 0.06, "loss": 4.67442512512207}
    job = {"metadata": {"name": "tiny"}, "status": {"phase": "Suspended", "progress": progress}}
    job["status"]["progress"]["lossDisplay"] = "4.674"
    row = _row(job)
    assert row.split() == ["tiny", "Suspended", "12/200", "(6%)", "0.06", "4.674", "-"]
    assert HEADER.split() == ["NAME", "PHASE", "PROGRESS", "EPOCH", "LOSS", "ETA"]
    assert row.index("0.06") == HEADER.index("EPOCH")  # aligned under its header
