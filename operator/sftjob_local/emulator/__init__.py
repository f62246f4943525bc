"""A Kubernetes API emulator for the local control plane (dev/test only; never imported by production).

Public API
==========
``ApiEmulator(host="127.0.0.1", port=0, log_dir=None, bookmark_interval=60.0, history_size=10000,
kopf_peering_crds=True, admin_token=<random>, signing_key=<random>, pki_dir=None)``
    A kmock ``KubernetesEmulator`` subclass with real-server semantics, served over HTTPS with a
    private CA (``tls.py``: kubectl sends bearer tokens only over TLS; the CA and serving
    certificate are kept in ``pki_dir`` when given). ``await server.start()`` binds (port 0 = a
    free port), ``server.url`` is ``https://HOST:PORT``, ``server.ca_pem`` the CA,
    ``server.admin_token`` the cluster-admin's token; ``await server.stop()`` closes all
    connections (open watches and log follows end cleanly).
    ``server.core`` (:class:`ApiCore`) holds the state; use it only from the server's loop.
``EmulatorThread(**same kwargs)``
    The same server in a background thread with its own loop: ``with EmulatorThread(log_dir=d) as srv:``
    then ``srv.url``, ``srv.emulator``, ``srv.call(coro)``,
    ``srv.write_kubeconfig(path, namespace, token=None)`` (the admin's token unless another is given).
``write_kubeconfig(path, url, namespace="default", *, token, ca_pem=b"", user="sftjob-local") -> Path``
    A kubeconfig (https server with its CA, token user) accepted by kubectl, the ``kubernetes``
    client and Kopf. ``token`` is required: the emulator answers any unknown token with 401.

Who may do what (``auth.py``, ``rbac.py``, ``access.py``)
=========================================================
Authentication: ``Authorization: Bearer`` with the admin token (user ``sftjob-local-admin``,
groups ``system:masters``, ``system:authenticated``: RBAC lets it do anything) or a
service-account token (HS256 JWTs from TokenRequest, ``serviceaccounts/<name>/token``, signed
with ``signing_key``, bound to the ServiceAccount's uid and, when asked, a Pod's uid); any other
token → 401 Unauthorized; no token → ``system:anonymous`` (``system:unauthenticated``).
Authorization: RBAC from the stored Roles/ClusterRoles/RoleBindings/ClusterRoleBindings
(verbs, apiGroups, resources with ``x/y`` subresources and ``*``, resourceNames,
nonResourceURLs), denials 403 worded as the apiserver does; the bootstrap ClusterRoles and
bindings cluster-admin, system:discovery, system:basic-user, system:public-info-viewer exist
from the start. Served: SelfSubjectAccessReview, SelfSubjectRulesReview, SelfSubjectReview. Admission
that depends on the caller: ServiceAccount (``serviceAccountName`` defaults to ``default``; a
pod naming a missing ServiceAccount → 403), OwnerReferencesPermissionEnforcement
(``blockOwnerDeletion: true`` needs ``update`` on the owner's ``finalizers``; changing an
object's ownerReferences needs ``delete`` on it), RBAC escalation prevention (a Role needs the
creator to hold what it grants or ``escalate``; a binding needs the role's permissions or
``bind``). Every namespace gets a ``default`` ServiceAccount when it is created (the
ServiceAccount controller's part). Emulator-only: a Host header other than the served
address:port (or ``localhost:port``) and any request with an Origin header (a browser) → 403.

What is served
==============
Built-in kinds: v1 pods (+status, +log, +binding), services, configmaps, secrets, serviceaccounts,
events, persistentvolumeclaims, nodes (cluster), namespaces (cluster); rbac roles, rolebindings,
clusterroles, clusterrolebindings; apps deployments; coordination leases; events.k8s.io events
(sharing storage with v1 events); apiextensions customresourcedefinitions, which register custom
resources at runtime. Also /version, /api, /apis (discovery with verbs, shortNames, categories,
``<plural>/status``), /openapi/v3 (root and per group-version JSON documents with the CRD schemas:
``kubectl apply`` server-side field validation, ``kubectl explain``), /openapi/v2 (protobuf when
asked for it, as client-go does, else JSON: kubectl's client-side validation,
``explain --output=plaintext-openapiv2``), /healthz, /readyz, /livez. Accept is honoured there:
406 when neither JSON nor the document's protobuf is acceptable.

Preinstalled: Kopf's peering CRDs (``clusterkopfpeerings``/``kopfpeerings.kopf.dev``, as
``deploy/kopf-peering.yaml`` ships them, with kubectl's last-applied-configuration), so that
``kubectl apply -k deploy/`` works on the first try (kubectl maps every object before creating
any, so a CRD and its object in one apply fail once on a real cluster);
``ApiEmulator(kopf_peering_crds=False)`` starts without them. See ``preinstalled.py``.

Semantics: server-set uid, creationTimestamp, resourceVersion (one global counter; no-op writes
keep it), generation (bumped when anything but metadata/status-subresource changes, and when
deletion starts); 201 on create; generateName; namespaces must exist (default, kube-system,
kube-public, kube-node-lease are created at startup), namespace deletion cascades; PUT, PATCH
(json-patch, merge-patch, strategic-merge-patch for built-ins with name/type/uid merge keys and
``$patch: delete|replace``; 415 for strategic patches on custom resources), DELETE,
deletecollection; 409 on stale resourceVersion; PUT on a custom resource needs resourceVersion;
status-subresource isolation; label and field selectors on list/watch/deletecollection; watch
with resourceVersion resume from a bounded history, 410 Expired (as an ERROR event) for versions
older than server start or the history, bookmarks (periodic and before timeoutSeconds closes the
stream), synthetic ADDED/DELETED when objects enter/leave a filtered watch; finalizers with
deletionTimestamp; graceful pod deletion (bound, non-terminal pods keep a deletionTimestamp until
deleted with gracePeriodSeconds=0, as a kubelet does); ownerReference garbage collection (Background;
Orphan strips the references; Foreground behaves as Background; owners that never existed are not
collected); CRD schemas: pruning (x-kubernetes-preserve-unknown-fields honoured), defaults,
jsonschema validation with apiserver-style 422 causes, ``fieldValidation=Strict`` → 400 on unknown
fields; Tables for ``kubectl get`` (additionalPrinterColumns for CRs; pods, services, nodes, ...).

Pod logs: ``pods/{name}/log`` serves ``{log_dir}/{namespace}/{pod}/{container}.log`` (container,
tailLines, limitBytes, follow until the pod is terminal or gone; previous → 400; no file → 400
"waiting to start"). The local node writes those files.

Simplified or absent: server-side apply is a plain merge (create when missing, no managedFields
conflicts); no aggregated ClusterRoles (admin, edit, view) and no other bootstrap roles than
those above; no TokenReview/SubjectAccessReview; no client-certificate
auth; admission adds no projected token volume to pods (the local node provides the token
itself, see ``sftjob_local.node_sa``); service-account tokens are not rotated (pods get
one-year tokens, as the apiserver's token-expiration extension gives kubelets); no CEL validation
(x-kubernetes-validations), no conversion webhooks (all versions of a CRD share one storage);
no pagination (``limit`` is ignored, everything is returned); protobuf is never served for
objects (JSON only; only the OpenAPI v2 document has a protobuf form).
"""

from .core import ApiCore
from .errors import ApiError
from .runner import EmulatorThread, write_kubeconfig
from .server import ApiEmulator

__all__ = ["ApiCore", "ApiEmulator", "ApiError", "EmulatorThread", "write_kubeconfig"]
