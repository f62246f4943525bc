"""A Kubernetes API emulator for the local control plane (dev/test only; never imported by production).

Public API
==========
``ApiEmulator(host="127.0.0.1", port=0, log_dir=None, bookmark_interval=60.0, history_size=10000,
kopf_peering_crds=True, admin_token=<random>, signing_key=<random>, pki_dir=None, state_path=None)``
    A kmock ``KubernetesEmulator`` subclass with real-server semantics, served over HTTPS with a
    private CA (``tls.py``: kubectl sends bearer tokens only over TLS; the CA and serving
    certificate are kept in ``pki_dir`` when given). ``await server.start()`` binds (port 0 = a
    free port), ``server.url`` is ``https://HOST:PORT``, ``server.ca_pem`` the CA,
    ``server.admin_token`` the cluster-admin's token; ``await server.stop()`` closes all
    connections (open watches and log follows end cleanly).
    ``server.core`` (:class:`ApiCore`) holds the state; use it only from the server's loop.
    ``state_path``: an SQLite file that keeps the state across restarts (see "Persistence");
    None keeps it in memory only.
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
Built-in kinds: v1 pods (+status, +log, +binding, +eviction), services, configmaps, secrets, serviceaccounts,
events, persistentvolumeclaims, nodes (cluster), namespaces (cluster); rbac roles, rolebindings,
clusterroles, clusterrolebindings; apps deployments; coordination leases; events.k8s.io events
(sharing storage with v1 events); admissionregistration validatingadmissionpolicies and
validatingadmissionpolicybindings (cluster, see below); apiextensions customresourcedefinitions,
which register custom resources at runtime. Also /version, /api, /apis (discovery with verbs, shortNames, categories,
``<plural>/status``), /openapi/v3 (root and per group-version JSON documents with the CRD schemas:
``kubectl apply`` server-side field validation, ``kubectl explain``), /openapi/v2 (protobuf when
asked for it, as client-go does, else JSON: kubectl's client-side validation,
``explain --output=plaintext-openapiv2``), /healthz, /readyz, /livez. Accept is honoured there:
406 when neither JSON nor the document's protobuf is acceptable.

Preinstalled: Kopf's peering CRDs (``clusterkopfpeerings``/``kopfpeerings.kopf.dev``, as
``deploy/base/kopf-peering.yaml`` ships them, with kubectl's last-applied-configuration), so that
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
Orphan strips the references; Foreground behaves as Background; an object created with no
owner left, as when a controller races its owner's deletion, is collected at once); CRD schemas: pruning (x-kubernetes-preserve-unknown-fields honoured), defaults,
jsonschema validation with apiserver-style 422 causes, ``fieldValidation=Strict`` → 400 on unknown
fields; validation rules (``x-kubernetes-validations``, CEL on Google's CEL runtime: rules at any
depth, transition rules with ``oldSelf``/``optionalOldSelf``, message, messageExpression, reason,
fieldPath, ratcheting of unchanged values; rules type-checked against the schema, so a rule
that does not compile makes the CRD a 422; see ``cel.py``); Tables for ``kubectl get`` (additionalPrinterColumns for CRs; for built-ins the columns and
cells of kubernetes' printers.go: pods, services, nodes, events (LAST SEEN, TYPE, REASON, OBJECT,
MESSAGE), serviceaccounts, PVCs, roles, bindings, deployments, ...; see ``tables.py``).

Request bodies (``bodies.py``): chosen by Content-Type as the apiserver's input negotiation does:
``application/json`` (also when the header is missing), ``application/yaml`` (read as
sigs.k8s.io/yaml reads it), ``application/vnd.kubernetes.protobuf`` (``protobuf.py``: the
``k8s\x00`` + runtime.Unknown envelope, decoded to the JSON dict of the same object for the kinds
kubectl's typed clients send: namespaces, secrets, configmaps, serviceaccounts, services,
resourcequotas, RBAC roles and bindings, deployments, jobs, cronjobs, PDBs, priorityclasses,
ingresses, TokenRequest, SelfSubjectAccessReview, SelfSubjectReview, Eviction, DeleteOptions; and
pods, bindings, PVCs, nodes, events (both groups) and leases, for Go clients; client-go never
falls back from protobuf to JSON, so ``kubectl create secret|configmap|ns|...`` need this);
anything else is 415 UnsupportedMediaType with the real message. PATCH bodies are negotiated
against the patch types.

Admission validation of built-in objects (``validation.py``, after the apiserver's
``pkg/apis/core/validation``, ``pkg/apis/rbac/validation`` and apimachinery's name/label rules):
names per kind (DNS-1123 subdomain; DNS-1035 label for Services; DNS-1123 label for Namespaces;
path segments for RBAC kinds and v1 Events), generateName, labels, annotations (256 KiB), owner
references, finalizers on every kind; pods (containers, images, ports, env, volumes and mounts,
resources incl. extended resources, enums, tolerations, ranges) and pod updates (only images,
activeDeadlineSeconds and added tolerations change); services (ports, types, clusterIP kept and
immutable); configmaps and secrets (keys, 1 MiB, ``immutable``, Secret type; ``stringData``
folded into ``data``); PVCs (access modes, storage, immutable spec); roles and bindings (rules,
roleRef immutable, subjects); events. A refusal is 422 ``Invalid`` with ``details.causes`` and
the real message (``Pod "x" is invalid: spec.containers[1].name: Duplicate value: "a"``, several
as ``[a, b]``); malformed quantities and non-base64 Secret data are 400 decode errors; a PUT
whose uid differs is 409 (precondition), a patch changing it 422. Nothing is stored on refusal.
Persistence (``state_path``, ``statedb.py``): every object, with its uid, resourceVersion,
generation and timestamps, and the global resourceVersion counter (deletions' versions too) are
written through to SQLite (WAL) before the response is sent, and loaded back by the next server on
the same file: the version sequence continues, never repeats. Not kept: the watch history (a watch
from a version older than the start gets 410 Expired, so clients relist) and open watches. On a
restored database the stored CRDs are served again; the system namespaces are recreated only if
missing and the preinstalled CRDs only come with a new database (one a user deleted stays deleted).
One server per database: a second one fails at start with ``StateLocked``, an ``OSError``.

ValidatingAdmissionPolicy (``admission_policy.py``, ``admission_policy_api.py``, as Kubernetes
1.30+): admissionregistration.k8s.io/v1 ``validatingadmissionpolicies`` (+status) and
``validatingadmissionpolicybindings``, cluster-scoped, with the v1 defaults and validation (their
CEL compiled on the CRD rules' library: a policy that does not compile is 422). Every create and
update a request makes (dry runs included; not DELETE or CONNECT) runs the bound policies:
matchConstraints and a binding's matchResources (namespaceSelector, objectSelector,
resourceRules with subresources and scope, excludeResourceRules, Equivalent versions),
paramKind + paramRef (name or selector, namespace, parameterNotFoundAction), matchConditions,
variables, validations (message, messageExpression, reason), failurePolicy, validationActions
Deny and Warn (a ``Warning`` header; Audit is accepted and ignored). A denial is the
apiserver's: ``<resource> "<name>" is forbidden: ValidatingAdmissionPolicy '<p>' with binding
'<b>' denied request: <message>``, reason Invalid (422) unless the validation names another.

Pod logs: ``pods/{name}/log`` serves ``{log_dir}/{namespace}_{pod}_{uid}/{container}/{run}.log``
(CRI log format), the run chosen from the pod's container status as the kubelet does (previous →
lastState; errors "waiting to start", "previous terminated container ... not found"); container
(required when the pod has several), tailLines, sinceSeconds/sinceTime, timestamps, limitBytes,
follow until that container run ends; PodLogOptions validation → 422. The local node writes
those files (``sftjob_local.node_logs``).

Eviction: ``pods/{name}/eviction`` (policy/v1 Eviction, create) adds the DisruptionTarget
condition (EvictionByEvictionAPI) and deletes with the Eviction's deleteOptions
(``eviction.py``); PodDisruptionBudgets are not served, so no eviction is refused for one.

Simplified or absent: server-side apply is a plain merge (create when missing, no managedFields
conflicts); admission plugins: ServiceAccount, OwnerReferencesPermissionEnforcement, RBAC
escalation prevention and PodSecurity (``pod_security.py``: the namespace labels'
``enforce``/``warn`` levels of the Pod Security Standards, v1.32's checks, the real 403 and
Warning texts; pod templates of workload kinds are not checked) and ValidatingAdmissionPolicy
(no webhooks; policies have no ``authorizer`` variable, no auditAnnotations evaluation, no cost
budget and no status.typeChecking; ``request`` and ``namespaceObject`` are not type-checked)
only; no aggregated ClusterRoles (admin, edit, view) and no other bootstrap
roles than those above; no TokenReview/SubjectAccessReview; no client-certificate auth; admission
adds no projected token volume to pods (the local node provides the token itself, see
``sftjob_local.node_sa``); service-account tokens are not rotated (pods get one-year tokens, as
the apiserver's token-expiration extension gives kubelets); built-in validation covers the kinds
above (Deployments, Leases, Nodes get the metadata rules only; the diff after "pod updates may
not change fields other than ..." lists the changed top-level fields as JSON, not go-cmp's
rendering of the Go struct; defaults such as imagePullPolicy are assumed, not written; status
writes are not validated); CEL rules have no cost budget, of Kubernetes' CEL libraries only lists
and regex are there; no conversion webhooks (all versions of a CRD share one storage); no
pagination (``limit`` is ignored, everything is returned); responses are always JSON, whatever
the Accept header asks (a real server answers protobuf or YAML when asked for them alone;
client-go decodes a response by its Content-Type, so its clients read the JSON; only the OpenAPI
v2 document has a protobuf form); a protobuf body of a kind without a field table in
``protobuf_messages.py`` (e.g. a Pod, which kubectl sends as JSON) is 415 listing JSON and YAML; persisted state is
written with ``synchronous=NORMAL`` (it survives the process being killed, not a power loss),
and Events are kept until deleted (no --event-ttl expiry).
"""

from .core import ApiCore
from .errors import ApiError
from .runner import EmulatorThread, write_kubeconfig
from .server import ApiEmulator

__all__ = ["ApiCore", "ApiEmulator", "ApiError", "EmulatorThread", "write_kubeconfig"]
