"""The one module of the operator that talks to the Kubernetes API.

Synchronous `kubernetes` client calls (the handlers run them in worker threads).
Objects go in and come out as plain dicts in the API's own camelCase, so the pure
core never sees client model classes. Creating is idempotent: on 409 AlreadyExists
the object is read back and reported as this job's (its controller ownerReference
names the job's uid: what a pass running twice expects) or another owner's (never
taken as success). Status patches carry the resourceVersion the pass read, so a pass
acting on a stale view (or on a deleted job's body, after a new job of the same name
appeared) gets 409 Conflict (`StaleStatus`) instead of writing.

`API_PERMISSIONS` lists every (group, resource, verb) used here; a test checks it
against the calls in this file and against the ClusterRole in deploy/.
`ADMISSION_PERMISSIONS` lists what admission requires on top of those calls.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import kubernetes
from kubernetes.client import ApiClient, ApiException

from .api import GROUP, PLURAL, VERSION
from .pod_state import owned_by
from .profile_api import PROFILE_PLURAL

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"

API_PERMISSIONS: dict[tuple[str, str], set[str]] = {
    ("", "configmaps"): {"create", "patch", "get"},
    ("", "serviceaccounts"): {"create", "get"},
    ("", "services"): {"create", "get", "patch"},
    ("", "pods"): {"create", "list", "delete", "get"},
    ("", "events"): {"create"},
    ("rbac.authorization.k8s.io", "roles"): {"create", "get"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"create", "get"},
    (GROUP, PLURAL): {"get", "list", "watch", "patch", "delete"},
    (GROUP, f"{PLURAL}/status"): {"patch"},
    # Profiles and namespace labels decide a job's policy before its launch (read-only).
    (GROUP, PROFILE_PLURAL): {"list"},
    ("", "namespaces"): {"get"},
}

# Permissions no call here uses but the API server's admission demands of these calls:
# children carry ownerReferences with blockOwnerDeletion: true (children.owner_reference),
# which OwnerReferencesPermissionEnforcement allows only with `update` on the owner's
# finalizers (plugin/pkg/admission/gc in kubernetes).
ADMISSION_PERMISSIONS: dict[tuple[str, str], set[str]] = {
    (GROUP, f"{PLURAL}/finalizers"): {"update"},
}

ErrorHook = Callable[[str], None]

# What a create found: made now, already there and this job's, or held by another owner.
CreateResult = Literal["created", "ours", "foreign"]
# Event names are DNS subdomains (metadata.name of a core/v1 Event): at most 253 characters.
EVENT_NAME_MAX = 253


class StaleStatus(Exception):
    """A status patch was refused with 409 Conflict: the job changed since the pass read it."""


def event_name(job_name: str, uid: str, reason: str, key: str) -> str:
    """A name that is the same each time one event (job uid, reason, key) is posted.

    `<job>.<16 hex>` like the names the kubelet and controllers give Events; posting the
    same event again is answered 409 AlreadyExists, so a pass repeated after a crash
    cannot post it twice. A DNS subdomain: what events.k8s.io/v1 requires of a name
    (ValidateEventCreate); core/v1's legacy validation is laxer, so it passes there too.
    """
    digest = hashlib.sha256(f"{uid}/{reason}/{key}".encode()).hexdigest()[:16]
    return f"{job_name[: EVENT_NAME_MAX - len(digest) - 1]}.{digest}"


def load_api_client(pool_size: int | None = None) -> ApiClient:
    """In-cluster service account when running in a pod, else KUBECONFIG / ~/.kube/config.

    `pool_size`: connections kept to the API server (urllib3's pool, 10 by default). Give it
    the number of threads that call at once, or the surplus opens and drops a connection
    per request ("Connection pool is full, discarding connection").
    """
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    if pool_size:
        configuration.connection_pool_maxsize = pool_size
    return ApiClient(configuration)


def _discard(response: Any) -> None:
    """Read and release a raw (`_preload_content=False`) response, so its connection is reused."""
    response.read()
    response.release_conn()


class Kube:
    def __init__(self, api_client: ApiClient, on_error: ErrorHook | None = None):
        self.client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self._on_error = on_error or (lambda verb: None)

    def _plain(self, obj: Any) -> dict[str, Any]:
        plain = self.client.sanitize_for_serialization(obj)
        return plain if isinstance(plain, dict) else {}

    # ----------------------------------------------------------------- children

    def create_if_absent(
        self, manifest: dict[str, Any], owner_uid: str | None = None
    ) -> CreateResult:
        """Create `manifest`; when its name is taken, whose the existing object is.

        "ours" when the existing object's controller ownerReference names `owner_uid`
        (default: the uid in the manifest's own controller reference), else "foreign".
        """
        kind = manifest["kind"]
        namespace = manifest["metadata"]["namespace"]
        name = manifest["metadata"]["name"]
        creators: dict[str, Callable[..., Any]] = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Service": self.core.create_namespaced_service,
            "Pod": self.core.create_namespaced_pod,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
        }
        readers: dict[str, Callable[..., Any]] = {
            "ConfigMap": self.core.read_namespaced_config_map,
            "ServiceAccount": self.core.read_namespaced_service_account,
            "Service": self.core.read_namespaced_service,
            "Pod": self.core.read_namespaced_pod,
            "Role": self.rbac.read_namespaced_role,
            "RoleBinding": self.rbac.read_namespaced_role_binding,
        }
        if owner_uid is None:
            references = manifest["metadata"].get("ownerReferences") or []
            owner_uid = next((r.get("uid") for r in references if r.get("controller")), None)
        try:
            # The created object is not read back: skipping the client's model deserialization
            # (about 9 ms of CPU for a Pod) halves the operator's CPU per job at scale.
            _discard(creators[kind](namespace, manifest, _preload_content=False))
            return "created"
        except ApiException as exc:
            if exc.status != 409:
                self._on_error(f"create {kind}")
                raise
        try:
            existing = self._plain(readers[kind](name, namespace))
        except ApiException as exc:
            if exc.status == 404:  # deleted between the create and the read: try next pass
                return "foreign"
            self._on_error(f"get {kind}")
            raise
        return "ours" if owned_by(existing, owner_uid) else "foreign"

    def patch_service_selector(self, namespace: str, name: str, selector: dict[str, str]) -> None:
        """Point the rendezvous Service at another attempt's rank 0."""
        try:
            self.core.patch_namespaced_service(
                name, namespace, {"spec": {"selector": selector}}, _content_type=MERGE_PATCH
            )
        except ApiException:
            self._on_error("patch Service")
            raise

    def patch_config_map_data(self, namespace: str, name: str, data: dict[str, str]) -> None:
        try:
            # This client defaults PATCH bodies to JSON Patch; a dict is a merge patch.
            self.core.patch_namespaced_config_map(
                name, namespace, {"data": data}, _content_type=MERGE_PATCH
            )
        except ApiException:
            self._on_error("patch ConfigMap")
            raise

    def read_config_map_data(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            config_map = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            self._on_error("get ConfigMap")
            raise
        return dict(config_map.data or {})

    def list_job_pods(self, namespace: str, job_name: str, label: str) -> list[dict[str, Any]]:
        try:
            pods = self.core.list_namespaced_pod(namespace, label_selector=f"{label}={job_name}")
        except ApiException:
            self._on_error("list Pod")
            raise
        return [self._plain(pod) for pod in pods.items]

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                self._on_error("delete Pod")
                raise

    # ----------------------------------------------------------------- policy inputs

    def list_profiles(self) -> list[dict[str, Any]]:
        """Every SFTProfile (cluster-scoped), as plain dicts."""
        try:
            found = self.custom.list_cluster_custom_object(GROUP, VERSION, PROFILE_PLURAL)
        except ApiException as exc:
            if exc.status == 404:  # the SFTProfile CRD is not installed: no profiles
                return []
            self._on_error("list SFTProfile")
            raise
        return list((found if isinstance(found, dict) else self._plain(found)).get("items") or [])

    def read_namespace_labels(self, namespace: str) -> dict[str, str] | None:
        """The labels of a namespace (what profiles select on); None when it is gone."""
        try:
            found = self.core.read_namespace(namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            self._on_error("get Namespace")
            raise
        return dict(found.metadata.labels or {})

    # ----------------------------------------------------------------- the SFTJob

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The SFTJob as the API server has it now; None when there is none of that name."""
        try:
            job = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            self._on_error("get SFTJob")
            raise
        return job if isinstance(job, dict) else self._plain(job)

    def patch_job_status(
        self,
        namespace: str,
        name: str,
        status: dict[str, Any],
        resource_version: str | None = None,
    ) -> str | None:
        """Merge `status` into the job's status; the new resourceVersion, None when gone (404).

        With `resource_version`, the patch applies only to that version of the job: the
        API server answers 409 Conflict otherwise (raised as StaleStatus). On /status a
        uid in the body would be no precondition (the status strategy copies the stored
        metadata over the patched one); a resourceVersion is checked first.
        """
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            patched = self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, body, _content_type=MERGE_PATCH
            )
        except ApiException as exc:
            if exc.status == 404:  # deleted meanwhile: nothing left to report on
                return None
            if exc.status == 409:
                raise StaleStatus(f"{namespace}/{name}") from None
            self._on_error("patch SFTJob status")
            raise
        metadata = (patched if isinstance(patched, dict) else self._plain(patched)).get(
            "metadata"
        ) or {}
        return str(metadata.get("resourceVersion") or "")

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                body={"propagationPolicy": "Background"},
            )
        except ApiException as exc:
            if exc.status != 404:
                self._on_error("delete SFTJob")
                raise

    def post_event(
        self,
        job: dict[str, Any],
        event_type: str,
        reason: str,
        message: str,
        key: str | None = None,
    ) -> None:
        """A core/v1 Event about the SFTJob, which `kubectl describe sft` lists.

        With `key`, the Event's name is derived from (job uid, reason, key): posting it
        again (a pass repeated after a crash) is a 409 and changes nothing.
        """
        metadata = job["metadata"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        naming = (
            {"name": event_name(metadata["name"], metadata.get("uid") or "", reason, key)}
            if key
            else {"generateName": f"{metadata['name']}."}
        )
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {**naming, "namespace": metadata["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "SFTJob",
                "name": metadata["name"],
                "namespace": metadata["namespace"],
                "uid": metadata.get("uid"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "sftjob-operator"},
            "reportingComponent": "sftjob-operator",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            _discard(
                self.core.create_namespaced_event(
                    metadata["namespace"], event, _preload_content=False
                )
            )
        except ApiException as exc:
            if exc.status == 409 and key:
                return  # posted before (a repeated pass): exactly once
            # Events are best effort; a lost one must not fail the reconcile.
            self._on_error("create Event")
            log.warning("could not post event %s for %s", reason, metadata["name"])


# ----------------------------------------------------------------- the CLI's log reader

# What `sftjob logs` and `sftjob plot` call, as a user's (or a tenant's) Role must grant it:
# the job, its pods (by label) and a pod's log. tests/unit/test_log_reader.py checks this
# against the calls LogReader makes.
LOG_READER_PERMISSIONS: dict[tuple[str, str], set[str]] = {
    (GROUP, PLURAL): {"get"},
    ("", "pods"): {"list"},
    ("", "pods/log"): {"get"},
}


def user_api_client(
    kubeconfig: str | None = None, context: str | None = None
) -> tuple[ApiClient, str]:
    """A client as kubectl makes one, and the namespace it defaults to.

    `kubeconfig`, else $KUBECONFIG (a list of files, merged), else ~/.kube/config; the
    `context`, else the current one; the namespace is the context's, else `default`. With
    no kubeconfig at all inside a pod, the pod's service account and namespace.
    """
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
        contexts, current = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
    except kubernetes.config.ConfigException:
        if kubeconfig or context:
            raise
        kubernetes.config.load_incluster_config(client_configuration=configuration)
        service_account = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        with open(service_account) as file:
            return ApiClient(configuration), file.read().strip() or "default"
    chosen = (
        next((c for c in contexts if c.get("name") == context), current) if context else current
    )
    namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
    return ApiClient(configuration), str(namespace)


class LogReader:
    """The reads of `sftjob logs` and `sftjob plot`: a job, its pods, a pod's log.

    Its own clients (not Kube's): the operator never reads logs, and its ClusterRole
    does not grant pods/log.
    """

    def __init__(self, api_client: ApiClient):
        self.client = api_client
        self.pod_api = kubernetes.client.CoreV1Api(api_client)
        self.job_api = kubernetes.client.CustomObjectsApi(api_client)

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The SFTJob; None when there is none of that name in the namespace."""
        try:
            job = self.job_api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        plain = job if isinstance(job, dict) else self.client.sanitize_for_serialization(job)
        return dict(plain)

    def list_job_pods(self, namespace: str, job_name: str, label: str) -> list[dict[str, Any]]:
        """The pods labelled as the job's (every attempt; the caller checks the owner)."""
        pods = self.pod_api.list_namespaced_pod(namespace, label_selector=f"{label}={job_name}")
        return [dict(self.client.sanitize_for_serialization(pod)) for pod in pods.items]

    def _log_response(
        self, namespace: str, pod: str, container: str, tail: int | None, follow: bool
    ) -> Any:
        options: dict[str, Any] = {"container": container, "follow": follow}
        if tail is not None:
            options["tail_lines"] = tail
        return self.pod_api.read_namespaced_pod_log(
            pod, namespace, _preload_content=False, **options
        )

    def read_log(self, namespace: str, pod: str, container: str, tail: int | None = None) -> bytes:
        """The container's log as the node has it now (bytes: a log need not be UTF-8)."""
        response = self._log_response(namespace, pod, container, tail, follow=False)
        try:
            return bytes(response.read())
        finally:
            response.release_conn()

    def stream_log(
        self, namespace: str, pod: str, container: str, tail: int | None = None
    ) -> Iterator[bytes]:
        """The log, then what the container writes, chunk by chunk until it ends.

        The API server streams the kubelet's follow (chunked transfer); the stream ends
        when that container's run ends, or the pod goes away.
        """
        response = self._log_response(namespace, pod, container, tail, follow=True)
        try:
            yield from response.stream(amt=None, decode_content=True)
        finally:
            response.release_conn()


# ----------------------------------------------------------------------------- the CLI's reads

# What `sftjob get`, `sftjob status` and `sftjob watch` ask of the API as the user, in
# the job's namespace (-A: in every namespace, so a ClusterRole). The README's "From the
# terminal" Role grants exactly these (tests/unit/test_job_reader.py).
READER_PERMISSIONS: dict[tuple[str, str], set[str]] = {
    (GROUP, PLURAL): {"get", "list", "watch"},
    ("", "events"): {"list"},
}


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again and watch from there."""


class JobReader:
    """The reads of the terminal views: SFTJobs (get, list, watch) and a job's Events.

    Plain dicts in the API's camelCase out, as for Kube. `namespace=None` means every
    namespace (`-A`). Its clients have their own attribute names, so the operator's
    permission scan of `Kube` (tests/unit/test_deploy.py) never counts these reads.
    """

    def __init__(self, api_client: ApiClient):
        self.client = api_client
        self.job_api = kubernetes.client.CustomObjectsApi(api_client)
        self.event_api = kubernetes.client.CoreV1Api(api_client)

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The SFTJob; None when there is none of that name in the namespace."""
        try:
            job = self.job_api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(job)

    def list_jobs(self, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        """The SFTJobs of a namespace (None: all) and the list's resourceVersion."""
        if namespace is None:
            found = self.job_api.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        else:
            found = self.job_api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        items = [dict(item) for item in found.get("items") or []]
        return items, str((found.get("metadata") or {}).get("resourceVersion") or "")

    def watch_jobs(
        self, namespace: str | None, resource_version: str, timeout_seconds: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(type, object) of each change after `resource_version`, until the server ends the
        watch after `timeout_seconds` (then watch again from the last version seen).

        Bookmarks come through (type BOOKMARK) so a caller keeps a recent version; a
        version the server no longer has raises WatchExpired.
        """
        import kubernetes.watch

        watch = kubernetes.watch.Watch()
        options: dict[str, Any] = {
            "resource_version": resource_version,
            "allow_watch_bookmarks": True,
            "timeout_seconds": timeout_seconds,
            # The socket gives up a little after the server should have closed the stream.
            "_request_timeout": timeout_seconds + 30,
        }
        if namespace is None:
            stream = watch.stream(
                self.job_api.list_cluster_custom_object, GROUP, VERSION, PLURAL, **options
            )
        else:
            stream = watch.stream(
                self.job_api.list_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                **options,
            )
        try:
            for event in stream:
                yield str(event["type"]), dict(event["raw_object"])
        except ApiException as exc:
            if exc.status == 410:
                raise WatchExpired(str(exc.reason)) from None
            raise
        finally:
            watch.stop()

    def list_job_events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The Events whose involvedObject is named `name` (job_view keeps the SFTJob's)."""
        found = self.event_api.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}"
        )
        plain = self.client.sanitize_for_serialization(found)
        return list((plain if isinstance(plain, dict) else {}).get("items") or [])
