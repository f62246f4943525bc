"""Conformance probes: ValidatingAdmissionPolicy and ValidatingAdmissionPolicyBinding
(admissionregistration.k8s.io/v1), over real HTTP.

Expected answers are the apiserver's, from kubernetes staging/src/k8s.io/apiserver/pkg/
admission/plugin/policy/validating/dispatcher.go (the refusal: admission.NewForbidden's
``<resource> "<name>" is forbidden: ValidatingAdmissionPolicy '<p>' with binding '<b>'
denied request: <message>``, its reason replaced by the validation's reason, Invalid → 422
when none is given; the Warn action's Warning header), validating/validator.go (message,
messageExpression, ``failed expression: <expr>``), policy/generic (CollectParams:
parameterNotFoundAction, ``failed to configure binding: ...``; a paramKind of no served kind:
``failed to configure policy: failed to find resource referenced by paramKind: ...``) and
pkg/apis/admissionregistration/validation (422 on a policy whose expression does not compile).

Policies reach a real apiserver's admission a moment after they are stored, so every test
first waits until a dry-run probe is refused (``active``); against the emulator that is at once.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytestmark = [pytest.mark.local, pytest.mark.timeout(90)]

API = "/apis/admissionregistration.k8s.io/v1"
POLICIES = f"{API}/validatingadmissionpolicies"
BINDINGS = f"{API}/validatingadmissionpolicybindings"
PROBE_LABEL = "vap.test.sftjob.dev/probe"


class Policies:
    """Creates policies and bindings (cluster-scoped) for one test and removes them after."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.tag = secrets.token_hex(3)
        self.created: list[str] = []

    def configmaps(self, namespace: str | None = None) -> str:
        return f"/api/v1/namespaces/{namespace or self.cluster.namespace}/configmaps"

    def configmap(self, name: str, data: dict[str, str], **meta: Any) -> dict[str, Any]:
        labels = {PROBE_LABEL: self.tag, **meta.pop("labels", {})}
        return {"metadata": {"name": name, "labels": labels, **meta}, "data": data}

    def policy(self, name: str, validations: list[dict[str, Any]], **spec: Any) -> str:
        """A policy on this test's ConfigMaps (those labelled with its tag)."""
        body = {
            "metadata": {"name": f"{name}-{self.tag}"},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["configmaps"],
                        }
                    ],
                    "objectSelector": {"matchLabels": {PROBE_LABEL: self.tag}},
                },
                "validations": validations,
                **spec,
            },
        }
        created = self.cluster.ok("POST", POLICIES, body)
        self.created.append(f"{POLICIES}/{created['metadata']['name']}")
        return str(created["metadata"]["name"])

    def bind(self, policy: str, name: str = "", **spec: Any) -> str:
        body = {
            "metadata": {"name": name or f"{policy}-binding"},
            "spec": {"policyName": policy, "validationActions": ["Deny"], **spec},
        }
        created = self.cluster.ok("POST", BINDINGS, body)
        self.created.append(f"{BINDINGS}/{created['metadata']['name']}")
        return str(created["metadata"]["name"])

    def create(self, body: dict[str, Any], namespace: str | None = None, **query: str) -> Any:
        return self.cluster.request("POST", self.configmaps(namespace), body, query=query)

    def active(self, refused: Callable[[], bool]) -> None:
        """Wait until the apiserver's admission has the policy (a probe is refused)."""
        self.cluster.wait_for(refused, timeout=30, interval=0.2)

    def cleanup(self) -> None:
        for path in reversed(self.created):
            self.cluster.request("DELETE", path)


@pytest.fixture
def policies(cluster: Any) -> Iterator[Policies]:
    made = Policies(cluster)
    try:
        yield made
    finally:
        made.cleanup()


def params_configmap(policies: Policies, name: str, max_keys: int) -> None:
    """A param object: a ConfigMap outside the policy's selector (no probe label)."""
    body = {"metadata": {"name": name}, "data": {"maxKeys": str(max_keys)}}
    policies.cluster.ok("POST", policies.configmaps(), body)


MAX_KEYS = {
    "expression": "object.data.size() <= int(params.data.maxKeys)",
    "message": "too many keys",
}
CONFIGMAP_PARAMS = {"paramKind": {"apiVersion": "v1", "kind": "ConfigMap"}}


def test_a_denied_create_is_422_invalid_worded_as_the_dispatcher_and_stores_nothing(
    cluster, policies, uniq
):
    """dispatcher.go: admission.NewForbidden(a, "ValidatingAdmissionPolicy 'p' with binding
    'b' denied request: <message>"), reason = the validation's (Invalid when unset) and the
    code reasonToCode(Invalid) = 422; the cause holds the policy's sentence. A dry run is
    refused the same way, and a compliant object is admitted."""
    params_configmap(policies, f"limits-{uniq}", 1)
    policy = policies.policy("keys", [MAX_KEYS], **CONFIGMAP_PARAMS)
    binding = policies.bind(
        policy,
        paramRef={
            "name": f"limits-{uniq}",
            "namespace": cluster.namespace,
            "parameterNotFoundAction": "Deny",
        },
    )
    two = policies.configmap(f"two-{uniq}", {"a": "1", "b": "2"})
    policies.active(lambda: policies.create(two, dryRun="All")[0] == 422)
    status, error = policies.create(two)
    sentence = (
        f"ValidatingAdmissionPolicy '{policy}' with binding '{binding}' denied request: "
        "too many keys"
    )
    assert status == 422, error
    assert error["reason"] == "Invalid"
    assert error["message"] == f'configmaps "two-{uniq}" is forbidden: {sentence}'
    assert error["details"] == {
        "name": f"two-{uniq}",
        "kind": "configmaps",
        "causes": [{"message": sentence}],
    }
    assert cluster.request("GET", f"{policies.configmaps()}/two-{uniq}")[0] == 404
    status, dry = policies.create(two, dryRun="All")
    assert (status, dry["message"]) == (422, error["message"])
    status, created = policies.create(policies.configmap(f"one-{uniq}", {"a": "1"}))
    assert status == 201, created


def test_message_expression_and_reason_give_the_message_and_the_code(cluster, policies, uniq):
    """validator.go: the messageExpression's string is the message (it reads object and
    params); reason Forbidden gives 403 (reasonToCode). Without message or
    messageExpression the message is ``failed expression: <expression>``."""
    params_configmap(policies, f"limits-{uniq}", 1)
    policy = policies.policy(
        "msgexpr",
        [
            {
                "expression": "object.data.size() <= int(params.data.maxKeys)",
                "messageExpression": "'has ' + string(object.data.size()) + ' keys, the most "
                "is ' + params.data.maxKeys",
                "message": "not this one",
                "reason": "Forbidden",
            },
            {"expression": "!('forbidden' in object.data)"},
        ],
        **CONFIGMAP_PARAMS,
    )
    binding = policies.bind(
        policy,
        paramRef={
            "name": f"limits-{uniq}",
            "namespace": cluster.namespace,
            "parameterNotFoundAction": "Deny",
        },
    )
    three = policies.configmap(f"three-{uniq}", {"a": "1", "b": "2", "c": "3"})
    policies.active(lambda: policies.create(three, dryRun="All")[0] == 403)
    status, error = policies.create(three)
    assert (status, error["reason"]) == (403, "Forbidden"), error
    assert error["message"] == (
        f"configmaps \"three-{uniq}\" is forbidden: ValidatingAdmissionPolicy '{policy}' with "
        f"binding '{binding}' denied request: has 3 keys, the most is 1"
    )
    status, error = policies.create(policies.configmap(f"flag-{uniq}", {"forbidden": "x"}))
    assert status == 422, error
    assert error["message"].endswith(
        "denied request: failed expression: !('forbidden' in object.data)"
    )


def test_a_binding_namespace_selector_limits_it_to_labelled_namespaces(cluster, policies, uniq):
    """matching.go: a binding's matchResources.namespaceSelector is matched against the labels
    of the object's namespace; elsewhere the policy does not run."""
    gated = f"vap-gated-{uniq}"
    cluster.ok(
        "POST", "/api/v1/namespaces", {"metadata": {"name": gated, "labels": {"team": uniq}}}
    )
    try:
        policy = policies.policy("nsel", [{"expression": "false", "message": "not in this team"}])
        policies.bind(policy, matchResources={"namespaceSelector": {"matchLabels": {"team": uniq}}})
        body = policies.configmap(f"cm-{uniq}", {"a": "1"})
        policies.active(lambda: policies.create(body, gated, dryRun="All")[0] == 422)
        status, error = policies.create(body, gated)
        assert status == 422 and error["message"].endswith("denied request: not in this team")
        status, created = policies.create(body)  # the test namespace has no team label
        assert status == 201, created
    finally:
        cluster.request("DELETE", f"/api/v1/namespaces/{gated}")


def test_a_missing_param_denies_or_allows_as_parameter_not_found_action_says(
    cluster, policies, uniq
):
    """generic CollectParams: no param under ``Deny`` is the binding's configuration error
    (``failed to configure binding: no params found for policy binding with `Deny`
    parameterNotFoundAction``, subject to failurePolicy Fail: 422); under ``Allow`` the
    binding admits."""
    policy = policies.policy("noparam", [MAX_KEYS], **CONFIGMAP_PARAMS)
    deny = policies.bind(
        policy,
        f"{policy}-deny",
        paramRef={"name": f"absent-{uniq}", "parameterNotFoundAction": "Deny"},
        matchResources={"objectSelector": {"matchLabels": {"mode": "deny"}}},
    )
    policies.bind(
        policy,
        f"{policy}-allow",
        paramRef={"name": f"absent-{uniq}", "parameterNotFoundAction": "Allow"},
        matchResources={"objectSelector": {"matchLabels": {"mode": "allow"}}},
    )
    denied = policies.configmap(f"deny-{uniq}", {"a": "1"}, labels={"mode": "deny"})
    policies.active(lambda: policies.create(denied, dryRun="All")[0] == 422)
    status, error = policies.create(denied)
    assert status == 422 and error["reason"] == "Invalid", error
    assert error["message"] == (
        f"configmaps \"deny-{uniq}\" is forbidden: ValidatingAdmissionPolicy '{policy}' with "
        f"binding '{deny}' denied request: failed to configure binding: no params found for "
        "policy binding with `Deny` parameterNotFoundAction"
    )
    allowed = policies.configmap(f"allow-{uniq}", {"a": "1", "b": "2"}, labels={"mode": "allow"})
    status, created = policies.create(allowed)
    assert status == 201, created


def test_a_param_kind_that_is_not_served_fails_the_policy(cluster, policies, uniq):
    """policy_source.go: a paramKind with no REST mapping is the policy's configuration error
    (no binding named), worded ``failed to find resource referenced by paramKind: '<group>/
    <version>, Kind=<kind>'``; failurePolicy Fail refuses the request."""
    group = f"absent{uniq}.sftjob.dev"
    policy = policies.policy(
        "nokind", [MAX_KEYS], paramKind={"apiVersion": f"{group}/v1", "kind": "Limits"}
    )
    policies.bind(policy, paramRef={"name": "any", "parameterNotFoundAction": "Allow"})
    body = policies.configmap(f"cm-{uniq}", {"a": "1"})
    policies.active(lambda: policies.create(body, dryRun="All")[0] == 422)
    status, error = policies.create(body)
    assert status == 422, error
    assert error["message"] == (
        f"configmaps \"cm-{uniq}\" is forbidden: ValidatingAdmissionPolicy '{policy}' denied "
        f"request: failed to configure policy: failed to find resource referenced by "
        f"paramKind: '{group}/v1, Kind=Limits'"
    )


def test_update_rules_see_old_object_and_operations_select_the_requests(cluster, policies, uniq):
    """``oldObject`` is null on CREATE and the stored object on UPDATE; ``request.operation``
    tells them apart; a policy whose rules list only UPDATE never runs on a create."""
    policy = policies.policy(
        "update",
        [
            {
                "expression": "oldObject == null || object.data.size() >= oldObject.data.size()",
                "message": "keys may not be removed",
            },
            {
                "expression": "request.operation == 'UPDATE' || object.data.size() > 0",
                "message": "start with a key",
            },
        ],
    )
    policies.bind(policy)
    only_update = policies.policy("onlyupdate", [{"expression": "false", "message": "frozen"}])
    only_update_spec = cluster.ok("GET", f"{POLICIES}/{only_update}")
    only_update_spec["spec"]["matchConstraints"]["resourceRules"][0]["operations"] = ["UPDATE"]
    only_update_spec["spec"]["matchConstraints"]["objectSelector"] = {
        "matchLabels": {"frozen": uniq}
    }
    cluster.ok("PUT", f"{POLICIES}/{only_update}", only_update_spec)
    policies.bind(only_update)
    policies.active(
        lambda: policies.create(policies.configmap(f"e-{uniq}", {}), dryRun="All")[0] == 422
    )
    status, error = policies.create(policies.configmap(f"empty-{uniq}", {}))
    assert status == 422 and error["message"].endswith("start with a key"), error
    frozen = f"frozen-{uniq}"
    status, created = policies.create(
        policies.configmap(frozen, {"a": "1"}, labels={"frozen": uniq})
    )
    assert status == 201, created  # the UPDATE-only policy does not run on a create

    def merge_patch(name: str, data: dict[str, Any]) -> tuple[int, Any]:
        return cluster.request(
            "PATCH",
            f"{policies.configmaps()}/{name}",
            {"data": data},
            content_type="application/merge-patch+json",
        )

    status, error = merge_patch(frozen, {"b": "2"})
    assert status == 422 and error["message"].endswith("denied request: frozen"), error
    name = f"cm-{uniq}"
    assert policies.create(policies.configmap(name, {"a": "1", "b": "2"}))[0] == 201
    status, error = merge_patch(name, {"b": None})
    assert status == 422, error
    assert error["message"].endswith("denied request: keys may not be removed")
    assert cluster.ok("GET", f"{policies.configmaps()}/{name}")["data"] == {"a": "1", "b": "2"}
    status, patched = merge_patch(name, {"c": "3"})
    assert status == 200 and patched["data"] == {"a": "1", "b": "2", "c": "3"}, patched


def test_variables_and_match_conditions(cluster, policies, uniq):
    """Variables are evaluated in order and read as ``variables.<name>``; a false
    matchCondition skips the policy for that request."""
    policy = policies.policy(
        "vars",
        [
            {
                "expression": "variables.keys <= 1",
                "messageExpression": "variables.label + ' has ' + string(variables.keys)",
            }
        ],
        variables=[
            {"name": "keys", "expression": "object.data.size()"},
            {"name": "label", "expression": "'configmap ' + object.metadata.name"},
        ],
        matchConditions=[
            {"name": "not-exempt", "expression": "!object.metadata.name.startsWith('exempt-')"}
        ],
    )
    policies.bind(policy)
    body = policies.configmap(f"many-{uniq}", {"a": "1", "b": "2"})
    policies.active(lambda: policies.create(body, dryRun="All")[0] == 422)
    status, error = policies.create(body)
    assert status == 422, error
    assert error["message"].endswith(f"denied request: configmap many-{uniq} has 2")
    status, created = policies.create(policies.configmap(f"exempt-{uniq}", {"a": "1", "b": "2"}))
    assert status == 201, created


def test_the_warn_action_admits_with_a_warning_header(cluster, policies, uniq):
    """dispatcher.go: Warn adds ``Validation failed for ValidatingAdmissionPolicy 'p' with
    binding 'b': <message>`` to the response's warnings and the request succeeds."""
    policy = policies.policy("warn", [{"expression": "false", "message": "just saying"}])
    binding = policies.bind(policy, validationActions=["Warn"])
    body = policies.configmap(f"cm-{uniq}", {"a": "1"})

    def warning() -> str:
        response = cluster._send(
            "POST",
            policies.configmaps(),
            body,
            {"dryRun": "All"},
            {"Accept": "application/json", "Content-Type": "application/json"},
            timeout=30,
        )
        assert response.status == 201
        return str(response.getheaders().get("Warning") or "")

    policies.active(lambda: "just saying" in warning())
    assert warning() == (
        f"299 - \"Validation failed for ValidatingAdmissionPolicy '{policy}' with binding "
        f"'{binding}': just saying\""
    )


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (
            {"validations": [{"expression": "object.data.nosuch +"}]},
            "spec.validations[0].expression",
            "compilation failed: ERROR: <input>:1:",
        ),
        (
            {"validations": [{"expression": "params.x == 1"}]},
            "spec.validations[0].expression",
            "undeclared reference to 'params",
        ),
        (
            {"validations": [{"expression": "'a'"}]},
            "spec.validations[0].expression",
            "must evaluate to bool but got string",
        ),
        ({"validations": []}, "spec.validations", "Required value"),
        (
            {"validations": [{"expression": "true", "reason": "Teapot"}]},
            "spec.validations[0].reason",
            'Unsupported value: "Teapot"',
        ),
    ],
    ids=["syntax", "params-without-paramkind", "not-bool", "none", "reason"],
)
def test_a_policy_whose_expressions_do_not_compile_is_refused(cluster, uniq, spec, field, words):
    """pkg/apis/admissionregistration/validation: expressions are compiled when the policy is
    written (params is declared only with a paramKind); errors are 422 at their field."""
    body = {
        "metadata": {"name": f"bad-{uniq}"},
        "spec": {
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["configmaps"],
                    }
                ]
            },
            **spec,
        },
    }
    status, error = cluster.request("POST", POLICIES, body)
    assert status == 422, error
    causes = {c["field"]: c["message"] for c in error["details"]["causes"]}
    assert words in causes[field], causes
    assert cluster.request("GET", f"{POLICIES}/bad-{uniq}")[0] == 404


def test_a_binding_needs_a_parameter_not_found_action_and_one_action(cluster, uniq):
    """validateParamRef / validateValidationActions: parameterNotFoundAction is required in
    v1, and a binding needs at least one validation action."""
    body = {
        "metadata": {"name": f"bad-{uniq}"},
        "spec": {"policyName": "any", "paramRef": {"name": "x"}, "validationActions": []},
    }
    status, error = cluster.request("POST", BINDINGS, body)
    assert status == 422, error
    causes = {c["field"]: c["message"] for c in error["details"]["causes"]}
    assert causes["spec.paramRef.parameterNotFoundAction"] == "Required value"
    assert causes["spec.validationActions"] == (
        "Required value: at least one validation action is required"
    )


def test_the_status_subresource_is_evaluated_only_when_a_rule_names_it(
    cluster, policies, widgets, uniq
):
    """rules.Matcher.resource: ``widgets`` matches requests without a subresource only; a
    status write is evaluated by a rule naming ``widgets/status`` (there ``object`` is the
    whole object as the status write leaves it)."""
    name = f"big-{uniq}"
    widgets.create(name, {"size": 9})

    def rules(resources: list[str]) -> dict[str, Any]:
        return {
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [widgets.group],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": resources,
                    }
                ]
            }
        }

    spec_policy = policies.policy(
        "size", [{"expression": "object.spec.size < 5", "message": "too big"}], **rules(["widgets"])
    )
    policies.bind(spec_policy)
    status_policy = policies.policy(
        "phase",
        [{"expression": "object.status.phase != 'Stuck'", "message": "never stuck"}],
        **rules(["widgets/status"]),
    )
    policies.bind(status_policy)
    probe = {"apiVersion": f"{widgets.group}/v1", "kind": "Widget", "metadata": {"name": "p"}}
    probe["spec"] = {"size": 9}
    policies.active(
        lambda: cluster.request("POST", widgets.path(), probe, query={"dryRun": "All"})[0] == 422
    )
    merge = "application/merge-patch+json"
    status, error = cluster.request(
        "PATCH", widgets.path(name), {"spec": {"size": 8}}, content_type=merge
    )
    assert status == 422 and error["message"].endswith("denied request: too big"), error
    status, body = cluster.request(
        "PATCH", widgets.path(name, "status"), {"status": {"phase": "Running"}}, content_type=merge
    )
    assert status == 200 and body["status"]["phase"] == "Running", body
    status, error = cluster.request(
        "PATCH", widgets.path(name, "status"), {"status": {"phase": "Stuck"}}, content_type=merge
    )
    assert status == 422 and error["message"].endswith("denied request: never stuck"), error


def test_request_and_namespace_object_describe_the_request(cluster, policies, uniq):
    """cel.CreateAdmissionRequest and CreateNamespaceObject: ``request`` carries the operation,
    the resource, the namespace, the name, dryRun and the caller; ``namespaceObject`` is the
    object's namespace (its metadata, spec and status)."""
    fields = (
        "request.operation + ' ' + request.resource.group + '/' + request.resource.version + "
        "'/' + request.resource.resource + ' ' + request.kind.kind + ' ' + request.namespace + "
        "' ' + request.name + ' ' + string(request.dryRun) + ' ' + "
        "namespaceObject.metadata.name + ' ' + namespaceObject.status.phase"
    )
    policy = policies.policy(
        "request",
        [
            {"expression": "request.userInfo.username == ''", "messageExpression": fields},
        ],
    )
    policies.bind(policy)
    body = policies.configmap(f"cm-{uniq}", {"a": "1"})
    policies.active(lambda: policies.create(body, dryRun="All")[0] == 422)
    ns = cluster.namespace
    status, error = policies.create(body, dryRun="All")
    assert status == 422, error
    assert error["message"].endswith(
        f"denied request: CREATE /v1/configmaps ConfigMap {ns} cm-{uniq} true {ns} Active"
    )
    status, error = policies.create(body)
    assert error["message"].endswith(f"{ns} cm-{uniq} false {ns} Active"), error
