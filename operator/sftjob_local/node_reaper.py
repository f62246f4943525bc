"""What a previous run of the local node left behind (pure file/process helpers).

Each container run's supervisor records `<pid> <starttime>` of the container's
main process (its process group) and of itself in
`<pod folder>/procs/<container>-<restart>.pid` (see node_supervisor). Normally a
supervisor kills its tree when the node dies (the lifeline pipe closes), so the
records matter only when a supervisor was killed too (e.g. `kill -9` of every
process of the node's group). On start the node kills every recorded process
whose start time still matches (a reused pid is left alone), and removes the
folders of pods that no longer exist, as the kubelet's housekeeping
(cleanupOrphanedPodDirs) does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

from .node_supervisor import proc_starttime


def recorded_processes(pod_dir: Path) -> list[tuple[int, int]]:
    out = []
    for record in sorted((pod_dir / "procs").glob("*.pid")):
        with contextlib.suppress(OSError, ValueError):
            for line in record.read_text().splitlines():
                pid, start = line.split()
                out.append((int(pid), int(start)))
    return out


def kill_recorded(pod_dir: Path) -> int:
    """SIGKILL the recorded processes (and their groups) that are still the same
    processes; forget the records. Returns how many were killed."""
    killed = 0
    for pid, start in recorded_processes(pod_dir):
        if pid <= 1 or proc_starttime(pid) != start:
            continue
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        killed += 1
    shutil.rmtree(pod_dir / "procs", ignore_errors=True)
    return killed


def pod_dirs(pods_root: Path) -> list[Path]:
    """`<workdir>/pods/<ns>/<name>-<uid8>` folders."""
    if not pods_root.is_dir():
        return []
    return [d for ns in pods_root.iterdir() if ns.is_dir() for d in ns.iterdir() if d.is_dir()]


def is_orphaned(pod_dir: Path, live: set[tuple[str, str]]) -> bool:
    """Whether the folder belongs to no live pod; `live` holds (namespace, "<name>-<uid8>")."""
    return (pod_dir.parent.name, pod_dir.name) not in live
