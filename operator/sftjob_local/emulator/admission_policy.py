"""The ValidatingAdmissionPolicy admission plugin (admissionregistration.k8s.io/v1, GA since
Kubernetes 1.30): CEL policies, bound to requests by ValidatingAdmissionPolicyBindings, that
refuse a create or update before anything is stored (dry runs included).

After staging/src/k8s.io/apiserver/pkg/admission/plugin/policy: generic/policy_source.go
(only policies with a binding run; a paramKind that names no served kind is the policy's
configuration error ``failed to find resource referenced by paramKind: 'g/v, Kind=K'``),
generic CollectParams (paramRef name or selector, ``paramRef.namespace`` rules,
parameterNotFoundAction ``Deny`` → ``no params found for policy binding with `Deny`
parameterNotFoundAction``), matching/matching.go and webhook/predicates (namespaceSelector,
objectSelector, resourceRules with operations, apiGroups, apiVersions, resources and
``res/sub`` subresources, scope, resourceNames, excludeResourceRules, matchPolicy
Equivalent across served versions), validating/validator.go (matchConditions, then every
validation: a result other than true denies with the messageExpression's string, else
``message``, else ``failed expression: <expr>``; an evaluation error ``expression '<expr>'
resulted in error: <err>`` denies under failurePolicy Fail and admits under Ignore) and
validating/dispatcher.go (validationActions: ``Deny`` refuses, ``Warn`` adds the Warning
``Validation failed for ValidatingAdmissionPolicy 'p' with binding 'b': <msg>``, ``Audit``
is accepted and ignored: the emulator keeps no audit log).

A refusal is what dispatcher.go builds with admission.NewForbidden, then re-reasoned: the
validation's ``reason`` (``Invalid`` when unset) and its code (Invalid 422, Forbidden 403,
Unauthorized 401, RequestEntityTooLarge 413), the message
``<resource>.<group> "<name>" is forbidden: ValidatingAdmissionPolicy '<p>' with binding
'<b>' denied request: <msg>`` and one cause carrying the part after "forbidden: ".

CEL variables: ``object``, ``oldObject`` (null on create), ``params`` (the param object,
null without paramKind or paramRef), ``request`` (kind, resource, subResource,
requestKind, requestResource, requestSubResource, name, namespace, operation, userInfo,
dryRun, options), ``namespaceObject`` (metadata, spec, status; null for cluster-scoped
objects) and ``variables`` (evaluated in order, each seeing the earlier ones; one that
fails makes an expression that reads it fail with ``composited variable "x" fails to
evaluate: ...``). Objects and bindings of admissionregistration.k8s.io are exempt, as on
a real server. Only requests carry admission: the emulator's own writes (garbage
collection, bootstrap) do not, and DELETE and CONNECT are not evaluated here.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cel_expr_python import cel as cel_runtime

from . import admission_policy_api as api
from . import auth, cel, rbac
from .core import ApiCore
from .errors import ApiError
from .resources import ResourceType

Obj = dict[str, Any]

REASON_CODES = {"Forbidden": 403, "Unauthorized": 401, "RequestEntityTooLarge": 413, "Invalid": 422}
_NAMESPACE_META = (
    "name",
    "generateName",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "finalizers",
)


@dataclass
class RequestOptions:
    """What admission needs of the HTTP request that ApiCore does not pass to its hooks."""

    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)


# Set by the server for the request being served (server._handle), read by the plugin.
request_options: contextvars.ContextVar[RequestOptions | None] = contextvars.ContextVar(
    "sftjob_emulator_request_options", default=None
)


def request_warnings() -> list[str]:
    """The request's Warning list, shared with the plugin (a new list outside a request)."""
    options = request_options.get()
    return options.warnings if options is not None else []


# --------------------------------------------------------------------------- matching


def label_selector_matches(selector: Obj | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector against labels; an empty selector matches everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for req in selector.get("matchExpressions") or []:
        key, operator, values = req.get("key"), req.get("operator"), req.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


@dataclass(frozen=True)
class Request:
    """admission.Attributes: one write as the policies see it."""

    operation: str
    rt: ResourceType
    obj: Obj
    old: Obj | None
    subresource: str
    user: auth.UserInfo
    dry_run: bool

    @property
    def namespace(self) -> str:
        return (self.obj.get("metadata") or {}).get("namespace") or ""

    @property
    def name(self) -> str:
        return (self.obj.get("metadata") or {}).get("name") or ""

    @property
    def is_namespace(self) -> bool:
        return self.rt.group == "" and self.rt.plural == "namespaces"


def _exact_or_wildcard(items: Iterable[str], wanted: str) -> bool:
    return any(item in ("*", wanted) for item in items)


def _rule_matches(rule: Obj, req: Request, rt: ResourceType) -> bool:
    """webhook/predicates/rules Matcher.Matches, for the request's resource or an equivalent."""
    scope = rule.get("scope") or "*"
    cluster_scoped = req.is_namespace or not req.namespace
    if (scope == "Namespaced" and cluster_scoped) or (scope == "Cluster" and not cluster_scoped):
        return False
    if not _exact_or_wildcard(rule.get("operations") or [], req.operation):
        return False
    if not _exact_or_wildcard(rule.get("apiGroups") or [], rt.group):
        return False
    if not _exact_or_wildcard(rule.get("apiVersions") or [], rt.version):
        return False
    for resource in rule.get("resources") or []:
        res, _, sub = resource.partition("/")
        if res in ("*", rt.plural) and sub in ("*", req.subresource):
            names = rule.get("resourceNames") or []
            return not names or req.name in names
    return False


def _rules_match(
    rules: list[Obj], policy: str, req: Request, equivalents: list[ResourceType]
) -> bool:
    if any(_rule_matches(rule, req, req.rt) for rule in rules):
        return True
    if policy != "Equivalent":
        return False
    return any(_rule_matches(rule, req, rt) for rule in rules for rt in equivalents)


# --------------------------------------------------------------------------- evaluation


class ConfigurationError(Exception):
    """A policy or binding that cannot run (its failurePolicy decides)."""


@dataclass
class Decision:
    deny: bool
    message: str = ""
    reason: str = "Invalid"


def _compile(text: str, params: bool, variables: bool, want: Any = None) -> Any:
    try:
        return api.compile_expression(text, params, variables, want)
    except api.CompileError as exc:
        return f"compilation error: {exc}"


_VARIABLE_KEY = re.compile(r"no such key: (\w+)")


class CompiledPolicy:
    """A stored policy's expressions, compiled once per resourceVersion."""

    def __init__(self, policy: Obj) -> None:
        spec = policy.get("spec") or {}
        params, variables = api.has_params(policy), api.has_variables(policy)
        bool_type = cel_runtime.Type.BOOL
        self.fail = spec.get("failurePolicy", "Fail") != "Ignore"
        self.conditions = [
            (c.get("expression", ""), _compile(c.get("expression", ""), params, False, bool_type))
            for c in spec.get("matchConditions") or []
        ]
        self.variables = [
            (
                v.get("name", ""),
                v.get("expression", ""),
                _compile(v.get("expression", ""), params, True),
            )
            for v in spec.get("variables") or []
        ]
        self.validations = []
        for rule in spec.get("validations") or []:
            text = rule.get("expression", "")
            message_expression = rule.get("messageExpression")
            self.validations.append(
                (
                    rule,
                    _compile(text, params, variables, bool_type),
                    _compile(message_expression, params, variables, cel_runtime.Type.STRING)
                    if message_expression
                    else None,
                )
            )

    @staticmethod
    def _run(text: str, program: Any, data: Obj, failed: dict[str, str]) -> tuple[Any, str | None]:
        """(value, None) or (None, the apiserver's error for this expression)."""
        if isinstance(program, str):
            return None, program
        result = program.eval(data=data)
        value = result.plain_value()
        if str(result.type().name()).upper() != "ERROR":
            return value, None
        error = cel.runtime_error_text(str(value))
        missing = _VARIABLE_KEY.fullmatch(error)
        if missing and missing.group(1) in failed:
            name = missing.group(1)
            error = f'composited variable "{name}" fails to evaluate: {failed[name]}'
        return None, f"expression '{text}' resulted in error: {error}"

    def _error(self, message: str) -> list[Decision]:
        return [Decision(deny=self.fail, message=message)]

    def validate(self, data: Obj) -> list[Decision]:
        """validator.Validate for one binding and one param: [] when a matchCondition is false."""
        errors = []
        for text, program in self.conditions:
            value, error = self._run(text, program, data, {})
            if error:
                errors.append(error)
            elif value is False:
                return []
        if errors:
            return self._error(errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]")
        values: dict[str, Any] = {}
        failed: dict[str, str] = {}
        data = {**data, "variables": values}
        for name, text, program in self.variables:
            value, error = self._run(text, program, data, failed)
            if error is None:
                values[name] = value
            else:
                failed[name] = error.split(" resulted in error: ", 1)[-1]
        decisions = []
        for rule, program, message_program in self.validations:
            text = rule.get("expression", "")
            value, error = self._run(text, program, data, failed)
            if error is not None:
                decisions.append(Decision(deny=self.fail, message=error))
            elif value is not True:
                decisions.append(
                    Decision(
                        True,
                        self._message(rule, message_program, data, failed),
                        rule.get("reason") or "Invalid",
                    )
                )
        return decisions

    def _message(self, rule: Obj, program: Any, data: Obj, failed: dict[str, str]) -> str:
        if program is not None:
            value, _ = self._run(rule.get("messageExpression", ""), program, data, failed)
            text = value.strip() if isinstance(value, str) else ""
            # Empty, multi-line or longer than 5 KiB: the message (or the expression) instead.
            if text and "\n" not in text and len(text) <= 5 * 1024:
                return text
        message = (rule.get("message") or "").strip()
        return message or f"failed expression: {rule.get('expression', '').strip()}"


# --------------------------------------------------------------------------- the plugin


@dataclass
class _Denial:
    policy: str
    binding: str | None
    decision: Decision

    @property
    def message(self) -> str:
        if self.binding is None:
            return (
                f"ValidatingAdmissionPolicy '{self.policy}' denied request: {self.decision.message}"
            )
        return (
            f"ValidatingAdmissionPolicy '{self.policy}' with binding '{self.binding}' "
            f"denied request: {self.decision.message}"
        )


class PolicyAdmission:
    """Runs the stored policies on each write made by a request (``ApiCore.admission``)."""

    def __init__(self, core: ApiCore) -> None:
        self.core = core
        self._compiled: dict[str, tuple[str, CompiledPolicy]] = {}

    def _stored(self, plural: str, namespace: str, name: str) -> Obj | None:
        return self.core.store.get((api.GROUP, plural), namespace, name)

    def _policy(self, policy: Obj) -> CompiledPolicy:
        meta = policy["metadata"]
        cached = self._compiled.get(meta["uid"])
        if cached is None or cached[0] != meta["resourceVersion"]:
            cached = (meta["resourceVersion"], CompiledPolicy(policy))
            self._compiled[meta["uid"]] = cached
        return cached[1]

    def admit(
        self, operation: str, rt: ResourceType, obj: Obj, old: Obj | None, subresource: str | None
    ) -> None:
        user = auth.current_user.get()
        if user is None or rt.group == api.GROUP:
            return  # the emulator's own writes; admission configuration is exempt
        bindings = self.core.store.list((api.GROUP, api.BINDING_PLURAL))
        if not bindings:
            return
        options = request_options.get() or RequestOptions()
        req = Request(operation, rt, obj, old, subresource or "", user, options.dry_run)
        denials: list[_Denial] = []
        by_policy: dict[str, list[Obj]] = {}
        for binding in sorted(bindings, key=lambda b: b["metadata"]["name"]):
            by_policy.setdefault((binding.get("spec") or {}).get("policyName", ""), []).append(
                binding
            )
        for policy_name in sorted(by_policy):
            policy = self._stored(api.POLICY_PLURAL, "", policy_name)
            if policy is not None:
                denials += self._run_policy(policy, by_policy[policy_name], req, options.warnings)
        if denials:
            raise self._refusal(req, denials[0])

    def _matches(self, match: Obj, req: Request) -> bool:
        """matching.Matcher.Matches: namespaceSelector, objectSelector, then the rules."""
        if req.is_namespace:
            labels = (req.obj.get("metadata") or {}).get("labels") or {}
        elif req.namespace:
            ns = self.core.store.get(("", "namespaces"), "", req.namespace) or {}
            labels = (ns.get("metadata") or {}).get("labels") or {}
        else:
            labels = None  # a cluster-scoped object always passes the namespaceSelector
        if labels is not None and not label_selector_matches(
            match.get("namespaceSelector"), labels
        ):
            return False
        object_selector = match.get("objectSelector")
        candidates = [o for o in (req.obj, req.old) if o is not None]
        if not any(
            label_selector_matches(object_selector, (o.get("metadata") or {}).get("labels") or {})
            for o in candidates
        ):
            return False
        equivalents = [
            t
            for t in self.core.registry.all()
            if t.storage_key == req.rt.storage_key and t.version != req.rt.version
        ]
        policy = match.get("matchPolicy", "Equivalent")
        if _rules_match(match.get("excludeResourceRules") or [], policy, req, equivalents):
            return False
        rules = match.get("resourceRules") or []
        return not rules or _rules_match(rules, policy, req, equivalents)

    def _run_policy(
        self, policy: Obj, bindings: list[Obj], req: Request, warnings: list[str]
    ) -> list[_Denial]:
        spec = policy.get("spec") or {}
        name = policy["metadata"]["name"]
        if not self._matches(spec.get("matchConstraints") or {}, req):
            return []
        compiled = self._policy(policy)
        param_type = None
        if spec.get("paramKind"):
            param_type = self._param_type(spec["paramKind"])
            if param_type is None:
                kind = spec["paramKind"]
                group, _, version = (kind.get("apiVersion") or "").rpartition("/")
                error = (
                    "failed to configure policy: failed to find resource referenced by "
                    f"paramKind: '{group}/{version}, Kind={kind.get('kind', '')}'"
                )
                return [_Denial(name, None, Decision(True, error))] if compiled.fail else []
        denials: list[_Denial] = []
        for binding in bindings:
            binding_spec = binding.get("spec") or {}
            binding_name = binding["metadata"]["name"]
            match = binding_spec.get("matchResources")
            if isinstance(match, dict) and not self._matches(match, req):
                continue
            try:
                params = self._params(param_type, binding_spec.get("paramRef"), req.namespace)
            except ConfigurationError as exc:
                if compiled.fail:
                    message = f"failed to configure binding: {exc}"
                    denials.append(_Denial(name, binding_name, Decision(True, message)))
                continue
            for param in params:
                for decision in compiled.validate(self._data(req, param)):
                    if not decision.deny:
                        continue
                    actions = binding_spec.get("validationActions") or []
                    if "Deny" in actions:
                        denials.append(_Denial(name, binding_name, decision))
                    if "Warn" in actions:
                        warnings.append(
                            f"Validation failed for ValidatingAdmissionPolicy '{name}' with "
                            f"binding '{binding_name}': {decision.message}"
                        )
        return denials

    def _param_type(self, kind: Obj) -> ResourceType | None:
        group, _, version = (kind.get("apiVersion") or "").rpartition("/")
        return next(
            (
                t
                for t in self.core.registry.all()
                if (t.group, t.version, t.kind) == (group, version, kind.get("kind"))
            ),
            None,
        )

    def _params(self, rt: ResourceType | None, ref: Obj | None, namespace: str) -> list[Obj | None]:
        """generic.CollectParams: the param objects a binding names ([None]: no params)."""
        if rt is None or not isinstance(ref, dict):
            return [None]
        params_namespace = ""
        if rt.namespaced:
            params_namespace = ref.get("namespace") or namespace
            if not params_namespace:
                raise ConfigurationError(
                    "cannot use namespaced paramRef in policy binding that matches "
                    "cluster-scoped resources"
                )
        elif ref.get("namespace"):
            raise ConfigurationError(
                "paramRef.namespace must not be provided for a cluster-scoped `paramKind`"
            )
        if ref.get("name"):
            found = self.core.store.get(rt.storage_key, params_namespace, ref["name"])
            params = [found] if found is not None else []
        else:
            params = [
                p
                for p in self.core.store.list(rt.storage_key, params_namespace or None)
                if label_selector_matches(ref.get("selector"), (p["metadata"].get("labels") or {}))
            ]
        if not params and ref.get("parameterNotFoundAction") == "Deny":
            raise ConfigurationError(
                "no params found for policy binding with `Deny` parameterNotFoundAction"
            )
        return [self.core.present(rt, p) for p in params]

    def _data(self, req: Request, param: Obj | None) -> Obj:
        """The activation: object, oldObject, params, request, namespaceObject."""
        namespace_object = None
        if req.namespace and not req.is_namespace:
            ns = self.core.store.get(("", "namespaces"), "", req.namespace)
            if ns is not None:
                meta = ns.get("metadata") or {}
                namespace_object = {
                    "metadata": {k: meta[k] for k in _NAMESPACE_META if k in meta},
                    "spec": ns.get("spec") or {},
                    "status": ns.get("status") or {},
                }
        return {
            "object": req.obj,
            "oldObject": req.old,
            "params": param,
            "request": self._request(req),
            "namespaceObject": namespace_object,
        }

    @staticmethod
    def _request(req: Request) -> Obj:
        """cel.CreateAdmissionRequest, as its JSON form (empty optional fields left out)."""
        rt = req.rt
        kind = {"group": rt.group, "version": rt.version, "kind": rt.kind}
        resource = {"group": rt.group, "version": rt.version, "resource": rt.plural}
        options_kind = "CreateOptions" if req.operation == "CREATE" else "UpdateOptions"
        options: Obj = {"kind": options_kind, "apiVersion": "meta.k8s.io/v1"}
        if req.dry_run:
            options["dryRun"] = ["All"]
        request: Obj = {
            "kind": kind,
            "resource": resource,
            "requestKind": dict(kind),
            "requestResource": dict(resource),
            "name": req.name,
            "operation": req.operation,
            "userInfo": req.user.as_status(),
            "dryRun": req.dry_run,
            "options": options,
        }
        if req.subresource:
            request["subResource"] = request["requestSubResource"] = req.subresource
        if req.namespace:
            request["namespace"] = req.namespace
        return request

    @staticmethod
    def _refusal(req: Request, denial: _Denial) -> ApiError:
        """dispatcher.go: admission.NewForbidden, re-reasoned by the decision's reason."""
        meta = req.obj.get("metadata") or {}
        name = meta.get("name") or meta.get("generateName") or "Unknown"
        error = rbac.forbidden(req.rt.plural, req.rt.group, name, denial.message)
        error.reason = denial.decision.reason
        error.code = REASON_CODES.get(error.reason, 422)
        details = error.details or {}
        details["causes"] = [{"message": denial.message}]
        error.details = details
        return error
