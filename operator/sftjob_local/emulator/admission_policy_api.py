"""The admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy and
ValidatingAdmissionPolicyBinding objects: their defaults, their validation and the
compilation of their CEL expressions (what the apiserver's REST strategy does before a
policy is stored). The plugin that runs them is ``admission_policy.py``.

After kubernetes pkg/apis/admissionregistration/v1 (defaults: failurePolicy ``Fail``;
matchConstraints/matchResources: matchPolicy ``Equivalent``, empty namespaceSelector and
objectSelector; rules: scope ``*``) and pkg/apis/admissionregistration/validation
(validateValidatingAdmissionPolicySpec, validateValidatingAdmissionPolicyBindingSpec,
validateParamRef, validateValidationActions; field paths and words as there, including the
apiserver's ``spec.matchResouces`` spelling for a binding's matchResources).

Expressions are compiled as staging/src/k8s.io/apiserver/pkg/admission/plugin/cel/compile.go
declares them: ``object``, ``oldObject``, ``request``, ``namespaceObject``; ``params`` only
when the policy has a paramKind; ``variables`` only when it has variables. A compile error is
422 at the expression (``Invalid value: "<expr>": compilation failed: ERROR: <input>:1:...``),
a validation that cannot be a bool ``must evaluate to bool but got string``.

Simplified: ``request`` and ``namespaceObject`` are dyn (the apiserver types them, so a
misspelt field of theirs fails there at creation, here only at evaluation); ``variables``
is a map (an undefined variable is an evaluation error, not a compile error); the
``authorizer`` variable and auditAnnotations' valueExpressions are not provided (an
expression using ``authorizer`` is refused as an undeclared reference); no cost limits;
status.typeChecking is never written.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from cel_expr_python import cel as cel_runtime

from . import cel, validation
from .validation import FieldError

GROUP = "admissionregistration.k8s.io"
POLICY_KIND = "ValidatingAdmissionPolicy"
BINDING_KIND = "ValidatingAdmissionPolicyBinding"
POLICY_PLURAL = "validatingadmissionpolicies"
BINDING_PLURAL = "validatingadmissionpolicybindings"

FAILURE_POLICIES = ["Fail", "Ignore"]
OPERATIONS = ["*", "CONNECT", "CREATE", "DELETE", "UPDATE"]
SCOPES = ["*", "Cluster", "Namespaced"]
MATCH_POLICIES = ["Equivalent", "Exact"]
VALIDATION_ACTIONS = ["Audit", "Deny", "Warn"]
PARAMETER_NOT_FOUND_ACTIONS = ["Allow", "Deny"]
REASONS = ["Forbidden", "Invalid", "RequestEntityTooLarge", "Unauthorized"]
_CEL_IDENTIFIER = re.compile(r"^[_a-zA-Z][_a-zA-Z0-9]*$")
_CEL_RESERVED = {"true", "false", "null", "in", "as", "break", "const", "continue", "else"}
_CEL_RESERVED |= {"for", "function", "if", "import", "let", "loop", "package", "namespace"}
_CEL_RESERVED |= {"return", "var", "void", "while"}

Obj = dict[str, Any]


# --------------------------------------------------------------------------- compilation


class CompileError(Exception):
    """An expression that does not compile; the text is the apiserver's detail."""


@cache
def _environment(has_params: bool, has_variables: bool) -> Any:
    dyn = cel_runtime.Type.DYN
    declared: dict[str, Any] = {
        "object": dyn,
        "oldObject": dyn,
        "request": dyn,
        "namespaceObject": dyn,
    }
    if has_params:
        declared["params"] = dyn
    if has_variables:
        declared["variables"] = cel_runtime.Type.Map(cel_runtime.Type.STRING, dyn)
    return cel.new_environment(declared)


_TYPE_NAMES = {"BOOL": "bool", "STRING": "string", "INT": "int", "UINT": "uint", "DOUBLE": "double"}


def compile_expression(text: str, has_params: bool, has_variables: bool, want: Any = None) -> Any:
    """A program for `text` (CompileCELExpression); `want` the type it must yield (None: any)."""
    try:
        program = _environment(has_params, has_variables).compile(text)
    except RuntimeError as exc:
        raise CompileError(f"compilation failed: {cel.compile_error_text(exc)}") from exc
    got = program.return_type()
    if want is not None and got != want and got != cel_runtime.Type.DYN:
        name = str(got.name()).upper()
        raise CompileError(
            f"must evaluate to {_TYPE_NAMES[str(want.name()).upper()]} but got "
            f"{_TYPE_NAMES.get(name, name.lower())}"
        )
    return program


def has_params(policy: Obj) -> bool:
    return bool((policy.get("spec") or {}).get("paramKind"))


def has_variables(policy: Obj) -> bool:
    return bool((policy.get("spec") or {}).get("variables"))


# --------------------------------------------------------------------------- defaults


def _default_match_resources(match: Obj) -> None:
    match.setdefault("matchPolicy", "Equivalent")
    match.setdefault("namespaceSelector", {})
    match.setdefault("objectSelector", {})
    for rules in ("resourceRules", "excludeResourceRules"):
        for rule in match.get(rules) or []:
            if isinstance(rule, dict):
                rule.setdefault("scope", "*")


def apply_defaults(kind: str, obj: Obj) -> None:
    """The v1 defaults, filled in place as the apiserver's decoding does."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return
    if kind == POLICY_KIND:
        spec.setdefault("failurePolicy", "Fail")
        if isinstance(spec.get("matchConstraints"), dict):
            _default_match_resources(spec["matchConstraints"])
    elif kind == BINDING_KIND and isinstance(spec.get("matchResources"), dict):
        _default_match_resources(spec["matchResources"])


# --------------------------------------------------------------------------- validation


def _supported(path: str, value: Any, allowed: list[str]) -> list[FieldError]:
    return [] if value in allowed else [validation.not_supported(path, value, allowed)]


def _label_selector(selector: Any, path: str) -> list[FieldError]:
    """metav1validation.ValidateLabelSelector, its operator rules."""
    errs: list[FieldError] = []
    if not isinstance(selector, dict):
        return errs
    for i, req in enumerate(selector.get("matchExpressions") or []):
        where = f"{path}.matchExpressions[{i}]"
        operator, values = req.get("operator"), req.get("values") or []
        if operator in ("In", "NotIn") and not values:
            errs.append(
                validation.required(
                    f"{where}.values", "must be specified when `operator` is 'In' or 'NotIn'"
                )
            )
        elif operator in ("Exists", "DoesNotExist") and values:
            errs.append(
                validation.forbidden(
                    f"{where}.values",
                    "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                )
            )
        elif operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            errs.append(
                validation.invalid(f"{where}.operator", operator, "not a valid selector operator")
            )
    return errs


def _rule(rule: Obj, path: str) -> list[FieldError]:
    """validateRuleWithOperations: what the request must be to match."""
    errs: list[FieldError] = []
    operations = rule.get("operations") or []
    if not operations:
        errs.append(validation.required(f"{path}.operations"))
    for i, op in enumerate(operations):
        errs += _supported(f"{path}.operations[{i}]", op, OPERATIONS)
    for field in ("apiGroups", "apiVersions", "resources"):
        if not rule.get(field):
            errs.append(validation.required(f"{path}.{field}"))
    errs += _supported(f"{path}.scope", rule.get("scope", "*"), SCOPES)
    return errs


def _match_resources(match: Obj, path: str) -> list[FieldError]:
    errs = _supported(f"{path}.matchPolicy", match.get("matchPolicy"), MATCH_POLICIES)
    errs += _label_selector(match.get("namespaceSelector"), f"{path}.namespaceSelector")
    errs += _label_selector(match.get("objectSelector"), f"{path}.objectSelector")
    for rules in ("resourceRules", "excludeResourceRules"):
        for i, rule in enumerate(match.get(rules) or []):
            errs += _rule(rule if isinstance(rule, dict) else {}, f"{path}.{rules}[{i}]")
    return errs


def _expression(
    text: Any, path: str, params: bool, variables: bool, want: Any, what: str = "expression"
) -> list[FieldError]:
    if not isinstance(text, str) or not text.strip():
        return [validation.required(path, f"{what} is not specified")]
    try:
        compile_expression(text, params, variables, want)
    except CompileError as exc:
        return [validation.invalid(path, text, str(exc))]
    return []


def _policy_spec(spec: Obj) -> list[FieldError]:
    errs = _supported("spec.failurePolicy", spec.get("failurePolicy"), FAILURE_POLICIES)
    params = bool(spec.get("paramKind"))
    if params:
        kind = spec["paramKind"]
        if not kind.get("apiVersion"):
            errs.append(validation.required("spec.paramKind.apiVersion"))
        elif kind["apiVersion"].count("/") > 1:
            message = f"unexpected GroupVersion string: {kind['apiVersion']}"
            errs.append(
                validation.invalid("spec.paramKind.apiVersion", kind["apiVersion"], message)
            )
        if not kind.get("kind"):
            errs.append(validation.required("spec.paramKind.kind"))
    match = spec.get("matchConstraints")
    if not isinstance(match, dict):
        errs.append(validation.required("spec.matchConstraints"))
    else:
        errs += _match_resources(match, "spec.matchConstraints")
        if not match.get("resourceRules"):
            errs.append(validation.required("spec.matchConstraints.resourceRules"))
    bool_type = cel_runtime.Type.BOOL
    for i, condition in enumerate(spec.get("matchConditions") or []):
        path = f"spec.matchConditions[{i}]"
        errs += _expression(
            condition.get("expression"), f"{path}.expression", params, False, bool_type
        )
        if not condition.get("name"):
            errs.append(validation.required(f"{path}.name"))
    variables = bool(spec.get("variables"))
    for i, variable in enumerate(spec.get("variables") or []):
        path = f"spec.variables[{i}]"
        name = variable.get("name") or ""
        if not name.strip():
            errs.append(validation.required(f"{path}.name", "name is not specified"))
        elif not _CEL_IDENTIFIER.match(name) or name in _CEL_RESERVED:
            errs.append(
                validation.invalid(f"{path}.name", name, "name is not a valid CEL identifier")
            )
        errs += _expression(variable.get("expression"), f"{path}.expression", params, True, None)
    validations = spec.get("validations") or []
    if not validations and not spec.get("auditAnnotations"):
        why = "validations or auditAnnotations must contain at least one item"
        errs.append(validation.required("spec.validations", why))
        errs.append(validation.required("spec.auditAnnotations", why))
    for i, rule in enumerate(validations):
        errs += _validation(rule, f"spec.validations[{i}]", params, variables)
    return errs


def _validation(rule: Obj, path: str, params: bool, variables: bool) -> list[FieldError]:
    """validateValidation: the expression, messageExpression, message and reason."""
    errs = _expression(
        rule.get("expression"), f"{path}.expression", params, variables, cel_runtime.Type.BOOL
    )
    expression = rule.get("messageExpression")
    if expression is not None and expression != "":
        if not expression.strip():
            errs.append(
                validation.invalid(
                    f"{path}.messageExpression", expression, "must be non-empty if specified"
                )
            )
        else:
            errs += _expression(
                expression, f"{path}.messageExpression", params, variables, cel_runtime.Type.STRING
            )
    message = rule.get("message")
    if message and not message.strip():
        errs.append(
            validation.invalid(f"{path}.message", message, "message must be non-empty if specified")
        )
    elif message and re.search(r"[\n\r]", message.strip()):
        errs.append(
            validation.invalid(f"{path}.message", message, "message must not contain line breaks")
        )
    if rule.get("reason") is not None:
        errs += _supported(f"{path}.reason", rule["reason"], REASONS)
    return errs


def _param_ref(ref: Obj, path: str) -> list[FieldError]:
    """validateParamRef: name or selector (not both), and a parameterNotFoundAction."""
    errs: list[FieldError] = []
    name, selector = ref.get("name"), ref.get("selector")
    exclusive = "name and selector are mutually exclusive"
    if name:
        errs += [
            validation.invalid(f"{path}.name", name, m)
            for m in validation.is_path_segment_name(name)
        ]
        if selector is not None:
            errs.append(validation.forbidden(f"{path}.name", exclusive))
    if selector is not None:
        errs += _label_selector(selector, f"{path}.selector")
        if name:
            errs.append(validation.forbidden(f"{path}.selector", exclusive))
    if not name and selector is None:
        errs.append(validation.required(path, "one of name or selector must be specified"))
    action = ref.get("parameterNotFoundAction")
    if not action:
        errs.append(validation.required(f"{path}.parameterNotFoundAction"))
    else:
        errs += _supported(f"{path}.parameterNotFoundAction", action, PARAMETER_NOT_FOUND_ACTIONS)
    return errs


def _binding_spec(spec: Obj) -> list[FieldError]:
    errs: list[FieldError] = []
    policy = spec.get("policyName")
    if not policy:
        errs.append(validation.required("spec.policyName"))
    else:
        errs += [
            validation.invalid("spec.policyName", policy, m)
            for m in validation.is_dns1123_subdomain(policy)
        ]
    if isinstance(spec.get("paramRef"), dict):
        errs += _param_ref(spec["paramRef"], "spec.paramRef")
    if isinstance(spec.get("matchResources"), dict):
        # sic: the apiserver names this path "matchResouces".
        errs += _match_resources(spec["matchResources"], "spec.matchResouces")
    actions = spec.get("validationActions") or []
    seen: set[str] = set()
    for i, action in enumerate(actions):
        errs += _supported(f"spec.validationActions[{i}]", action, VALIDATION_ACTIONS)
        if action in seen:
            errs.append(FieldError(validation.DUPLICATE, f"spec.validationActions[{i}]", action))
        seen.add(action)
    if {"Deny", "Warn"} <= seen:
        errs.append(
            validation.invalid(
                "spec.validationActions",
                validation.GoValue(
                    "[]admissionregistration.ValidationAction{"
                    + ", ".join(f'"{a}"' for a in actions)
                    + "}"
                ),
                "must not contain both Deny and Warn (repeating the same validation failure "
                "information in the API response and headers serves no purpose)",
            )
        )
    if not seen:
        errs.append(
            validation.required(
                "spec.validationActions", "at least one validation action is required"
            )
        )
    return errs


def validate(kind: str, obj: Obj) -> list[FieldError]:
    """Defaults, then the spec's rules, for a policy or a binding (metadata is checked by
    validation.validate_create as for every kind)."""
    apply_defaults(kind, obj)
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        spec = {}
    if kind == POLICY_KIND:
        return _policy_spec(spec)
    if kind == BINDING_KIND:
        return _binding_spec(spec)
    return []
