"""Service-account credentials of a pod, as the kubelet provides them.

A real kubelet (with the ServiceAccount admission plugin's projected ``kube-api-access-*``
volume) requests a token bound to the pod (TokenRequest, ``expirationSeconds: 3607``,
``boundObjectRef`` the pod) and mounts ``token``, ``ca.crt`` and ``namespace`` at
``/var/run/secrets/kubernetes.io/serviceaccount``, unless ``automountServiceAccountToken`` is
false on the pod (or, when the pod does not say, on its ServiceAccount):
https://kubernetes.io/docs/tasks/configure-pod-container/configure-service-account/.

Pods here have no in-cluster config (no cluster DNS name for the API over https), so the node
also writes a kubeconfig that authenticates with that token; the pod's processes get it as
``KUBECONFIG``. Without a token the kubeconfig has no credentials (an anonymous client).
"""

from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from .node_kube import ApiError, KubeHttp

Obj = dict[str, Any]

MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
KUBELET_TOKEN_SECONDS = 3607


class TokenUnavailable(Exception):
    """The pod's ServiceAccount token cannot be had (yet): the pod waits, as on a kubelet."""


@dataclasses.dataclass(frozen=True)
class PodCredentials:
    kubeconfig: Path
    folder: Path | None  # token/ca.crt/namespace, mounted at MOUNT_PATH; None without automount


def automount(pod: Obj, service_account: Obj | None) -> bool:
    """The pod's own setting wins; else the ServiceAccount's; default true."""
    spec = pod.get("spec") or {}
    if spec.get("automountServiceAccountToken") is not None:
        return bool(spec["automountServiceAccountToken"])
    if service_account and service_account.get("automountServiceAccountToken") is not None:
        return bool(service_account["automountServiceAccountToken"])
    return True


def pod_kubeconfig(node_kubeconfig: Path, token: str | None) -> tuple[Obj, bytes]:
    """The node's cluster (server, CA) with the pod's token as the only credential; + CA PEM."""
    config = yaml.safe_load(node_kubeconfig.read_text())
    current = config.get("current-context")
    context = next(c for c in config["contexts"] if c["name"] == current)["context"]
    cluster = next(c for c in config["clusters"] if c["name"] == context["cluster"])["cluster"]
    ca = base64.b64decode(cluster.get("certificate-authority-data") or "")
    if not ca and cluster.get("certificate-authority"):
        ca = Path(cluster["certificate-authority"]).read_bytes()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": "pod", "user": {"token": token} if token else {}}],
        "contexts": [
            {
                "name": "pod",
                "context": {
                    "cluster": "cluster",
                    "user": "pod",
                    "namespace": context.get("namespace", "default"),
                },
            }
        ],
        "current-context": "pod",
    }, ca


def _write(path: Path, content: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.chmod(path, mode)


async def pod_credentials(
    api: KubeHttp, node_kubeconfig: Path, pod: Obj, folder: Path
) -> PodCredentials:
    """Request the pod's token (unless automount is off) and write its files under ``folder``."""
    meta = pod["metadata"]
    namespace = meta.get("namespace", "default")
    account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    try:
        service_account = await api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}")
    except ApiError as exc:
        if exc.status == 404:
            raise TokenUnavailable(f'serviceaccount "{account}" not found') from exc
        raise
    token: str | None = None
    mounted: Path | None = None
    if automount(pod, service_account):
        try:
            issued = await api.create(
                f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
                {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {
                        "expirationSeconds": KUBELET_TOKEN_SECONDS,
                        "boundObjectRef": {
                            "apiVersion": "v1",
                            "kind": "Pod",
                            "name": meta["name"],
                            "uid": meta["uid"],
                        },
                    },
                },
            )
        except ApiError as exc:
            raise TokenUnavailable(f"failed to fetch token: {exc}") from exc
        token = issued["status"]["token"]
    config, ca = pod_kubeconfig(node_kubeconfig, token)
    if token is not None:
        mounted = folder / "serviceaccount"
        _write(mounted / "token", token.encode(), 0o600)
        _write(mounted / "namespace", namespace.encode())
        _write(mounted / "ca.crt", ca)
    kubeconfig = folder / "kubeconfig"
    _write(kubeconfig, yaml.safe_dump(config, sort_keys=False).encode(), 0o600)
    return PodCredentials(kubeconfig, mounted)
