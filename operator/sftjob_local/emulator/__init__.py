"""A Kubernetes API emulator for the local control plane (dev/test only; never imported by production).

Public API
==========
``ApiEmulator(host="127.0.0.1", port=0, log_dir=None, bookmark_interval=60.0, history_size=10000,
kopf_peering_crds=True, state_path=None)``
    A kmock ``KubernetesEmulator`` subclass with real-server semantics, served over plain HTTP.
    ``await server.start()`` binds (port 0 = a free port), ``server.url`` is ``http://HOST:PORT``,
    ``await server.stop()`` closes all connections (open watches and log follows end cleanly).
    ``server.core`` (:class:`ApiCore`) holds the state; use it only from the server's loop.
    ``state_path``: an SQLite file that keeps the state across restarts (see "Persistence");
    None keeps it in memory only.
``EmulatorThread(**same kwargs)``
    The same server in a background thread with its own loop: ``with EmulatorThread(log_dir=d) as srv:``
    then ``srv.url``, ``srv.emulator``, ``srv.call(coro)``, ``srv.write_kubeconfig(path, namespace)``.
``write_kubeconfig(path, url, namespace="default", token="sftjob-local") -> Path``
    A kubeconfig (http server, token user) accepted by kubectl, the ``kubernetes`` client and Kopf.

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

Persistence (``state_path``, ``statedb.py``): every object, with its uid, resourceVersion,
generation and timestamps, and the global resourceVersion counter (deletions' versions too) are
written through to SQLite (WAL) before the response is sent, and loaded back by the next server on
the same file: the version sequence continues, never repeats. Not kept: the watch history (a watch
from a version older than the start gets 410 Expired, so clients relist) and open watches. On a
restored database the stored CRDs are served again; the system namespaces are recreated only if
missing and the preinstalled CRDs only come with a new database (one a user deleted stays deleted).
One server per database: a second one fails at start with ``StateLocked``, an ``OSError``.

Pod logs: ``pods/{name}/log`` serves ``{log_dir}/{namespace}/{pod}/{container}.log`` (container,
tailLines, limitBytes, follow until the pod is terminal or gone; previous → 400; no file → 400
"waiting to start"). The local node writes those files.

Simplified or absent: server-side apply is a plain merge (create when missing, no managedFields
conflicts); no admission, RBAC or authentication (any token is accepted); no CEL validation
(x-kubernetes-validations), no conversion webhooks (all versions of a CRD share one storage);
no pagination (``limit`` is ignored, everything is returned); protobuf is never served for
objects (JSON only; only the OpenAPI v2 document has a protobuf form); persisted state is
written with ``synchronous=NORMAL`` (it survives the process being killed, not a power loss),
and Events are kept until deleted (no --event-ttl expiry).
"""

from .core import ApiCore
from .errors import ApiError
from .runner import EmulatorThread, write_kubeconfig
from .server import ApiEmulator

__all__ = ["ApiCore", "ApiEmulator", "ApiError", "EmulatorThread", "write_kubeconfig"]
