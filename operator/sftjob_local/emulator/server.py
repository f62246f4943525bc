"""The HTTP face of the emulator: a kmock handler that routes Kubernetes URLs to :mod:`.core`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml

from .. import node_logs
from . import auth, bodies, errors, eviction, openapi, tables, tls
from .access import AccessControl, allowed_hosts, check_transport
from .admission_policy import PolicyAdmission, RequestOptions, request_options, request_warnings
from .core import ApiCore
from .errors import ApiError, bad_request
from .pod_security import PodSecurityAdmission
from .preinstalled import KOPF_PEERING_CRDS, as_applied
from .resources import ResourceType
from .selectors import parse_field_selector, parse_label_selector
from .store import Event

logger = logging.getLogger(__name__)

VERSION_INFO = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-sftjob-local",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23",
    "compiler": "gc",
    "platform": "linux/amd64",
}


PATCH_TYPES = {
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
}


@dataclasses.dataclass
class Route:
    group: str
    version: str | None = None
    namespace: str | None = None
    plural: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse_route(path: str) -> Route | None:
    """Split a Kubernetes API path; None for non-API paths."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        group, rest = "", parts[1:]
    elif parts[:1] == ["apis"]:
        if len(parts) < 2:
            return Route(group="*")  # /apis: the group list
        group, rest = parts[1], parts[2:]
    else:
        return None
    if not rest:
        return Route(group=group)
    route = Route(group=group, version=rest[0])
    rest = rest[1:]
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
        route.namespace, rest = rest[1], rest[2:]
    if rest:
        route.plural = rest[0]
        route.name = rest[1] if len(rest) > 1 else None
        route.subresource = "/".join(rest[2:]) or None
    return route


def _json(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> aiohttp.web.Response:
    return aiohttp.web.Response(
        body=json.dumps(body).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _truthy(value: str | None) -> bool:
    return value in ("true", "1", "True")


@attrs.define(kw_only=True, slots=False, eq=False)
class ApiEmulator(kmock.KubernetesEmulator):
    """A Kubernetes API server on loopback: kmock's emulator with real-server semantics.

    kmock provides the handler protocol, the request records (``emulator.requests``) and the
    DSL for test-time fault injection (``emulator['patch', kmock.resource(...)] << 500``):
    such user reactions take precedence; everything else is served by :class:`ApiCore`.
    """

    host: str = "127.0.0.1"
    port: int = 0
    log_dir: Path | None = None
    bookmark_interval: float = 60.0
    history_size: int = 10000
    log_poll_interval: float = 0.1
    kopf_peering_crds: bool = True
    # The cluster-admin's bearer token and the service-account token signing key (auth.py):
    # random unless given (a cluster that keeps its state keeps them too).
    admin_token: str = attrs.field(factory=auth.new_secret)
    signing_key: str = attrs.field(factory=auth.new_secret)
    # https with a private CA (tls.py: kubectl sends tokens only over TLS); the CA and serving
    # certificate are kept in pki_dir when given, else made for this run only.
    pki_dir: Path | None = None
    # The SQLite database that keeps the cluster's state across restarts; None: memory only.
    state_path: Path | None = None
    # Called with (user name, method, path, query) for every authenticated request: how tests
    # and benchmarks count one client's requests (e.g. the operator's, by its ServiceAccount).
    request_observers: list[Callable[[str, str, str, Mapping[str, str]], None]] = attrs.field(
        factory=list
    )

    def __attrs_post_init__(self) -> None:
        # kmock's own fallback reactions are deliberately not registered: ApiCore replaces them.
        preinstalled = (
            [as_applied(crd) for crd in KOPF_PEERING_CRDS] if self.kopf_peering_crds else []
        )
        self.core = ApiCore(self.history_size, preinstalled, self.state_path)
        self.access = AccessControl(self.core, self.admin_token, self.signing_key)
        self.core.admission.append(self.access.admit)
        self.core.admission.append(
            PodSecurityAdmission(
                lambda name: self.core.store.get(("", "namespaces"), "", name),
                lambda namespace: self.core.store.list(("", "pods"), namespace),
            ).admit
        )
        self.core.admission.append(PolicyAdmission(self.core).admit)
        self.core.on_created.append(self._on_created)
        self.access.bootstrap()
        self.core.store.compact()
        self._runner: aiohttp.web.ServerRunner | None = None
        self._stopping = asyncio.Event()
        self._bound_port: int | None = None
        self.ca_pem: bytes = b""

    # ------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:  # type: ignore[override]
        if self._bound_port is None:
            raise RuntimeError("the emulator is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self._bound_port}"

    async def start(self) -> None:
        await self.__aenter__()  # kmock: the stream feeder and error accounting
        self._stopping = asyncio.Event()
        server = aiohttp.web.Server(
            self, handler_cancellation=True, request_factory=self._make_request
        )
        self._runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        certificate = tls.serving_certificate(self.host, self.pki_dir)
        self.ca_pem = certificate.ca_pem
        ssl_context = certificate.server_context()
        if self.pki_dir is None:
            shutil.rmtree(certificate.directory, ignore_errors=True)
        site = aiohttp.web.TCPSite(self._runner, self.host, self.port, ssl_context=ssl_context)
        await site.start()
        self._bound_port = self._runner.addresses[0][1]

    @staticmethod
    def _make_request(*args: Any) -> aiohttp.web.BaseRequest:
        # The apiserver reads bodies up to 3 MiB (MaxRequestBodyBytes); aiohttp stops at 1 MiB,
        # which would refuse a ConfigMap that validation must see (its own limit is 1 MiB of data).
        loop = asyncio.get_running_loop()
        return aiohttp.web.BaseRequest(*args, loop, client_max_size=3 * 1024 * 1024)

    async def stop(self) -> None:
        self._stopping.set()
        self.core.store.close_all()
        try:
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None
            await self.__aexit__(None, None, None)
        finally:
            self.core.store.close()  # no request is served any more: release the database

    # ------------------------------------------------------------ kmock entry points
    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        body = await raw.read()
        route = parse_route(raw.path)
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        action = None
        if route is not None and route.plural:
            get = raw.method == "GET"
            action = (
                kmock.action.WATCH
                if get and _truthy(raw.query.get("watch"))
                else kmock.action.FETCH
                if get and route.name
                else kmock.action.LIST
                if get
                else kmock.action.CREATE
                if raw.method == "POST"
                else kmock.action.DELETE
                if raw.method == "DELETE"
                else kmock.action.UPDATE
                if raw.method in ("PATCH", "PUT")
                else None
            )
        request = kmock.Request(
            id=len(self._requests),
            raw_request=raw,
            url=raw.url,
            method=raw.method,
            params=dict(raw.query),
            headers=dict(raw.headers),
            cookies=dict(raw.cookies),
            body=body,
            text=body.decode("utf-8", "replace"),
            data=data,
            action=action,
            resource=kmock.resource(route.group, route.version, route.plural)
            if route and route.plural
            else None,
            namespace=route.namespace if route else None,
            name=route.name if route else None,
            subresource=route.subresource if route else None,
        )
        # Bounded request records: a long-running local cluster must not grow without limit.
        if len(self._requests) > 5000:
            del self._requests[:2500]
        self._requests.append(request)
        return await self._handle(request)

    def _on_created(self, rt: ResourceType, obj: dict[str, Any]) -> None:
        if rt.kind == "Namespace" and not rt.group:
            self.access.ensure_default_service_account(obj)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        assert raw is not None
        try:
            check_transport(raw.headers, allowed_hosts(self.host, self._bound_port or self.port))
            user = self.access.check_request(raw.method, raw.path, raw.query, raw.headers)
        except ApiError as exc:
            return _json(exc.status(), exc.code)
        for observe in self.request_observers:
            observe(user.name, raw.method, raw.path, raw.query)
        current = auth.current_user.set(user)
        options = request_options.set(RequestOptions(dry_run="dryRun" in raw.query))
        try:
            return await self._handle_as_user(request, user)
        finally:
            request_options.reset(options)
            auth.current_user.reset(current)

    async def _handle_as_user(
        self, request: kmock.Request, user: auth.UserInfo
    ) -> aiohttp.web.StreamResponse:
        try:
            try:
                return await kmock.RawHandler._handle(self, request)  # user reactions, if any match
            except NotImplementedError:
                pass
            return await self._serve(request, user)
        except ApiError as exc:
            return _json(exc.status(), exc.code)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an emulator bug must still look like an apiserver error
            logger.exception("emulator failure on %s %s", request.method, request.url)
            return _json(ApiError(500, f"{type(exc).__name__}: {exc}").status(), 500)

    # ------------------------------------------------------------ routing
    async def _serve(
        self, request: kmock.Request, user: auth.UserInfo
    ) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        assert raw is not None
        path = raw.path.rstrip("/") or "/"
        if path in ("/healthz", "/readyz", "/livez") or path.startswith(
            ("/healthz/", "/readyz/", "/livez/")
        ):
            return aiohttp.web.Response(text="ok")
        if path == "/version":
            return _json(VERSION_INFO)
        if path == "/":
            return _json(
                {
                    "paths": [
                        "/api",
                        "/api/v1",
                        "/apis",
                        "/healthz",
                        "/livez",
                        "/openapi/v2",
                        "/openapi/v3",
                        "/readyz",
                        "/version",
                    ]
                }
            )
        if path.startswith("/openapi/"):
            return self._serve_openapi(path, raw.headers.get("Accept", ""))
        route = parse_route(path)
        if route is None:
            raise ApiError(404, "the server could not find the requested resource", "NotFound", {})
        if route.plural is None:
            return self._serve_discovery(route)
        assert route.version is not None
        served = self.access.serve(
            raw.method,
            route.group,
            route.namespace,
            route.plural,
            route.name,
            route.subresource,
            lambda: self._body(request),
            user,
        )
        if served is not None:
            return _json(*served)
        rt = self.core.rt(route.group, route.version, route.plural)
        if rt.namespaced is False and route.namespace:
            raise ApiError(404, "the server could not find the requested resource", "NotFound", {})
        if route.subresource and not (
            (route.subresource == "status" and rt.status_subresource)
            or (route.subresource == "log" and rt.log_subresource)
            or (route.subresource in ("binding", "eviction") and rt.kind == "Pod" and not rt.group)
        ):
            raise ApiError(404, "the server could not find the requested resource", "NotFound", {})
        method = raw.method
        query = raw.query
        if route.subresource == "log":
            if method != "GET":
                raise ApiError(405, f"{method} is not supported on pods/log", "MethodNotAllowed")
            return await self._serve_log(raw, rt, route.namespace or "", route.name or "")
        if route.subresource == "eviction":
            if method != "POST":
                raise ApiError(
                    405, f"{method} is not supported on pods/eviction", "MethodNotAllowed"
                )
            status = eviction.evict(
                self.core,
                rt,
                route.namespace or "",
                route.name or "",
                self._body(request),
                "dryRun" in query,
            )
            return _json(status, 201)
        if route.subresource == "binding":
            if method != "POST":
                raise ApiError(
                    405, f"{method} is not supported on pods/binding", "MethodNotAllowed"
                )
            self.core.bind(route.namespace or "", route.name or "", self._body(request))
            return _json(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "code": 201,
                },
                201,
            )
        warnings = request_warnings()  # admission policies add theirs (Warn) to the same list
        strict = query.get("fieldValidation") == "Strict"
        dry_run = "dryRun" in query
        if method == "GET" and _truthy(query.get("watch")):
            return await self._serve_watch(raw, rt, route)
        if method == "GET" and route.name is None:
            match_label = parse_label_selector(query.get("labelSelector"))
            match_field = parse_field_selector(query.get("fieldSelector"))
            items = self.core.list(rt, route.namespace, lambda o: match_label(o) and match_field(o))
            return self._respond_list(raw, rt, items)
        if method == "GET":
            obj = self.core.get(rt, route.namespace, route.name or "")
            if tables.wants_table(raw.headers.get("Accept", "")):
                return _json(
                    tables.to_table(
                        rt,
                        [obj],
                        query.get("includeObject", "PartialObjectMetadata"),
                        obj["metadata"]["resourceVersion"],
                    )
                )
            return _json(obj)
        if method == "POST" and route.name is None:
            obj = self.core.create(
                rt,
                route.namespace,
                self._body(request),
                dry_run=dry_run,
                strict=strict,
                warnings=warnings,
            )
            return _json(obj, 201, self._warning_headers(warnings))
        if method == "PUT" and route.name:
            obj = self.core.update(
                rt,
                route.namespace,
                route.name,
                self._body(request),
                subresource=route.subresource,
                dry_run=dry_run,
                strict=strict,
                warnings=warnings,
            )
            return _json(obj, 200, self._warning_headers(warnings))
        if method == "PATCH" and route.name:
            content_type = raw.headers.get("Content-Type", "").split(";")[0].strip()
            if content_type not in PATCH_TYPES:
                raise ApiError(
                    415,
                    f"the body of the request was in an unknown format - accepted media types include: {', '.join(sorted(PATCH_TYPES))}",
                    "UnsupportedMediaType",
                )
            obj, created = self.core.patch(
                rt,
                route.namespace,
                route.name,
                self._body(request, content_type),
                content_type,
                subresource=route.subresource,
                dry_run=dry_run,
                strict=strict,
                field_manager=query.get("fieldManager"),
                warnings=warnings,
            )
            return _json(obj, 201 if created else 200, self._warning_headers(warnings))
        if method == "DELETE":
            options = self._delete_options(request)
            if route.name:
                return _json(self.core.delete(rt, route.namespace, route.name, options))
            match_label = parse_label_selector(query.get("labelSelector"))
            match_field = parse_field_selector(query.get("fieldSelector"))
            items = self.core.delete_collection(
                rt, route.namespace, lambda o: match_label(o) and match_field(o), options
            )
            return _json(
                {
                    "kind": f"{rt.kind}List",
                    "apiVersion": rt.api_version,
                    "metadata": {"resourceVersion": str(self.core.store.rv)},
                    "items": items,
                }
            )
        raise ApiError(
            405,
            f"the server does not allow this method on the requested resource ({method})",
            "MethodNotAllowed",
        )

    def _body(self, request: kmock.Request, content_type: str = "") -> Any:
        """The request body as JSON data: by Content-Type (JSON, YAML or protobuf; 415 for
        others: see bodies.py), or as the given PATCH type."""
        if not content_type:  # the media type is negotiated before the body is read
            return bodies.decode_body(
                request.body, request.headers.get("Content-Type", ""), self._endpoint_kind(request)
            )
        if not request.body:
            raise bad_request("the request body is empty")
        try:
            if content_type == "application/apply-patch+yaml":
                return bodies.load_yaml(request.body)
            return json.loads(request.body)
        except (ValueError, yaml.YAMLError) as exc:
            raise ApiError(
                400, f"the request body could not be decoded as JSON: {exc}", "BadRequest"
            ) from exc

    def _endpoint_kind(self, request: kmock.Request) -> str:
        """The kind a body sent to this URL should be, for error messages ("" when unknown)."""
        if request.resource is None or request.subresource not in (None, "status"):
            return ""
        with contextlib.suppress(ApiError):
            resource = request.resource
            return self.core.rt(resource.group, resource.version, resource.plural).kind
        return ""

    def _delete_options(self, request: kmock.Request) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if request.body:  # JSON, YAML or protobuf (client-go's typed Delete); else ignored
            with contextlib.suppress(ApiError, ValueError, TypeError):
                content_type = request.headers.get("Content-Type", "")
                options = dict(bodies.decode_body(request.body, content_type) or {})
        query = request._raw_request.query if request._raw_request is not None else {}
        if "gracePeriodSeconds" in query:
            options["gracePeriodSeconds"] = int(query["gracePeriodSeconds"])
        if "propagationPolicy" in query:
            options["propagationPolicy"] = query["propagationPolicy"]
        if "orphanDependents" in query:
            options["orphanDependents"] = _truthy(query["orphanDependents"])
        return options

    @staticmethod
    def _warning_headers(warnings: list[str]) -> dict[str, str] | None:
        if not warnings:
            return None

        # RFC 7234 warn-text is a quoted-string, as the apiserver writes it (apimachinery's
        # util/net NewWarningHeader): quotes and backslashes escaped (PodSecurity's have quotes).
        def quoted(text: str) -> str:
            text = text.replace("\n", " ").replace("\\", "\\\\").replace('"', '\\"')
            return f'"{text}"'

        return {"Warning": ", ".join(f"299 - {quoted(w)}" for w in warnings)}

    def _respond_list(
        self, raw: aiohttp.web.BaseRequest, rt: ResourceType, items: list[dict[str, Any]]
    ) -> aiohttp.web.Response:
        rv = str(self.core.store.rv)
        if tables.wants_table(raw.headers.get("Accept", "")):
            return _json(
                tables.to_table(
                    rt, items, raw.query.get("includeObject", "PartialObjectMetadata"), rv
                )
            )
        return _json(
            {
                "kind": f"{rt.kind}List",
                "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": rv},
                "items": items,
            }
        )

    # ------------------------------------------------------------ discovery & openapi
    def _serve_discovery(self, route: Route) -> aiohttp.web.Response:
        registry = self.core.registry
        body: dict[str, Any] | None
        if route.group == "*":
            body = registry.api_group_list()
        elif route.version is None:
            body = registry.api_versions() if route.group == "" else registry.api_group(route.group)
        else:
            body = registry.resource_list(route.group, route.version)
        if body is None:
            raise ApiError(404, "the server could not find the requested resource", "NotFound", {})
        return _json(body)

    def _serve_openapi(self, path: str, accept: str) -> aiohttp.web.Response:
        """Honours Accept as a real server does: JSON when acceptable, the v2 document as
        protobuf when only that is (client-go's OpenAPISchema), 406 otherwise."""
        registry = self.core.registry
        doc: dict[str, Any] | None
        if path == "/openapi/v2":
            doc, protobuf = openapi.v2_doc(registry), openapi.V2_PROTOBUF
        elif path == "/openapi/v3":
            doc, protobuf = openapi.v3_root(registry), None
        else:
            parts = path.removeprefix("/openapi/v3/").split("/")
            doc, protobuf = None, None
            if parts[0] == "api" and len(parts) == 2:
                doc = openapi.group_version_doc(registry, "", parts[1])
            elif parts[0] == "apis" and len(parts) == 3:
                doc = openapi.group_version_doc(registry, parts[1], parts[2])
        if doc is None:
            raise ApiError(404, "the server could not find the requested resource", "NotFound", {})
        media_type = openapi.negotiate(accept, protobuf)
        if media_type is None:
            raise ApiError(
                406,
                f"only the following media types are accepted: application/json{', ' + protobuf if protobuf else ''}",
                "NotAcceptable",
                {},
            )
        if media_type == openapi.V2_PROTOBUF:
            # As kube-openapi answers: "@" is not a token character for Go's mime parser.
            return aiohttp.web.Response(
                body=openapi.v2_protobuf(doc),
                content_type="application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
            )
        return _json(doc)

    # ------------------------------------------------------------ watch
    def _watch_view(
        self, event: Event, rt: ResourceType, route: Route, match: Any
    ) -> tuple[str, dict[str, Any]] | None:
        """Translate a storage event into what this (filtered) watch sees, as the watch cache does."""
        if event.key != self.core._storage_key(rt):
            return None
        obj = self.core.present(rt, event.obj)
        if route.namespace and obj["metadata"].get("namespace") != route.namespace:
            return None
        if route.name and obj["metadata"]["name"] != route.name:
            return None
        now_matches = match(obj)
        if event.type == "DELETED":
            return (
                ("DELETED", obj) if match(self.core.present(rt, event.old or event.obj)) else None
            )
        was_matching = event.old is not None and match(self.core.present(rt, event.old))
        if event.type == "ADDED" or not was_matching:
            return ("ADDED", obj) if now_matches else None
        return ("MODIFIED", obj) if now_matches else ("DELETED", obj)

    async def _serve_watch(
        self, raw: aiohttp.web.BaseRequest, rt: ResourceType, route: Route
    ) -> aiohttp.web.StreamResponse:
        query = raw.query
        match_label = parse_label_selector(query.get("labelSelector"))
        match_field = parse_field_selector(query.get("fieldSelector"))

        def match(obj: dict[str, Any]) -> bool:
            return match_label(obj) and match_field(obj)

        since = query.get("resourceVersion") or ""
        if since not in ("", "0") and not since.isdigit():
            raise bad_request(f"invalid resource version: {since!r}")
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        as_table = tables.wants_table(raw.headers.get("Accept", ""))
        include = query.get("includeObject", "PartialObjectMetadata")
        store = self.core.store

        response = aiohttp.web.StreamResponse(
            status=200, headers={"Content-Type": "application/json"}
        )
        await response.prepare(raw)
        queue = store.subscribe()

        async def send(kind: str, obj: dict[str, Any]) -> None:
            if as_table and kind in ("ADDED", "MODIFIED", "DELETED"):
                obj = tables.to_table(rt, [obj], include, obj["metadata"]["resourceVersion"])
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        def bookmark() -> dict[str, Any]:
            return {
                "kind": rt.kind,
                "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(store.rv)},
            }

        try:
            if since in ("", "0"):
                # No version: a synthetic ADDED for every current object, then live events.
                initial = [
                    (("ADDED", obj))
                    for obj in self.core.list(rt, route.namespace, match)
                    if route.name is None or obj["metadata"]["name"] == route.name
                ]
                last = store.rv
            elif int(since) < store.compacted_rv:
                await response.write(
                    json.dumps(
                        {
                            "type": "ERROR",
                            "object": {
                                "kind": "Status",
                                "apiVersion": "v1",
                                "metadata": {},
                                "status": "Failure",
                                "message": f"too old resource version: {since} ({store.compacted_rv})",
                                "reason": "Expired",
                                "code": 410,
                            },
                        }
                    ).encode()
                    + b"\n"
                )
                await response.write_eof()
                return response
            else:
                initial = [
                    view
                    for e in list(store.history)
                    if e.rv > int(since)
                    if (view := self._watch_view(e, rt, route, match)) is not None
                ]
                last = store.rv
            for kind, obj in initial:
                await send(kind, obj)
            started = time.monotonic()
            deadline = started + timeout if timeout is not None else None
            next_bookmark = started + self.bookmark_interval
            while not self._stopping.is_set():
                wake = next_bookmark if deadline is None else min(next_bookmark, deadline)
                try:
                    event = await asyncio.wait_for(queue.get(), max(wake - time.monotonic(), 0))
                except TimeoutError:
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        if bookmarks:  # like the watch cache: one last bookmark before closing
                            await send("BOOKMARK", bookmark())
                        break
                    if bookmarks:
                        await send("BOOKMARK", bookmark())
                    next_bookmark = now + self.bookmark_interval
                    continue
                if event is None:
                    break
                if event.rv <= last:
                    continue  # already replayed from history or covered by the initial listing
                view = self._watch_view(event, rt, route, match)
                if view is not None:
                    await send(*view)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            store.unsubscribe(queue)
        return response

    # ------------------------------------------------------------ pod logs
    @staticmethod
    def _default_log_container(pod: dict[str, Any]) -> str:
        """The container when none is named (pkg/registry/core/pod/strategy.go LogLocation)."""
        spec = pod.get("spec") or {}
        containers = [c["name"] for c in spec.get("containers") or []]
        name = pod["metadata"]["name"]
        if len(containers) == 1:
            return containers[0]
        if not containers:
            raise bad_request(f"a container name must be specified for pod {name}")
        message = f"a container name must be specified for pod {name}, choose one of: [{' '.join(containers)}]"
        inits = [c["name"] for c in spec.get("initContainers") or []]
        if inits:
            message += f" or one of the init containers: [{' '.join(inits)}]"
        raise bad_request(message)

    async def _serve_log(
        self, raw: aiohttp.web.BaseRequest, rt: ResourceType, namespace: str, name: str
    ) -> aiohttp.web.StreamResponse:
        """pods/{name}/log from the files the local node writes (see node_logs)."""
        pod = self.core.get(rt, namespace, name)
        spec = pod.get("spec") or {}
        names = [
            c["name"] for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])
        ]
        opts, causes = node_logs.parse_options(raw.query, time.time())
        if causes:
            raise errors.invalid("PodLogOptions", "", "", causes)
        container = opts.container or self._default_log_container(pod)
        if container not in names:
            raise bad_request(f"container {container} is not valid for pod {name}")
        instance, problem = node_logs.choose_instance(pod, container, opts.previous)
        if problem is not None or instance is None or self.log_dir is None:
            raise bad_request(problem or f"container {container!r} in pod {name!r} has no logs")
        uid = pod["metadata"]["uid"]
        path = node_logs.container_log_path(self.log_dir, namespace, name, uid, container, instance)
        data = b""
        with contextlib.suppress(OSError):
            data = path.read_bytes()
        whole, rest = node_logs.complete_part(data)
        if not opts.follow:
            # a file that is no longer written: its unterminated end is output too
            body = node_logs.render(whole + (rest + b"\n" if rest else b""), opts)
            if opts.limit_bytes is not None:
                body = body[: opts.limit_bytes]
            return aiohttp.web.Response(body=body, content_type="text/plain")
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        await response.prepare(raw)
        budget = opts.limit_bytes
        offset = len(whole)
        chunk = node_logs.render(whole, opts)
        try:
            while True:
                if chunk:
                    if budget is not None:
                        chunk = chunk[:budget]
                        budget -= len(chunk)
                    await response.write(chunk)
                if budget == 0 or self._stopping.is_set():
                    break
                current = self.core.store.get(("", "pods"), namespace, name)
                running = node_logs.instance_running(current, uid, container, instance)
                if running:
                    await asyncio.sleep(self.log_poll_interval)
                new = b""
                with contextlib.suppress(OSError), path.open("rb") as f:
                    f.seek(offset)
                    new = f.read()
                whole, rest = node_logs.complete_part(new)
                if not running:  # that run ended: send what is left and stop, as the kubelet does
                    chunk = node_logs.render(
                        whole + (rest + b"\n" if rest else b""), opts, tail=False
                    )
                    if chunk and budget is not None:
                        chunk = chunk[:budget]
                    if chunk:
                        await response.write(chunk)
                    break
                offset += len(whole)
                chunk = node_logs.render(whole, opts, tail=False)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return response
