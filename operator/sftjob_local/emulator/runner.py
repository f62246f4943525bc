"""Running the emulator from synchronous code (a background thread) and writing kubeconfigs."""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import yaml

from .server import ApiEmulator

T = TypeVar("T")


def write_kubeconfig(
    path: str | Path,
    url: str,
    namespace: str = "default",
    *,
    token: str,
    ca_pem: bytes = b"",
    user: str = "sftjob-local",
) -> Path:
    """Write a kubeconfig for a plain-http server with a token user (kubectl, kubernetes, Kopf).

    ``token``: the emulator's ``admin_token`` (cluster-admin) or a service-account token; the
    emulator refuses any other (401). ``ca_pem``: the emulator's CA (``emulator.ca_pem``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cluster: dict[str, str] = {"server": url}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sftjob-local", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {
                "name": "sftjob-local",
                "context": {
                    "cluster": "sftjob-local",
                    "user": user,
                    "namespace": namespace,
                },
            }
        ],
        "current-context": "sftjob-local",
        "preferences": {},
    }
    # It holds a credential: readable by its owner only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


class EmulatorThread:
    """An :class:`ApiEmulator` served from its own event loop in a daemon thread.

    ``with EmulatorThread(log_dir=...) as srv: srv.url``; ``srv.emulator`` is the server object
    and ``srv.call(coro)`` runs a coroutine on its loop (e.g. to inspect or inject state).
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.emulator: ApiEmulator | None = None

    @property
    def url(self) -> str:
        if self.emulator is None:
            raise RuntimeError("the emulator thread is not started")
        return self.emulator.url

    def start(self) -> EmulatorThread:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self.emulator = ApiEmulator(**self._kwargs)
                loop.run_until_complete(self.emulator.start())
            except BaseException as exc:  # report startup failures to the caller's thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="sftjob-api-emulator", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop is None or self.emulator is None or self._thread is None:
            return
        self.call(self.emulator.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def write_kubeconfig(
        self, path: str | Path, namespace: str = "default", token: str | None = None
    ) -> Path:
        """A kubeconfig for this server: the cluster admin unless another token is given."""
        assert self.emulator is not None
        return write_kubeconfig(
            path,
            self.url,
            namespace,
            token=token or self.emulator.admin_token,
            ca_pem=self.emulator.ca_pem,
        )

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
