"""The README's `sftjob run` commands, run as a newcomer would, in a fresh directory.

README shows (and tests/unit/test_readme.py checks that this file runs them):
    .venv/bin/sftjob tiny-data
    .venv/bin/sftjob run -f deploy/examples/tiny-run-local.yaml
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = [
    ".venv/bin/sftjob tiny-data",
    ".venv/bin/sftjob run -f deploy/examples/tiny-run-local.yaml",
]

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(300)]


def test_readme_sftjob_run_commands(tmp_path: Path) -> None:
    # A fresh directory with the example beside it, so the relative paths in the
    # manifest resolve exactly as they do from a clean clone's root.
    (tmp_path / "deploy" / "examples").mkdir(parents=True)
    shutil.copy(
        ROOT / "deploy" / "examples" / "tiny-run-local.yaml", tmp_path / "deploy" / "examples"
    )
    outputs = []
    started = time.monotonic()
    for command in COMMANDS:
        args = command.split()[1:]  # this interpreter's sftjob instead of .venv/bin
        result = subprocess.run(
            [sys.executable, "-m", "sftjob_operator.cli", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=280,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        outputs.append(result.stdout)
    print(f"README sftjob run commands took {time.monotonic() - started:.1f}s")
    assert "tiny model:" in outputs[0]
    assert "effective batch   8 = 4 per device x 2 accumulation x 1" in outputs[1]
    final = tmp_path / ".sftjob-run" / "tiny-run-local" / "output" / "final"
    assert "Model saved in .sftjob-run/tiny-run-local/output/final" in outputs[1]
    assert (final / "adapter_config.json").exists() and (final / "tokenizer.json").exists()
