"""CRDs the local control plane starts with: Kopf's peering CRDs.

Why: ``kubectl apply`` maps every object of its input to a resource *before* it creates
anything, from discovery read at its start. A CRD and an object of that CRD in one apply
therefore fail on a real cluster too ("no matches for kind ... ensure CRDs are installed
first"; a second apply succeeds). ``deploy/`` (kustomize) holds Kopf's two peering CRDs and a
``ClusterKopfPeering``; with the CRDs already served, ``kubectl apply -k deploy/`` works on the
first try against the emulator.

The bodies are Kopf's own (https://github.com/nolar/kopf/blob/main/peering.yaml), exactly as
``deploy/base/kopf-peering.yaml`` ships them (a test keeps the two equal), and they carry the
``kubectl.kubernetes.io/last-applied-configuration`` that ``kubectl apply`` would have
written, so applying ``deploy/`` reports them ``unchanged`` and deleting them works as usual.
"""

from __future__ import annotations

import copy
import json
from typing import Any

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
PREINSTALLED = "local.sftjob.dev/preinstalled"


def _peering_crd(plural: str, kind: str, scope: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "scope": scope,
            "group": "kopf.dev",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


KOPF_PEERING_CRDS: tuple[dict[str, Any], ...] = (
    _peering_crd("clusterkopfpeerings", "ClusterKopfPeering", "Cluster"),
    _peering_crd("kopfpeerings", "KopfPeering", "Namespaced"),
)


def as_applied(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as ``kubectl apply`` creates it: with its last-applied-configuration
    (Go's ``json.Marshal``: sorted keys, compact, newline-terminated), marked preinstalled."""
    obj = copy.deepcopy(manifest)
    # kubectl records the manifest with an (emptied) annotations map of its own.
    recorded = copy.deepcopy(manifest)
    recorded["metadata"]["annotations"] = {}
    applied = json.dumps(recorded, sort_keys=True, separators=(",", ":")) + "\n"
    annotations = obj["metadata"].setdefault("annotations", {})
    annotations[LAST_APPLIED] = applied
    annotations[PREINSTALLED] = "true"
    return obj
