"""The real kubectl (no extra flags) installing ``deploy/`` and explaining the SFTJob CRD
against a fresh API emulator: ``kubectl apply -k deploy/`` works on the first try, and
``kubectl explain`` prints the CRD's field descriptions (OpenAPI v3, and v2 as protobuf)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import ssl
import subprocess
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sftjob_local.emulator import EmulatorThread
from sftjob_local.emulator.preinstalled import KOPF_PEERING_CRDS

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.local,
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed"),
]


class Kubectl:
    def __init__(self, server: EmulatorThread, kubeconfig: Path, cache: Path) -> None:
        assert server.emulator is not None
        self.url = server.url
        # Raw requests as an authenticated client: the admin's token over the emulator's TLS.
        self.token = server.emulator.admin_token
        self.ssl = ssl.create_default_context(cadata=server.emulator.ca_pem.decode())
        # A private discovery cache, as a user's ~/.kube/cache: kept between the calls.
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBECACHEDIR": str(cache)}

    def __call__(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["kubectl", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
        if check:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def http(self, path: str, accept: str) -> tuple[int, str, bytes]:
        request = urllib.request.Request(
            self.url + path, headers={"Accept": accept, "Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.ssl) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.fixture
def kubectl(tmp_path: Path) -> Iterator[Kubectl]:
    with EmulatorThread(log_dir=tmp_path / "logs") as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        yield Kubectl(server, kubeconfig, tmp_path / "cache")


def test_apply_k_deploy_works_the_first_time(kubectl: Kubectl) -> None:
    first = kubectl("apply", "-k", "deploy/")
    assert first.stderr == ""
    out = first.stdout
    assert "namespace/sftjob-system created" in out
    assert "customresourcedefinition.apiextensions.k8s.io/sftjobs.tuning.sftjob.dev created" in out
    # Kopf's peering CRDs are served from the start, exactly as deploy/ ships them.
    assert "clusterkopfpeerings.kopf.dev unchanged" in out
    assert "kopfpeerings.kopf.dev unchanged" in out
    assert "clusterkopfpeering.kopf.dev/sftjob-operator created" in out
    assert "deployment.apps/sftjob-operator created" in out

    again = kubectl("apply", "-k", "deploy/").stdout.splitlines()
    assert again and all(line.endswith(" unchanged") for line in again), again

    assert "sftjob-operator" in kubectl("get", "clusterkopfpeerings").stdout
    assert "sftjob-operator" in kubectl("get", "deploy", "-n", "sftjob-system").stdout
    crds = kubectl("get", "crd", "-o", "name").stdout.split()
    assert sorted(crds) == [
        "customresourcedefinition.apiextensions.k8s.io/clusterkopfpeerings.kopf.dev",
        "customresourcedefinition.apiextensions.k8s.io/kopfpeerings.kopf.dev",
        "customresourcedefinition.apiextensions.k8s.io/sftjobs.tuning.sftjob.dev",
        "customresourcedefinition.apiextensions.k8s.io/sftprofiles.tuning.sftjob.dev",
    ]


def test_uninstall_in_the_readme_order(kubectl: Kubectl) -> None:
    """README "Uninstall": jobs, then the operator, then the rest; nothing waits for an
    operator (none runs here: the jobs carry no finalizer to wait on)."""
    kubectl("apply", "-k", "deploy/")
    kubectl("apply", "-f", "deploy/examples/tiny-cpu.yaml")
    assert kubectl("get", "sftjobs", "-A", "-o", "name").stdout.strip()
    for command in (
        "kubectl delete sftjobs --all -A",
        "kubectl delete -f deploy/operator.yaml",
        "kubectl delete -k deploy/ --ignore-not-found",
    ):
        assert "deleted" in kubectl(*shlex.split(command)[1:]).stdout, command
        assert kubectl("get", "sftjobs", "-A", "-o", "name", check=False).stdout.strip() == ""
    crds = kubectl("get", "crd", "-o", "name").stdout
    assert "sftjobs.tuning.sftjob.dev" not in crds
    assert "sftprofiles.tuning.sftjob.dev" not in crds


def test_preinstalled_peering_crds_are_the_ones_deploy_ships() -> None:
    shipped = [
        doc
        for doc in yaml.safe_load_all((REPO / "deploy" / "kopf-peering.yaml").read_text())
        if doc and doc["kind"] == "CustomResourceDefinition"
    ]
    assert shipped == list(KOPF_PEERING_CRDS)


def test_crd_and_its_object_in_one_apply_behave_as_on_a_real_server(kubectl: Kubectl) -> None:
    # kubectl maps every object before creating any: the object of a CRD created in the same
    # apply is unknown then (on a real cluster too). Client-side validation, which kubectl
    # uses for kinds the server's OpenAPI v3 does not know, must not fail on the way there.
    manifest = textwrap.dedent(
        """\
        apiVersion: apiextensions.k8s.io/v1
        kind: CustomResourceDefinition
        metadata: {name: doodads.deploy.test.sftjob.dev}
        spec:
          group: deploy.test.sftjob.dev
          scope: Namespaced
          names: {plural: doodads, singular: doodad, kind: Doodad}
          versions:
          - name: v1
            served: true
            storage: true
            schema:
              openAPIV3Schema:
                type: object
                properties:
                  spec: {type: object, properties: {size: {type: integer}}}
        ---
        apiVersion: deploy.test.sftjob.dev/v1
        kind: Doodad
        metadata: {name: d1, namespace: default}
        spec: {size: 1}
        """
    )
    first = kubectl("apply", "-f", "-", stdin=manifest, check=False)
    assert "doodads.deploy.test.sftjob.dev created" in first.stdout
    assert "proto:" not in first.stderr
    assert "ensure CRDs are installed first" in first.stderr
    second = kubectl("apply", "-f", "-", stdin=manifest)
    assert "doodad.deploy.test.sftjob.dev/d1 created" in second.stdout


def test_openapi_documents_honour_accept(kubectl: Kubectl) -> None:
    v2_protobuf = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"
    status, content_type, body = kubectl.http("/openapi/v2", v2_protobuf)
    assert status == 200 and "protobuf" in content_type and not body.startswith(b"{")
    status, content_type, body = kubectl.http("/openapi/v2", "application/json")
    assert status == 200 and content_type.startswith("application/json")
    assert json.loads(body)["swagger"] == "2.0"

    status, _, body = kubectl.http("/openapi/v3", "application/json, */*")
    path = json.loads(body)["paths"]["apis/kopf.dev/v1"]["serverRelativeURL"]
    status, content_type, body = kubectl.http(path, "application/json")
    assert status == 200 and content_type.startswith("application/json")
    schemas: dict[str, Any] = json.loads(body)["components"]["schemas"]
    gvks = [gvk for s in schemas.values() for gvk in s["x-kubernetes-group-version-kind"]]
    assert {"group": "kopf.dev", "version": "v1", "kind": "ClusterKopfPeering"} in gvks
    # Protobuf only for a v3 document (never served): 406, as JSON, nothing to misparse.
    status, content_type, body = kubectl.http(
        path, "application/com.github.proto-openapi.spec.v3@v1.0+protobuf"
    )
    assert status == 406 and json.loads(body)["reason"] == "NotAcceptable"


def test_explain_prints_the_crd_field_descriptions(kubectl: Kubectl) -> None:
    assert "created" in kubectl("apply", "-f", "crds/sftjob.yaml").stdout

    training = kubectl("explain", "sftjob.spec.training").stdout
    assert "KIND:       SFTJob" in training and "GROUP:      tuning.sftjob.dev" in training
    assert "Trainer settings (TRL SFTConfig)." in training
    assert "maxLength\t<integer>" in training

    # A short name needs current discovery in kubectl's cache: `explain` does not refresh it
    # for short names (kubectl's shortcut expander; the same on a real cluster), but the
    # `explain sftjob...` above did, as any `kubectl get sft` would.
    max_length = kubectl("explain", "sft.spec.training.maxLength").stdout
    assert "FIELD: maxLength <integer>" in max_length
    assert "Maximum tokens per sequence (or per packed row)." in max_length

    # The OpenAPI v2 renderer: /openapi/v2 as protobuf.
    legacy = kubectl("explain", "sftjobs.spec.training", "--output=plaintext-openapiv2").stdout
    assert "Trainer settings (TRL SFTConfig)." in legacy and "maxLength" in legacy


def test_sftprofiles_apply_list_explain_and_refuse_what_the_model_refuses(
    kubectl: Kubectl,
) -> None:
    assert "created" in kubectl("apply", "-f", "crds/sftprofile.yaml").stdout
    applied = kubectl(
        "apply", "-f", "deploy/examples/profile-shared-gpu-lora.yaml",
        "-f", "deploy/examples/profile-research.yaml",
    ).stdout  # fmt: skip
    assert "sftprofile.tuning.sftjob.dev/shared-gpu-lora created" in applied
    assert "sftprofile.tuning.sftjob.dev/research created" in applied

    # Cluster-scoped, with the printer columns an admin checks.
    table = kubectl("get", "sftp").stdout.splitlines()
    assert table[0].split() == ["NAME", "NAMESPACES", "MAX", "NODES", "MAX", "GPUS", "IMAGE", "AGE"]
    shared = next(line for line in table if line.startswith("shared-gpu-lora"))
    assert "ghcr.io/sftjob/sftjob-trainer:0.1.0" in shared and " 1 " in shared

    limits = kubectl("explain", "sftprofile.spec.limits").stdout
    assert "KIND:       SFTProfile" in limits
    assert "maxNodes\t<integer>" in limits and "allowedImages\t<[]string>" in limits

    # The CRD's CEL rules: the API server refuses what parse_profile refuses, at the same field.
    broken = yaml.safe_load((REPO / "deploy/examples/profile-research.yaml").read_text())
    broken["metadata"]["name"] = "broken"
    broken["spec"]["defaults"]["activeDeadlineSeconds"] = 999999
    broken["spec"]["namespaceSelector"]["matchExpressions"][0]["values"] = []
    refused = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(broken), check=False)
    assert refused.returncode != 0
    assert "spec.defaults.activeDeadlineSeconds" in refused.stderr
    assert "is longer than limits.maxActiveDeadlineSeconds" in refused.stderr
    assert "spec.namespaceSelector.matchExpressions[0].values" in refused.stderr
    takes_cache = yaml.safe_load((REPO / "deploy/examples/profile-research.yaml").read_text())
    takes_cache["spec"]["defaults"]["env"] = [{"name": "HF_HOME", "value": "/elsewhere"}]
    refused = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(takes_cache), check=False)
    assert refused.returncode != 0 and "spec.defaults.env" in refused.stderr
    assert "sets a name the operator sets itself in every trainer pod" in refused.stderr
