"""State that survives a restart of the API emulator, as etcd gives a real cluster.

These restart the server itself, so they run against the emulator only (a real cluster's
control plane cannot be restarted from a test). What they check is what a real apiserver
guarantees across its own restarts, because its state lives in etcd:

- objects keep their uid, resourceVersion, generation and creationTimestamp, and the
  resourceVersion sequence continues, never reused: resource versions are etcd revisions,
  which etcd keeps across restarts (API concepts, "Resource versions",
  https://kubernetes.io/docs/reference/using-api/api-concepts/#resource-versions);
- the watch cache starts empty, so a watch from a version older than the restart gets
  410 Gone with reason Expired, "too old resource version: ...", and clients must relist
  (api-concepts, "Efficient detection of changes"; staging/src/k8s.io/apiserver/pkg/storage/
  cacher/watch_cache.go returns errors.NewResourceExpired);
- CRDs are served again from their stored objects (apiextensions-apiserver builds its
  handlers from the CRDs it lists at start);
- the system namespaces exist once (pkg/controlplane/controller/systemnamespaces ensures
  them), and what a user deleted stays deleted.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sftjob_local.emulator import EmulatorThread
from sftjob_local.emulator.statedb import StateLocked

pytestmark = [pytest.mark.local, pytest.mark.timeout(60)]

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
GROUP = "persist.sftjob.dev"


class Api:
    """HTTPS to one emulator as its admin (JSON in, JSON out, errors as (status, body))."""

    def __init__(self, url: str, token: str, ca_pem: bytes) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}
        self.tls = ssl.create_default_context(cadata=ca_pem.decode())

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **self.headers},
        )
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.tls) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, data = self.request(method, path, body)
        assert 200 <= status < 300, (status, data)
        return data

    def watch(self, path: str, since: str, timeout: int = 1) -> list[dict[str, Any]]:
        query = f"?watch=true&resourceVersion={since}&timeoutSeconds={timeout}"
        req = urllib.request.Request(self.url + path + query, headers=self.headers)
        with urllib.request.urlopen(req, timeout=timeout + 10, context=self.tls) as response:
            return [json.loads(line) for line in response.read().splitlines() if line.strip()]


@contextmanager
def emulator(state: Path | None, **kwargs: Any) -> Iterator[Api]:
    with EmulatorThread(state_path=state, **kwargs) as server:
        assert server.emulator is not None
        yield Api(server.url, server.emulator.admin_token, server.emulator.ca_pem)


def cm_path(name: str = "") -> str:
    return "/api/v1/namespaces/default/configmaps" + (f"/{name}" if name else "")


def widget_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "size": {"type": "integer", "default": 3},
                                    },
                                },
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },  # fmt: skip
                            },
                        }
                    },
                }
            ],
        },
    }


WIDGETS = f"/apis/{GROUP}/v1/namespaces/default/widgets"


def new_widget(name: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": {}}


def identity(obj: dict[str, Any]) -> tuple[Any, ...]:
    meta = obj["metadata"]
    return (meta["uid"], meta["resourceVersion"], meta.get("generation"), meta["creationTimestamp"])


def test_objects_keep_uid_version_and_generation_across_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    with emulator(state) as api:
        api.ok("POST", cm_path(), {"metadata": {"name": "kept"}, "data": {"a": "1"}})
        kept = api.ok("PUT", cm_path("kept"), {**api.ok("GET", cm_path("kept")), "data": {"a": "2"}})  # fmt: skip
        api.ok("POST", cm_path(), {"metadata": {"name": "gone"}})
        api.ok("DELETE", cm_path("gone"))
        before_list = api.ok("GET", cm_path())["metadata"]["resourceVersion"]

    with emulator(state) as api:
        after = api.ok("GET", cm_path("kept"))
        assert identity(after) == identity(kept)
        assert after["data"] == {"a": "2"}
        assert api.request("GET", cm_path("gone"))[0] == 404
        # The version sequence continues past every version handed out, deletions included.
        listing = api.ok("GET", cm_path())
        assert listing["metadata"]["resourceVersion"] == before_list
        created = api.ok("POST", cm_path(), {"metadata": {"name": "new"}})
        assert int(created["metadata"]["resourceVersion"]) > int(before_list)
        # Optimistic concurrency still holds against the restored version.
        stale = {**after, "metadata": {**after["metadata"], "resourceVersion": "1"}}
        assert api.request("PUT", cm_path("kept"), stale)[0] == 409


def test_resource_version_after_restart_is_above_a_deletions_version(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    with emulator(state) as api:
        api.ok("POST", cm_path(), {"metadata": {"name": "x"}})
        api.ok("DELETE", cm_path("x"))
        # The deletion consumed a version that no stored object carries.
        last = int(api.ok("GET", cm_path())["metadata"]["resourceVersion"])
    with emulator(state) as api:
        created = api.ok("POST", cm_path(), {"metadata": {"name": "y"}})
        assert int(created["metadata"]["resourceVersion"]) == last + 1


def test_custom_resources_are_served_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    with emulator(state) as api:
        crd = api.ok("POST", CRDS, widget_crd())
        widget = api.ok("POST", WIDGETS, new_widget("w1"))
        assert widget["spec"] == {"size": 3}, widget

    with emulator(state) as api:
        assert identity(api.ok("GET", f"{CRDS}/widgets.{GROUP}"))[0] == crd["metadata"]["uid"]
        assert identity(api.ok("GET", f"{WIDGETS}/w1")) == identity(widget)
        discovery = api.ok("GET", f"/apis/{GROUP}/v1")
        assert "widgets" in [r["name"] for r in discovery["resources"]]
        # The schema is back too: defaults are applied to a new object.
        created = api.ok("POST", WIDGETS, new_widget("w2"))
        assert created["spec"] == {"size": 3}


def test_watch_from_before_the_restart_is_expired_and_from_a_new_list_works(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state.db"
    with emulator(state) as api:
        old = api.ok("GET", cm_path())["metadata"]["resourceVersion"]
        api.ok("POST", cm_path(), {"metadata": {"name": "a"}})
    with emulator(state) as api:
        events = api.watch(cm_path(), old)
        assert len(events) == 1 and events[0]["type"] == "ERROR", events
        error = events[0]["object"]
        assert (error["code"], error["reason"]) == (410, "Expired"), error
        assert error["message"].startswith(f"too old resource version: {old} "), error
        # Relisting gives a version to watch from: later changes arrive.
        since = api.ok("GET", cm_path())["metadata"]["resourceVersion"]
        api.ok("POST", cm_path(), {"metadata": {"name": "b"}})
        events = api.watch(cm_path(), since)
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b")]


def test_bootstrap_objects_are_not_made_twice_and_deleted_ones_stay_deleted(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state.db"
    with emulator(state) as api:
        namespaces = {n["metadata"]["name"]: identity(n) for n in api.ok("GET", "/api/v1/namespaces")["items"]}  # fmt: skip
        crds = sorted(c["metadata"]["name"] for c in api.ok("GET", CRDS)["items"])
        assert crds == ["clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"]
        api.ok("DELETE", f"{CRDS}/kopfpeerings.kopf.dev")
    with emulator(state) as api:
        again = {n["metadata"]["name"]: identity(n) for n in api.ok("GET", "/api/v1/namespaces")["items"]}  # fmt: skip
        assert again == namespaces
        crds = sorted(c["metadata"]["name"] for c in api.ok("GET", CRDS)["items"])
        assert crds == ["clusterkopfpeerings.kopf.dev"]


def test_service_addresses_are_not_handed_out_twice_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    svc = "/api/v1/namespaces/default/services"

    def service(name: str) -> dict[str, Any]:
        return {"metadata": {"name": name}, "spec": {"ports": [{"port": 80}]}}

    with emulator(state) as api:
        first = api.ok("POST", svc, service("first"))["spec"]["clusterIP"]
    with emulator(state) as api:
        second = api.ok("POST", svc, service("second"))["spec"]["clusterIP"]
    assert first != second


def test_without_a_database_nothing_is_kept() -> None:
    with emulator(None) as api:
        api.ok("POST", cm_path(), {"metadata": {"name": "lost"}})
    with emulator(None) as api:
        assert api.request("GET", cm_path("lost"))[0] == 404


def test_a_second_server_on_the_same_database_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    with emulator(state) as api:
        api.ok("POST", cm_path(), {"metadata": {"name": "mine"}})
        with pytest.raises(StateLocked, match="in use by another local control plane"):
            EmulatorThread(state_path=state).start()
        api.ok("GET", cm_path("mine"))  # the first one is unaffected


def test_workdir_secrets_are_created_once_private_and_read_back(tmp_path: Path) -> None:
    from sftjob_local.persistence import persistent_secret, state_db_path

    first = persistent_secret(tmp_path, "admin-token")
    assert len(first) >= 40
    assert persistent_secret(tmp_path, "admin-token") == first  # a restart reads it back
    assert persistent_secret(tmp_path, "signing-key") != first
    path = tmp_path / "secrets" / "admin-token"
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["admin-token", "signing-key"]
    with pytest.raises(ValueError):
        persistent_secret(tmp_path, "../escape")
    assert state_db_path(tmp_path) == tmp_path / "state.db"
