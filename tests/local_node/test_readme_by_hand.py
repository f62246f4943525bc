"""The README's "local control plane by hand" block, run as written, top to bottom.

The commands run in a scratch folder laid out like the repository root (crds/, deploy/ and a
`.venv/bin/sftjob` that is this interpreter's sftjob), with bash, so what a reader pastes is
what is tested: the cluster, the CRD, deploy/'s RBAC, a token for the operator's
ServiceAccount, the operator watching all namespaces under it, data into the claim, a tiny job
to Succeeded, and the stop.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.local

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- run as written, top to bottom, by tests/local_node/test_readme_by_hand.py -->"
DEFAULT_PORT = 8765  # `sftjob local up` without --port, as the README runs it


def by_hand_block() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(re.escape(MARKER) + r"\n```sh\n(.*?)```", readme, flags=re.S)
    assert match, f"README lost the block after {MARKER!r}"
    return match.group(1)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.timeout(900)
def test_the_readme_by_hand_block_runs_a_job_to_succeeded(tmp_path: Path) -> None:
    assert port_is_free(DEFAULT_PORT), (
        f"port {DEFAULT_PORT} is taken: the README's local up needs it"
    )
    for folder in ("crds", "deploy"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    sftjob = tmp_path / ".venv" / "bin" / "sftjob"
    sftjob.parent.mkdir(parents=True)
    sftjob.write_text(f'#!/bin/sh\nexec {sys.executable} -m sftjob_operator.cli "$@"\n')
    sftjob.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    result = subprocess.run(
        ["bash", "-e", "-c", by_hand_block()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    operator_log = tmp_path / ".sftjob-local" / "operator.log"
    shown = f"{result.stdout}\n{result.stderr}\noperator.log:\n" + (
        operator_log.read_text()[-4000:] if operator_log.exists() else "(none)"
    )
    assert result.returncode == 0, shown
    assert re.search(r"tiny-full\s+Succeeded", result.stdout), shown
    assert "Forbidden" not in operator_log.read_text(), shown  # deploy/'s RBAC was enough
    # Stopped: nothing answers on the port (a bind may still fail: TIME_WAIT) and no pod
    # process of this workdir is left.
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", DEFAULT_PORT))
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path)], capture_output=True, text=True
    ).stdout.split()
    assert not leftovers, leftovers
