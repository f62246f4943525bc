"""The local node's container supervisor: one small process per container run.

It plays the part of a container runtime's shim (containerd-shim / conmon) for
one process tree, and is run by the node as

    python -I -S node_supervisor.py CONFIG_JSON

with the container's environment. Standard library only (it is started for
every container run, so `-S` keeps it quick and the container's PYTHONPATH out).

CONFIG_JSON: {"argv": [...], "cwd": str, "log": path, "pidfile": path,
"memory_limit": bytes or 0, "poll": seconds}.

What it does:
* starts `argv` in its own session (the container's process group, pgid = its
  pid) with PR_SET_PDEATHSIG=SIGKILL, and becomes a child subreaper, so every
  process of the tree (also one that calls setsid, also an orphaned grandchild)
  stays its descendant and can be found and killed;
* writes stdout/stderr to `log` in the CRI log format the kubelet reads
  (`<RFC3339Nano> <stdout|stderr> <F|P> <text>`, one record per line; P for a
  partial line: an unterminated tail or a line longer than 16 KiB);
* enforces the memory limit: every `poll` seconds it sums the resident set
  (VmRSS from /proc/<pid>/stat) of the whole tree and kills the tree with SIGKILL
  when the sum exceeds `memory_limit` (reported as OOMKilled, exit code 137);
* its stdin is the node's *lifeline*: end of file (the node exited, even by
  SIGKILL) kills the whole tree with SIGKILL and ends the supervisor; a line
  `kill` from the node kills the tree and reports as usual;
* reports to the node on stdout: `started <pid>`, then `exit <code> [OOMKilled]`
  (code 128+N for a signal N), or `error <json message>` when argv cannot start;
* records `<pid> <starttime>` of the container and of itself in `pidfile`, so a
  restarted node can kill what a dead supervisor left (see node_reaper).

It ignores SIGINT/SIGTERM/SIGHUP/SIGQUIT (handled, not ignored, so the
container does not inherit SIG_IGN): only the lifeline decides its life.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
MAX_LINE = 16 * 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ---------------------------------------------------------------------------- pure helpers
def rfc3339nano(t: float) -> str:
    """Go's time.RFC3339Nano in UTC (trailing zeros of the fraction dropped)."""
    secs = int(t)
    nanos = int(round((t - secs) * 1e9))
    if nanos >= 1_000_000_000:
        secs, nanos = secs + 1, nanos - 1_000_000_000
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    frac = f"{nanos:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def cri_record(ts: str, stream: str, text: bytes, partial: bool) -> bytes:
    """One CRI log record (k8s.io/cri-api: `timestamp stream tag content`)."""
    return b"%s %s %s %s\n" % (ts.encode(), stream.encode(), b"P" if partial else b"F", text)


def split_records(buffer: bytes, final: bool) -> tuple[list[tuple[bytes, bool]], bytes]:
    """Cut output into (text, partial) records; returns the records and what is
    left for later (an unterminated line, unless `final` or too long)."""
    out: list[tuple[bytes, bool]] = []
    while True:
        nl = buffer.find(b"\n")
        if nl == -1:
            break
        line = buffer[:nl]
        buffer = buffer[nl + 1 :]
        while len(line) > MAX_LINE:
            out.append((line[:MAX_LINE], True))
            line = line[MAX_LINE:]
        out.append((line, False))
    while len(buffer) > MAX_LINE:
        out.append((buffer[:MAX_LINE], True))
        buffer = buffer[MAX_LINE:]
    if final and buffer:
        out.append((buffer, True))
        buffer = b""
    return out, buffer


def parse_stat(text: str) -> tuple[int, str, int, int, int]:
    """/proc/<pid>/stat → (ppid, state, pgid, starttime, rss pages)."""
    rest = text.rsplit(")", 1)[1].split()
    return int(rest[1]), rest[0], int(rest[2]), int(rest[19]), int(rest[21])


def read_proc_table() -> dict[int, tuple[int, str, int, int, int]]:
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                table[int(name)] = parse_stat(fh.read())
        except (OSError, ValueError, IndexError):
            continue
    return table


def descendants(root: int, table: dict[int, tuple[int, str, int, int, int]]) -> set[int]:
    """All processes below `root` (by parent pid), `root` excluded."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def tree_rss_bytes(root: int, table: dict[int, tuple[int, str, int, int, int]]) -> int:
    return sum(table[p][4] for p in descendants(root, table) if table[p][1] != "Z") * PAGE_SIZE


def proc_starttime(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return parse_stat(fh.read())[3]
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------- process side
def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _child_setup() -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Supervisor:
    def __init__(self, cfg: dict) -> None:  # type: ignore[type-arg]
        self.cfg = cfg
        self.limit = int(cfg.get("memory_limit") or 0)
        self.poll = float(cfg.get("poll") or 0.25)
        self.log = open(cfg["log"], "ab", buffering=0)  # noqa: SIM115
        self.report_fh = os.fdopen(1, "w", buffering=1)
        self.child: subprocess.Popen[bytes] | None = None
        self.oom = False
        self.buffers: dict[str, bytes] = {"stdout": b"", "stderr": b""}

    def report(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.report_fh.write(line + "\n")

    def pump(self, sel: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        """Copy one read of a ready child stream to its file; at its end, stop watching it."""
        chunk = os.read(key.fd, 65536)
        if chunk:
            self.write(key.data, chunk)
        else:
            sel.unregister(key.fileobj)

    def write(self, stream: str, data: bytes, final: bool = False) -> None:
        records, self.buffers[stream] = split_records(self.buffers[stream] + data, final)
        if records:
            ts = rfc3339nano(time.time())
            self.log.write(b"".join(cri_record(ts, stream, t, p) for t, p in records))

    def kill_tree(self) -> None:
        """SIGKILL the container's group and every descendant of this supervisor."""
        if self.child is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.child.pid, signal.SIGKILL)
        for pid in descendants(os.getpid(), read_proc_table()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def reap_orphans(self) -> None:
        """Collect exited orphans re-parented to us (we are their subreaper)."""
        me = os.getpid()
        for pid, (ppid, state, *_rest) in read_proc_table().items():
            if ppid == me and state == "Z" and (self.child is None or pid != self.child.pid):
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, lambda *_: None)
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        try:
            self.child = subprocess.Popen(
                self.cfg["argv"],
                cwd=self.cfg["cwd"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_child_setup,  # noqa: PLW1509 (single-threaded process)
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self.write(
                "stderr", f"local node: cannot start {self.cfg['argv'][0]!r}: {exc}\n".encode()
            )
            self.report(f"error {json.dumps(str(exc))}")
            return 0
        child = self.child
        with open(self.cfg["pidfile"], "w") as fh:
            fh.write(f"{child.pid} {proc_starttime(child.pid)}\n")
            fh.write(f"{os.getpid()} {proc_starttime(os.getpid())}\n")
        self.report(f"started {child.pid}")
        sel = selectors.DefaultSelector()
        assert child.stdout is not None and child.stderr is not None
        sel.register(child.stdout, selectors.EVENT_READ, "stdout")
        sel.register(child.stderr, selectors.EVENT_READ, "stderr")
        sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "lifeline")
        next_check = time.monotonic()
        while child.poll() is None:
            for key, _ in sel.select(timeout=self.poll):
                if key.data == "lifeline":
                    data = b""
                    with contextlib.suppress(OSError):
                        data = os.read(key.fd, 4096)
                    if not data:  # the node is gone: nobody to report to
                        self.kill_tree()
                        return 0
                    if b"kill" in data:
                        self.kill_tree()
                    continue
                self.pump(sel, key)
            if time.monotonic() >= next_check:
                # without a limit the scan only reaps orphans: once a second is enough
                next_check = time.monotonic() + (self.poll if self.limit else 1.0)
                table = read_proc_table()
                if self.limit and tree_rss_bytes(os.getpid(), table) > self.limit:
                    self.oom = True
                    self.kill_tree()
                self.reap_orphans()
        # like PID 1 of a container exiting: whatever is left of the tree goes too
        self.kill_tree()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(
            k.data != "lifeline" for k in sel.get_map().values()
        ):
            for key, _ in sel.select(timeout=0.1):
                if key.data == "lifeline":
                    continue
                self.pump(sel, key)
        for stream in ("stdout", "stderr"):
            self.write(stream, b"", final=True)
        self.reap_orphans()
        code = child.returncode
        if self.oom:
            self.report("exit 137 OOMKilled")
        else:
            self.report(f"exit {128 - code if code < 0 else code}")
        return 0


def main() -> int:
    return Supervisor(json.loads(sys.argv[1])).run()


if __name__ == "__main__":
    sys.exit(main())
