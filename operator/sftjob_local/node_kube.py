"""The local node's HTTP client: the only place where the node talks to the API.

It speaks plain Kubernetes REST over aiohttp, configured from an ordinary
kubeconfig (server, bearer token, CA, client certificate) through the official
`kubernetes` client's loader, so the node works against the local emulator and
would work against anything else that serves the Kubernetes API.

`Informer` keeps a cache of one resource through list + watch, resumes the
watch from the last seen resourceVersion after a disconnect (bookmarks keep it
fresh) and relists when the server answers 410 Gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger("sftjob_local.node")

Obj = dict[str, Any]


class ApiError(Exception):
    """A non-2xx answer; `status` is the HTTP code, `body` the decoded Status (or text)."""

    def __init__(self, status: int, body: Any, method: str = "", path: str = "") -> None:
        self.status = status
        self.body = body
        msg = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: HTTP {status}: {msg}")


class KubeHttp:
    """Minimal async Kubernetes REST client driven by a kubeconfig file."""

    def __init__(self, kubeconfig: Path | str, context: str | None = None) -> None:
        from kubernetes import client, config  # lazy: only the loader is used

        cfg = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), context=context, client_configuration=cfg
        )
        self.base = cfg.host.rstrip("/")
        self._headers: dict[str, str] = {}
        token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if token:
            prefix = (cfg.api_key_prefix or {}).get("authorization")
            self._headers["Authorization"] = f"{prefix} {token}" if prefix else token
        self._ssl: ssl.SSLContext | bool | None = None
        if self.base.startswith("https"):
            if not cfg.verify_ssl:
                self._ssl = False
            else:
                ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
                if cfg.cert_file:
                    ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
                self._ssl = ctx
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeHttp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        async with self.session.request(
            method,
            self.base + path,
            data=data,
            params=_params(params),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            text = await resp.text()
            try:
                decoded: Any = json.loads(text) if text else None
            except ValueError:
                decoded = text
            if resp.status >= 400:
                raise ApiError(resp.status, decoded, method, path)
            return decoded

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request("GET", path, params=params)

    async def create(self, path: str, body: Obj) -> Any:
        return await self.request("POST", path, body=body)

    async def merge_patch(self, path: str, body: Obj) -> Any:
        return await self.request(
            "PATCH", path, body=body, content_type="application/merge-patch+json"
        )

    async def delete(self, path: str, body: Obj | None = None) -> Any:
        return await self.request("DELETE", path, body=body)

    async def watch(self, path: str, params: dict[str, Any]) -> AsyncIterator[Obj]:
        """Yield raw watch events (`{"type": ..., "object": ...}`) until the server ends the stream."""
        params = {**params, "watch": "true"}
        async with self.session.get(
            self.base + path,
            params=_params(params),
            headers={"Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
        ) as resp:
            if resp.status >= 400:
                text = await resp.text()
                try:
                    decoded: Any = json.loads(text)
                except ValueError:
                    decoded = text
                raise ApiError(resp.status, decoded, "WATCH", path)
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
            if buf.strip():
                yield json.loads(buf)


def _params(params: dict[str, Any] | None) -> dict[str, str] | None:
    if not params:
        return None
    out = {}
    for key, value in params.items():
        if value is None:
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


class Gone(Exception):
    """The watch's resourceVersion is too old (410): relist."""


class Informer:
    """List + watch cache of one resource collection, calling `on_change(type, obj)`.

    `type` is ADDED, MODIFIED or DELETED. After a relist, objects that vanished
    while the watch was down are reported as DELETED so consumers never keep
    stale entries. `synced` is set once the first list has been delivered.
    """

    def __init__(
        self,
        api: KubeHttp,
        path: str,
        on_change: Callable[[str, Obj], None],
        *,
        name: str = "",
        retry_delay: float = 0.5,
        watch_timeout: int = 300,
    ) -> None:
        self.api = api
        self.path = path
        self.on_change = on_change
        self.name = name or path
        self.retry_delay = retry_delay
        self.watch_timeout = watch_timeout
        self.relists = 0  # full lists done (1 while watches resume cleanly)
        self.watches = 0  # watch requests made
        self.cache: dict[str, Obj] = {}  # by uid
        self.synced = asyncio.Event()
        self._rv: str | None = None

    async def run(self) -> None:
        while True:
            try:
                if self._rv is None:
                    await self._relist()
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except Gone:
                log.info("%s: watch expired (410); relisting", self.name)
                self._rv = None
            except Exception as exc:  # network blips, server restarts
                log.debug("%s: watch interrupted: %r; resuming", self.name, exc)
                await asyncio.sleep(self.retry_delay)

    async def _relist(self) -> None:
        listing = await self.api.get(self.path)
        self.relists += 1
        seen = set()
        for item in listing.get("items") or []:
            uid = item["metadata"]["uid"]
            seen.add(uid)
            old = self.cache.get(uid)
            self.cache[uid] = item
            if old is None:
                self.on_change("ADDED", item)
            elif old["metadata"].get("resourceVersion") != item["metadata"].get("resourceVersion"):
                self.on_change("MODIFIED", item)
        for uid in list(self.cache):
            if uid not in seen:
                self.on_change("DELETED", self.cache.pop(uid))
        self._rv = (listing.get("metadata") or {}).get("resourceVersion") or "0"
        self.synced.set()

    async def _watch_once(self) -> None:
        params = {
            "resourceVersion": self._rv,
            "allowWatchBookmarks": True,
            "timeoutSeconds": self.watch_timeout,
        }
        self.watches += 1
        try:
            async for event in self.api.watch(self.path, params):
                etype = event.get("type")
                obj = event.get("object") or {}
                if etype == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise ApiError(obj.get("code") or 500, obj, "WATCH", self.path)
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv:
                    self._rv = rv
                if etype == "BOOKMARK":
                    continue
                uid = obj["metadata"]["uid"]
                if etype == "DELETED":
                    self.cache.pop(uid, None)
                else:
                    self.cache[uid] = obj
                self.on_change(str(etype), obj)
        except ApiError as exc:
            if exc.status == 410:
                raise Gone() from exc
            raise


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    for task in live:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def post_event(api: KubeHttp, background: set[asyncio.Task[Any]], event: dict[str, Any]) -> None:
    """Create `event` in its namespace without waiting (fire and forget): the
    task is kept in `background` until it is done; failures are dropped."""
    path = f"/api/v1/namespaces/{event['metadata']['namespace']}/events"

    async def send() -> None:
        with contextlib.suppress(Exception):
            await api.create(path, event)

    task = asyncio.create_task(send())
    background.add(task)
    task.add_done_callback(background.discard)
