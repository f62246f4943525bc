"""The one module of the operator that talks to the Kubernetes API.

Synchronous `kubernetes` client calls (the handlers run them in worker threads).
Objects go in and come out as plain dicts in the API's own camelCase, so the pure
core never sees client model classes. Creating is idempotent: 409 AlreadyExists
means the child is already there, which is what a handler running twice expects.

`API_PERMISSIONS` lists every (group, resource, verb) used here; a test checks it
against the calls in this file and against the ClusterRole in deploy/.
`ADMISSION_PERMISSIONS` lists what admission requires on top of those calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client import ApiClient, ApiException

from .api import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"

API_PERMISSIONS: dict[tuple[str, str], set[str]] = {
    ("", "configmaps"): {"create", "patch", "get"},
    ("", "serviceaccounts"): {"create"},
    ("", "services"): {"create"},
    ("", "pods"): {"create", "list", "delete"},
    ("", "events"): {"create"},
    ("rbac.authorization.k8s.io", "roles"): {"create"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"create"},
    (GROUP, PLURAL): {"get", "list", "watch", "patch", "delete"},
    (GROUP, f"{PLURAL}/status"): {"patch"},
}

# Permissions no call here uses but the API server's admission demands of these calls:
# children carry ownerReferences with blockOwnerDeletion: true (children.owner_reference),
# which OwnerReferencesPermissionEnforcement allows only with `update` on the owner's
# finalizers (plugin/pkg/admission/gc in kubernetes).
ADMISSION_PERMISSIONS: dict[tuple[str, str], set[str]] = {
    (GROUP, f"{PLURAL}/finalizers"): {"update"},
}

ErrorHook = Callable[[str], None]


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

    def create_if_absent(self, manifest: dict[str, Any]) -> bool:
        """Create `manifest`; False when an object of that name already exists."""
        kind = manifest["kind"]
        namespace = manifest["metadata"]["namespace"]
        creators: dict[str, Callable[..., Any]] = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Service": self.core.create_namespaced_service,
            "Pod": self.core.create_namespaced_pod,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
        }
        try:
            # The created object is not read back: skipping the client's model deserialization
            # (about 9 ms of CPU for a Pod) halves the operator's CPU per job at scale.
            _discard(creators[kind](namespace, manifest, _preload_content=False))
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            self._on_error(f"create {kind}")
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

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """Merge `status` into the job's status; False when the job is gone (404)."""
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": status},
                _content_type=MERGE_PATCH,
            )
        except ApiException as exc:
            if exc.status == 404:  # deleted meanwhile: nothing left to report on
                return False
            self._on_error("patch SFTJob status")
            raise
        return True

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

    def post_event(self, job: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        """A core/v1 Event about the SFTJob, which `kubectl describe sft` lists."""
        metadata = job["metadata"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{metadata['name']}.",
                "namespace": metadata["namespace"],
            },
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
        except ApiException:
            # Events are best effort; a lost one must not fail the reconcile.
            self._on_error("create Event")
            log.warning("could not post event %s for %s", reason, metadata["name"])
