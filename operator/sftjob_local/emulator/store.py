"""Object storage with a global resourceVersion, a bounded event history and watchers.

Reads are served from memory. With a database (``Store(path=...)``, see :mod:`.statedb`) every
write goes through to it before the caller answers, and a new Store loads it back: objects,
uids and the resourceVersion counter survive a restart; the event history does not (watches
from a version older than the restart get 410 Expired, so clients relist).

Stored objects are never mutated in place: every write stores a fresh dict. Event history and
watchers can therefore share references with the store without copying.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from pathlib import Path
from typing import Any

from .statedb import StateDatabase

Key = tuple[str, str]  # (group, plural): one storage for all versions of a resource


@dataclasses.dataclass(frozen=True)
class Event:
    rv: int
    key: Key
    type: str  # ADDED | MODIFIED | DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None


class Store:
    def __init__(self, history_size: int = 10000, path: str | Path | None = None) -> None:
        self.objects: dict[Key, dict[tuple[str, str], dict[str, Any]]] = collections.defaultdict(
            dict
        )
        self.uids: dict[str, tuple[Key, str, str]] = {}
        self.rv = 0
        self.history: collections.deque[Event] = collections.deque(maxlen=history_size)
        # Watches from a resourceVersion older than this get 410 Gone (the history is gone).
        self.compacted_rv = 0
        self.subscribers: set[asyncio.Queue[Event | None]] = set()
        self.db = StateDatabase(path) if path is not None else None
        # True when this store continues a database written before (not a fresh cluster).
        self.restored = False
        if self.db is not None:
            self._load(self.db)

    def _load(self, db: StateDatabase) -> None:
        for key, obj in db.objects():
            meta = obj["metadata"]
            self.objects[key][(meta.get("namespace", ""), meta["name"])] = obj
            self.uids[meta["uid"]] = (key, meta.get("namespace", ""), meta["name"])
        self.rv = self.compacted_rv = db.resource_version()
        self.restored = db.meta("bootstrapped") == "true"

    def mark_bootstrapped(self) -> None:
        """Record that the cluster's first-start objects exist, so a restart does not redo them."""
        if self.db is not None and not self.restored:
            self.db.set_meta("bootstrapped", "true")

    def close(self) -> None:
        """Close the database (after the server stopped writing)."""
        if self.db is not None:
            self.db.close()
            self.db = None

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def compact(self) -> None:
        """Forget all history so far, as etcd compaction does."""
        self.history.clear()
        self.compacted_rv = self.rv

    def get(self, key: Key, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects[key].get((namespace, name))

    def list(self, key: Key, namespace: str | None = None) -> list[dict[str, Any]]:
        items = self.objects[key]
        return [items[k] for k in sorted(items) if namespace is None or k[0] == namespace]

    def all_objects(self) -> list[tuple[Key, dict[str, Any]]]:
        return [
            (key, obj) for key, items in list(self.objects.items()) for obj in list(items.values())
        ]

    def put(self, key: Key, obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        """Store a new version (assigning the next resourceVersion) and notify watchers."""
        meta = obj["metadata"]
        rv = self.next_rv()
        meta["resourceVersion"] = str(rv)
        if self.db is not None:
            self.db.put(key, obj, rv)  # committed before the caller answers
        self.objects[key][(meta.get("namespace", ""), meta["name"])] = obj
        self.uids[meta["uid"]] = (key, meta.get("namespace", ""), meta["name"])
        self._emit(Event(rv, key, "MODIFIED" if old is not None else "ADDED", obj, old))
        return obj

    def remove(self, key: Key, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        # The DELETED event carries the deletion's own resourceVersion, as on a real server.
        final = {**obj, "metadata": {**meta}}
        rv = self.next_rv()
        if self.db is not None:
            self.db.delete(key, meta.get("namespace", ""), meta["name"], rv)
        self.objects[key].pop((meta.get("namespace", ""), meta["name"]), None)
        self.uids.pop(meta["uid"], None)
        final["metadata"]["resourceVersion"] = str(rv)
        self._emit(Event(rv, key, "DELETED", final, obj))
        return final

    def _emit(self, event: Event) -> None:
        if len(self.history) == self.history.maxlen:
            self.compacted_rv = self.history[0].rv
        self.history.append(event)
        for queue in self.subscribers:
            queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[Event | None]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event | None]) -> None:
        self.subscribers.discard(queue)

    def close_all(self) -> None:
        for queue in self.subscribers:
            queue.put_nowait(None)
