"""Fixtures for the local control plane suite: the API emulator by default, or a real cluster.

Set ``SFTJOB_E2E_KUBECONFIG`` to run the very same probes against a real cluster; each session
then works in a throwaway namespace ``sftjob-conf-<random>`` that is deleted at the end.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from sftjob_local.emulator import EmulatorThread

REAL_KUBECONFIG = os.environ.get("SFTJOB_E2E_KUBECONFIG")


class Cluster:
    """One API server as the probes see it: raw HTTP through the kubernetes client's transport."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        emulator: EmulatorThread | None,
        log_dir: Path | None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.emulator = emulator
        self.log_dir = log_dir
        self.api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.api)

    @property
    def emulated(self) -> bool:
        return self.emulator is not None

    def require_emulator(self, why: str) -> None:
        """Skip a probe that needs emulator internals — only ever in real-cluster mode."""
        if not self.emulated:
            pytest.skip(f"emulator-only probe: {why}")

    def _send(
        self,
        method: str,
        path: str,
        body: Any,
        query: dict[str, Any],
        headers: dict[str, str],
        timeout: float,
    ) -> Any:
        # The client's own serialisation, auth and TLS: the same transport in both modes.
        method, url, headers, body, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query.items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        return self.api.call_api(
            method, url, header_params=headers, body=body, _request_timeout=timeout
        )

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, Any] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> tuple[int, Any]:
        """Send one request; return (HTTP status, decoded JSON or text) — errors included."""
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        response = self._send(method, path, body, query or {}, headers, timeout=30)
        status, data = response.status, response.read()
        text = data.decode() if isinstance(data, bytes) else data
        try:
            return status, json.loads(text)
        except (TypeError, ValueError):
            return status, text

    def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        status, data = self.request(method, path, body, **kwargs)
        assert 200 <= status < 300, (status, data)
        return data

    def watch(
        self, path: str, query: dict[str, Any], *, max_events: int = 100, timeout: float = 10
    ) -> list[dict[str, Any]]:
        """Read watch events until ``max_events`` arrived or the server closed the stream."""
        response = self._send(
            "GET",
            path,
            None,
            {"watch": "true", **query},
            {"Accept": "application/json"},
            timeout=timeout,
        ).response
        events: list[dict[str, Any]] = []
        buffer = b""
        try:
            for chunk in response.stream(1024, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        events.append(json.loads(line))
                    if len(events) >= max_events:
                        return events
        finally:
            response.release_conn()
        return events

    def wait_for(self, predicate: Any, timeout: float = 10, interval: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            time.sleep(interval)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("local-cluster")
    namespace = f"sftjob-conf-{secrets.token_hex(3)}"
    if REAL_KUBECONFIG:
        emulator, log_dir, kubeconfig = None, None, Path(REAL_KUBECONFIG)
    else:
        log_dir = workdir / "logs"
        emulator = EmulatorThread(log_dir=log_dir).start()
        kubeconfig = emulator.write_kubeconfig(workdir / "kubeconfig")
    cluster = Cluster(kubeconfig, namespace, emulator, log_dir)
    cluster.ok("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    try:
        yield cluster
    finally:
        cluster.request("DELETE", f"/api/v1/namespaces/{namespace}")
        if emulator is not None:
            emulator.stop()


@pytest.fixture
def ns(cluster: Cluster) -> str:
    return cluster.namespace


@pytest.fixture
def uniq() -> str:
    """A short random suffix so probes never collide on names."""
    return secrets.token_hex(3)


def widget_crd_body(
    group: str, plural: str = "widgets", kind: str = "Widget", short: str = "wg"
) -> dict[str, Any]:
    """A CRD exercising what the operator's CRD uses: status subresource, defaults, columns."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "plural": plural,
                "singular": kind.lower(),
                "kind": kind,
                "shortNames": [short],
                "categories": ["sftjob-test"],
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["size"],
                                    "properties": {
                                        "size": {"type": "integer", "minimum": 1},
                                        "color": {
                                            "type": "string",
                                            "enum": ["blue", "red"],
                                            "default": "blue",
                                        },
                                        "extra": {
                                            "type": "object",
                                            "x-kubernetes-preserve-unknown-fields": True,
                                        },
                                    },
                                },
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="session")
def crd_body():
    """The widget CRD builder, as a fixture: ``crd_body(group)``."""
    return widget_crd_body


class Widgets:
    def __init__(self, cluster: Cluster, group: str) -> None:
        self.cluster, self.group, self.plural = cluster, group, "widgets"
        self.crd_name = f"widgets.{group}"

    def path(self, name: str = "", sub: str = "") -> str:
        base = f"/apis/{self.group}/v1/namespaces/{self.cluster.namespace}/widgets"
        return base + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def create(self, name: str, spec: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        body = {
            "apiVersion": f"{self.group}/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": spec or {"size": 1},
            **extra,
        }
        return self.cluster.ok("POST", self.path(), body)


@pytest.fixture(scope="session")
def widgets(cluster: Cluster) -> Iterator[Widgets]:
    group = f"g{secrets.token_hex(3)}.test.sftjob.dev"
    crd = cluster.ok(
        "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", widget_crd_body(group)
    )

    def established() -> bool:
        status, obj = cluster.request(
            "GET",
            f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}",
        )
        conditions = (obj.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    cluster.wait_for(established, timeout=30)
    cluster.wait_for(lambda: cluster.request("GET", f"/apis/{group}/v1")[0] == 200, timeout=30)
    try:
        yield Widgets(cluster, group)
    finally:
        cluster.request(
            "DELETE",
            f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}",
        )


class _ServerFailures(logging.Handler):
    """Records what the emulator logs at ERROR: a refusal must be an answer, not a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_traceback_in_the_server_log() -> Iterator[None]:
    """Every probe's bad input gets a 4xx from the emulator, never an internal failure (it
    logs those with their traceback and answers 500)."""
    handler = _ServerFailures()
    emulator_log = logging.getLogger("sftjob_local.emulator")
    emulator_log.addHandler(handler)
    try:
        yield
    finally:
        emulator_log.removeHandler(handler)
    failures = [handler.format(r) for r in handler.records]
    assert not failures, "the emulator logged failures:\n" + "\n".join(failures)
