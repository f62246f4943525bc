"""The emulator's durable state: an embedded SQLite database, as etcd is for a real cluster.

What is kept: every stored object (as JSON, under its storage key, namespace and name) and the
global resourceVersion counter, including the versions that deletions consumed, so versions never
repeat after a restart. What is not kept: the watch history (a real apiserver's watch cache
starts empty too; clients relist after 410 Expired) and watchers.

Durability: each write is its own transaction, committed before the API answers. The journal is
WAL with ``synchronous=NORMAL``: a committed write survives the process being killed (SIGKILL),
though not a power loss (the local control plane is for development). One writer: the
connection takes SQLite's exclusive lock when it opens, so a second local control plane on the
same database fails at once with :class:`StateLocked` instead of corrupting the first one's
state; the lock goes with the process, however it ends.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Key = tuple[str, str]

SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    api_group TEXT NOT NULL,
    resource TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    uid TEXT NOT NULL,
    resource_version INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (api_group, resource, namespace, name)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StateLocked(OSError):
    """Another process (another local control plane) holds the state database."""


class StateDatabase:
    """Objects and the resourceVersion counter in one SQLite file; write-through, one writer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The emulator runs on one event loop, but EmulatorThread builds it in a thread of its
        # own: the connection is used from one thread at a time, never concurrently.
        self._conn = sqlite3.connect(self.path, timeout=1.0, check_same_thread=False)
        try:
            self._conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            with self._conn:
                self._conn.executescript(_SCHEMA)
                # A write right away takes the exclusive lock now, not at the first API write.
                self._conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                    (SCHEMA_VERSION,),
                )
        except sqlite3.OperationalError as exc:
            self._conn.close()
            if "locked" in str(exc):
                raise StateLocked(
                    f"the state database {self.path} is in use by another local control plane "
                    "(stop it first, or use another workdir)"
                ) from exc
            raise
        schema = self.meta("schema")
        if schema != SCHEMA_VERSION:
            self._conn.close()
            raise RuntimeError(
                f"{self.path}: state schema {schema!r}, this version reads {SCHEMA_VERSION!r}"
            )

    # ------------------------------------------------------------ reading (at start)
    def objects(self) -> Iterator[tuple[Key, dict[str, Any]]]:
        rows = self._conn.execute("SELECT api_group, resource, body FROM objects")
        for group, resource, body in rows:
            yield (group, resource), json.loads(body)

    def meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def resource_version(self) -> int:
        """The last resourceVersion handed out (objects' and deletions' alike)."""
        stored = self.meta("resourceVersion")
        (highest,) = self._conn.execute(
            "SELECT COALESCE(MAX(resource_version), 0) FROM objects"
        ).fetchone()
        return max(int(stored or 0), int(highest))

    # ------------------------------------------------------------ writing (each one committed)
    def put(self, key: Key, obj: dict[str, Any], rv: int) -> None:
        meta = obj["metadata"]
        with self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key[0],
                    key[1],
                    meta.get("namespace", ""),
                    meta["name"],
                    meta["uid"],
                    rv,
                    json.dumps(obj, separators=(",", ":")),
                ),
            )
            self._set_rv(rv)

    def delete(self, key: Key, namespace: str, name: str, rv: int) -> None:
        with self._conn:
            self._conn.execute(
                "DELETE FROM objects WHERE api_group = ? AND resource = ? AND namespace = ? "
                "AND name = ?",
                (key[0], key[1], namespace, name),
            )
            self._set_rv(rv)

    def set_meta(self, key: str, value: str) -> None:
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def _set_rv(self, rv: int) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('resourceVersion', ?)", (str(rv),))

    def close(self) -> None:
        self._conn.close()
