"""The live demo: local control plane + operator + real training of tiny jobs.

`sftjob demo` (and `make demo`) runs everything on this machine, no cluster needed:

1. starts the local control plane (API emulator + a node that runs pods as processes);
2. registers the SFTJob and SFTProfile CRDs, installs deploy/'s Namespace, ServiceAccount
   and ClusterRole (as the admin), an SFTProfile for the demo namespace (labelled so the
   profile selects it; both before the operator starts, so its first pass already sees
   them), and starts the operator as its own process, authenticated as that
   ServiceAccount (a token from the TokenRequest API in its own kubeconfig), so it runs
   under the same RBAC as on a cluster;
3. builds a tiny Qwen2-shaped model and small datasets locally (no hub) into the
   PersistentVolumeClaim folder `sftjob-demo-data`, which the examples mount at /data;
4. creates the claims the examples mount (data and outputs: as on a real cluster, a pod
   whose claim does not exist is never scheduled) and applies the tiny examples of
   deploy/examples with kubectl (a full fine-tune on one node, a LoRA run on two nodes),
   and, as a tenant ServiceAccount that may only create SFTJobs, a job that breaks the
   profile (refused: Failed/PolicyViolation, no pod);
5. shows live progress as `kubectl get sft` does, then the final status of each job.

`DemoEnvironment` is also what the end-to-end tests use.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .cluster import LocalCluster

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "deploy" / "examples"
CRD_PATH = REPO_ROOT / "crds" / "sftjob.yaml"
PROFILE_CRD_PATH = REPO_ROOT / "crds" / "sftprofile.yaml"
OPERATOR_RBAC = (
    REPO_ROOT / "deploy" / "base" / "namespace.yaml",
    REPO_ROOT / "deploy" / "base" / "rbac.yaml",
)
OPERATOR_NAMESPACE, OPERATOR_ACCOUNT = "sftjob-system", "sftjob-operator"
# The operator's token outlives any demo or test run (`sftjob demo --keep` included).
OPERATOR_TOKEN_SECONDS = 30 * 24 * 3600
DEMO_EXAMPLES = ("tiny-cpu.yaml", "tiny-lora-2node.yaml")
DATA_CLAIM = "sftjob-demo-data"
GROUP, VERSION, PLURAL = "tuning.sftjob.dev", "v1alpha1", "sftjobs"
PROFILE_PLURAL = "sftprofiles"
TERMINAL = ("Succeeded", "Failed")

# The demo's platform setup: a research-pool profile (full fine-tunes up to 4 nodes, as in
# deploy/examples) selecting the demo namespace by label, and a tenant who may only create
# SFTJobs there. The local node runs any image and has no GPUs, so the profile allows the
# default trainer image and limits the rest.
DEMO_POOL_LABEL = "tuning.sftjob.dev/pool"
DEMO_NAMESPACE_LABELS = {DEMO_POOL_LABEL: "demo"}
DEMO_PROFILE: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "SFTProfile",
    "metadata": {"name": "demo-research"},
    "spec": {
        "namespaceSelector": {"matchLabels": DEMO_NAMESPACE_LABELS},
        "defaults": {
            "activeDeadlineSeconds": 900,
            "ephemeralStoragePerGpu": "2Gi",
            "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        },
        "limits": {
            "allowedImages": ["ghcr.io/sftjob/"],
            "maxNodes": 4,
            "maxActiveDeadlineSeconds": 3600,
            "allowedModelSources": ["/data/"],
            "allowedSecretNames": [],
            "allowRemoteCode": False,
        },
    },
}
DEMO_TENANT = "demo-tenant"
# The tenant's job the profile refuses: remote code and more nodes than the pool allows.
REFUSED_NAME = "tiny-refused"
REFUSED_CHANGES: dict[str, Any] = {
    "model": {"trustRemoteCode": True},
    "resources": {"nodes": 8},
}


class DemoEnvironment:
    """Cluster, CRD, operator process and tiny data; a context manager."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int = 0,
        namespace: str = "default",
        reconcile_interval: float | None = None,
        fresh: bool = True,
        profiles: Iterable[dict[str, Any]] = (),
        namespace_labels: dict[str, dict[str, str]] | None = None,
        metrics_port: int | None = None,
        **cluster_options: Any,
    ) -> None:
        """`cluster_options` go to `LocalCluster` (nodes, cpus, memory, max_pods, gpus, ...).

        `profiles` (SFTProfile documents) and `namespace_labels` (namespace -> labels; made
        when missing) are installed before the operator starts: Kopf lists every indexed
        kind before the first pass, so no job is resolved before the operator sees them.
        `metrics_port`: the operator serves its Prometheus metrics on this port of the host
        (SFTJOB_METRICS_PORT, as the Deployment sets it); none by default.
        """
        self.cluster_options = cluster_options
        self.profiles = [dict(p) for p in profiles]
        self.namespace_labels = dict(namespace_labels or {})
        self.workdir = workdir.resolve()
        self.port = port
        self.namespace = namespace
        self.reconcile_interval = reconcile_interval
        self.fresh = fresh
        self.metrics_port = metrics_port
        self.cluster: LocalCluster | None = None
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_kubeconfig: Path | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> DemoEnvironment:
        if self.fresh and self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_control_plane()
        try:
            self._register_crd()
            self._install_policy()
            self.operator_kubeconfig = self._install_operator_rbac()
            self.operator = self._start_operator()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_control_plane(self) -> None:
        """The API and the node, in this process (a subclass may run them elsewhere)."""
        self.cluster = LocalCluster(port=self.port, workdir=self.workdir, **self.cluster_options)
        self.cluster.__enter__()

    def close(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.send_signal(signal.SIGTERM)
            try:
                self.operator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait()
        if self.cluster is not None:
            self.cluster.__exit__(None, None, None)
            self.cluster = None

    @property
    def kubeconfig(self) -> Path:
        assert self.cluster is not None
        return self.cluster.kubeconfig

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def _register_crd(self) -> None:
        import kubernetes

        api = kubernetes.config.new_client_from_config(str(self.kubeconfig))
        for path in (CRD_PATH, PROFILE_CRD_PATH):
            crd = yaml.safe_load(path.read_text())
            try:
                kubernetes.client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
            except kubernetes.client.ApiException as exc:
                if exc.status != 409:
                    raise

    def _install_policy(self) -> None:
        """The namespaces' labels and the profiles, as the admin (idempotent)."""
        import kubernetes

        api = kubernetes.config.new_client_from_config(str(self.kubeconfig))
        core = kubernetes.client.CoreV1Api(api)
        for name, labels in self.namespace_labels.items():
            body = {"metadata": {"name": name, "labels": labels}}
            try:
                core.create_namespace(body)
            except kubernetes.client.ApiException as exc:
                if exc.status != 409:
                    raise
                core.patch_namespace(name, body)
        custom = kubernetes.client.CustomObjectsApi(api)
        for profile in self.profiles:
            try:
                custom.create_cluster_custom_object(GROUP, VERSION, PROFILE_PLURAL, profile)
            except kubernetes.client.ApiException as exc:
                if exc.status != 409:
                    raise

    def tenant_kubeconfig(self, namespace: str, account: str) -> Path:
        """A kubeconfig for a tenant ServiceAccount that may only create SFTJobs in
        `namespace` (see install_tenant_account)."""
        path = self.workdir / f"tenant-{namespace}-{account}-kubeconfig"
        return install_tenant_account(self.kubeconfig, namespace, account, path)

    def _install_operator_rbac(self) -> Path:
        return install_operator_account(self.kubeconfig, self.workdir / "operator-kubeconfig")

    def _start_operator(self) -> subprocess.Popen[bytes]:
        assert self.operator_kubeconfig is not None
        env = {
            **self.env,
            "KUBECONFIG": str(self.operator_kubeconfig),
        }
        if self.reconcile_interval is not None:
            # The operator's safety resync; changes themselves arrive by its watches.
            env["SFTJOB_RESYNC_SECONDS"] = str(self.reconcile_interval)
        if self.metrics_port is not None:
            env["SFTJOB_METRICS_PORT"] = str(self.metrics_port)
        log = (self.workdir / "operator.log").open("wb")
        return subprocess.Popen(
            [sys.executable, "-m", "sftjob_operator.cli", "operator", "-A", "--standalone"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    # ------------------------------------------------------------------ data

    def data_dir(self, claim: str = DATA_CLAIM) -> Path:
        # The local node backs each PersistentVolumeClaim with this folder.
        return self.workdir / "pvc" / self.namespace / claim

    def prepare_data(self) -> dict[str, Path]:
        """The tiny model and datasets the examples read from /data (no hub)."""
        from sftjob_trainer.tiny import build_tiny_model, write_tiny_datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the demo prints its own progress

        folder = self.data_dir()
        folder.mkdir(parents=True, exist_ok=True)
        build_tiny_model(folder / "tiny-model")
        files = write_tiny_datasets(folder)
        self.create_claims([DATA_CLAIM])
        return files

    def create_claims(self, names: Iterable[str]) -> None:
        """ReadWriteMany PersistentVolumeClaims (every rank mounts them): as on a real
        cluster, a pod whose claim does not exist is never scheduled."""
        self.apply_objects(
            [
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": name, "namespace": self.namespace},
                    "spec": {
                        "accessModes": ["ReadWriteMany"],
                        "resources": {"requests": {"storage": "1Gi"}},
                    },
                }
                for name in dict.fromkeys(names)
            ]
        )

    # ------------------------------------------------------------------ kubectl

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise RuntimeError("kubectl is not installed; the demo drives the cluster with it")
        result = subprocess.run(
            [kubectl, *args],
            env=self.env,
            capture_output=True,
            text=True,
            input=stdin,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout + result.stderr

    def apply_files(self, paths: Iterable[Path]) -> str:
        args: list[str] = ["apply"]
        for path in paths:
            args += ["-f", str(path)]
        return self.kubectl(*args)

    def apply_objects(self, objects: list[dict[str, Any]]) -> str:
        return self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(objects))

    def jobs(self) -> list[dict[str, Any]]:
        out = self.kubectl("get", "sftjobs", "-n", self.namespace, "-o", "json")
        return list(json.loads(out)["items"])


# ---------------------------------------------------------------------- presentation


def _row(job: dict[str, Any]) -> str:
    status = job.get("status") or {}
    progress = status.get("progress") or {}
    epoch = progress.get("epoch")
    return (
        f"{job['metadata']['name']:<18} {status.get('phase') or 'Pending':<11} "
        f"{progress.get('summary') or '-':<16} "
        f"{'-' if epoch is None else f'{epoch:.2f}':<6} "
        f"{progress.get('lossDisplay') or '-':<9} {progress.get('eta') or '-'}"
    )


# The columns of `kubectl get sft` (crd.PRINTER_COLUMNS), with the same texts.
HEADER = f"{'NAME':<18} {'PHASE':<11} {'PROGRESS':<16} {'EPOCH':<6} {'LOSS':<9} ETA"


def final_report(job: dict[str, Any]) -> str:
    status = job.get("status") or {}
    name = job["metadata"]["name"]
    lines = [f"== {name}: {status.get('phase')}"]
    for condition in status.get("conditions") or []:
        lines.append(
            f"   {condition['type']:<18} {condition['status']:<6} {condition.get('reason', ''):<20} "
            f"{condition.get('message', '')}"
        )
    effective = status.get("effective") or {}
    if effective.get("profile"):
        added = ", ".join(
            f"{item['field']}={item['value']}" for item in effective.get("fromProfile") or []
        )
        lines.append(f"   profile {effective['profile']} added: {added or 'nothing'}")
    plan = status.get("plan") or {}
    if not plan:  # never planned (refused): nothing ran
        return "\n".join(lines)
    measured = status.get("measuredPlan") or {}
    for key in (
        "datasetSize",
        "worldSize",
        "effectiveBatchSize",
        "stepsPerEpoch",
        "totalSteps",
        "warmupSteps",
    ):
        lines.append(f"   plan {key:<20} spec {plan.get(key)!s:<8} measured {measured.get(key)!s}")
    progress = status.get("progress") or {}
    lines.append(
        f"   progress step {progress.get('step')}/{progress.get('totalSteps')}, loss "
        f"{progress.get('loss')}, attempts {status.get('attempts')}, restarts "
        f"{status.get('restarts', 0)}"
    )
    if status.get("outputPath"):
        lines.append(
            f"   output: {status['outputPath']} in the pods (claim "
            f"{job['spec'].get('output', {}).get('claimName')})"
        )
    return "\n".join(lines)


def watch_jobs(env: DemoEnvironment, names: list[str], timeout: float) -> list[dict[str, Any]]:
    """Print a line whenever a job's row changes, until every job is finished."""
    print(HEADER, flush=True)
    last: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    jobs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        jobs = [j for j in env.jobs() if j["metadata"]["name"] in names]
        for job in jobs:
            row = _row(job)
            if last.get(job["metadata"]["name"]) != row:
                last[job["metadata"]["name"]] = row
                print(row, flush=True)
        if len(jobs) == len(names) and all(
            (j.get("status") or {}).get("phase") in TERMINAL for j in jobs
        ):
            return jobs
        time.sleep(1.0)
    print(f"timed out after {timeout:.0f}s", flush=True)
    return jobs


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM; both end in the same clean shutdown."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def output_claims(examples: Iterable[Path]) -> list[str]:
    """The output claims the example jobs name: the demo creates them, as a user would."""
    jobs = [yaml.safe_load(path.read_text()) for path in examples]
    return [c for job in jobs if (c := (job["spec"].get("output") or {}).get("claimName"))]


def refused_job_manifest(namespace: str) -> dict[str, Any]:
    """The tiny full fine-tune, renamed, with what the demo profile refuses."""
    job = yaml.safe_load((EXAMPLES / DEMO_EXAMPLES[0]).read_text())
    job["metadata"] = {"name": REFUSED_NAME, "namespace": namespace}
    for key, changes in REFUSED_CHANGES.items():
        job["spec"][key] = {**(job["spec"].get(key) or {}), **changes}
    job["spec"].pop("output", None)  # never launched: no claim needed
    return job


def create_as(kubeconfig: Path, manifest: dict[str, Any]) -> None:
    """POST an SFTJob with the credentials of `kubeconfig` (a tenant may only create)."""
    import kubernetes

    api = kubernetes.config.new_client_from_config(str(kubeconfig))
    namespace = manifest["metadata"]["namespace"]
    kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, manifest
    )


def refused_as_expected(env: DemoEnvironment, job: dict[str, Any]) -> bool:
    """Failed/PolicyViolation, and no pod was ever made for it."""
    status = job.get("status") or {}
    failed = [c for c in status.get("conditions") or [] if c["type"] == "Failed"]
    selector = f"sftjob.dev/job-name={job['metadata']['name']}"
    namespace = job["metadata"]["namespace"]
    pods = env.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "name").strip()
    reasons = [c["reason"] for c in failed]
    return status.get("phase") == "Failed" and reasons == ["PolicyViolation"] and not pods


def run_demo(workdir: Path, *, keep: bool = False, timeout: float = 280) -> int:
    started = time.monotonic()
    examples = [EXAMPLES / name for name in DEMO_EXAMPLES]
    names = [yaml.safe_load(path.read_text())["metadata"]["name"] for path in examples]
    print(
        f"sftjob demo: local control plane, operator and {len(examples)} tiny jobs, and one "
        f"job its SFTProfile refuses (workdir {workdir})",
        flush=True,
    )
    namespace = "default"
    with DemoEnvironment(
        workdir, profiles=[DEMO_PROFILE], namespace_labels={namespace: DEMO_NAMESPACE_LABELS}
    ) as env:
        print(f"  API {env.cluster.url if env.cluster else '?'}; kubeconfig {env.kubeconfig}")
        print(
            f"  SFTProfile {DEMO_PROFILE['metadata']['name']} selects namespace {namespace} "
            f"({DEMO_POOL_LABEL}={DEMO_NAMESPACE_LABELS[DEMO_POOL_LABEL]})",
            flush=True,
        )
        print("  building a tiny model and datasets locally (no hub) ...", flush=True)
        env.prepare_data()
        env.create_claims(output_claims(examples))
        for line in env.apply_files(examples).splitlines():
            print(f"  {line}", flush=True)
        create_as(env.tenant_kubeconfig(namespace, DEMO_TENANT), refused_job_manifest(namespace))
        print(
            f"  sftjob.tuning.sftjob.dev/{REFUSED_NAME} created by ServiceAccount "
            f"{DEMO_TENANT} (may only create SFTJobs): remote code and 8 nodes",
            flush=True,
        )
        print(flush=True)
        jobs = watch_jobs(env, [*names, REFUSED_NAME], timeout)
        print()
        for job in jobs:
            print(final_report(job))
        refused = [j for j in jobs if j["metadata"]["name"] == REFUSED_NAME]
        jobs = [j for j in jobs if j["metadata"]["name"] != REFUSED_NAME]
        failed = [
            j["metadata"]["name"]
            for j in jobs
            if (j.get("status") or {}).get("phase") != "Succeeded"
        ]
        refused_ok = bool(refused) and refused_as_expected(env, refused[0])
        missing = set(names) - {j["metadata"]["name"] for j in jobs}
        elapsed = time.monotonic() - started
        print(f"\n{len(jobs) - len(failed)}/{len(names)} jobs succeeded in {elapsed:.0f}s.")
        verdict = "refused by policy, no pod" if refused_ok else "NOT refused as expected"
        print(f"{REFUSED_NAME} (the tenant's job that breaks the profile): {verdict}.")
        for job in jobs:
            claim = job["spec"].get("output", {}).get("claimName")
            if claim:
                print(f"  {job['metadata']['name']}: model in {env.data_dir(claim) / 'final'}")
        if keep:
            print(
                "\nThe cluster keeps running; in another shell:\n"
                f"  export KUBECONFIG={env.kubeconfig}\n"
                "  kubectl get sft\n  kubectl describe sft tiny-full\n"
                f"  kubectl describe sft {REFUSED_NAME}\n"
                "  kubectl logs tiny-full-a1-r0\n"
                "Ctrl-C stops it.",
                flush=True,
            )
            wait_for_interrupt()
        else:
            print("Run `sftjob demo --keep` to keep the cluster up and explore it with kubectl.")
        return 1 if failed or missing or not refused_ok else 0


def install_tenant_account(
    admin_kubeconfig: Path, namespace: str, account: str, path: Path
) -> Path:
    """A tenant: a ServiceAccount in `namespace` whose only permission is `create` on
    SFTJobs there (a Role and RoleBinding, applied as the admin); writes to `path` a
    kubeconfig that authenticates as it (a TokenRequest token)."""
    import kubernetes

    api = kubernetes.config.new_client_from_config(str(admin_kubeconfig))
    name = f"{account}-create-sftjobs"
    objects = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name},
            "rules": [{"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["create"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    ]
    for obj in objects:
        try:
            kubernetes.utils.create_from_dict(api, obj, namespace=namespace)
        except kubernetes.utils.FailToCreateError as exc:
            if any(e.status != 409 for e in exc.api_exceptions):
                raise
    return _token_kubeconfig(admin_kubeconfig, api, namespace, account, path)


def _token_kubeconfig(
    admin_kubeconfig: Path, api: Any, namespace: str, account: str, path: Path
) -> Path:
    """A copy of the admin's kubeconfig authenticating as `account` (TokenRequest API)."""
    import kubernetes

    issued = kubernetes.client.CoreV1Api(api).create_namespaced_service_account_token(
        account,
        namespace,
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": OPERATOR_TOKEN_SECONDS},
        },
    )
    config = yaml.safe_load(admin_kubeconfig.read_text())
    context = next(
        c["context"] for c in config["contexts"] if c["name"] == config["current-context"]
    )
    context["namespace"] = namespace
    for user in config["users"]:
        if user["name"] == context["user"]:
            user["user"] = {"token": issued.status.token}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def install_operator_account(admin_kubeconfig: Path, path: Path) -> Path:
    """deploy/'s Namespace, ServiceAccount, ClusterRole and binding, applied as the admin;
    writes to `path` a copy of the admin's kubeconfig that authenticates as that
    ServiceAccount (only the API is used, so this works whatever runs the control plane)."""
    import kubernetes

    api = kubernetes.config.new_client_from_config(str(admin_kubeconfig))
    for manifest in OPERATOR_RBAC:
        for obj in yaml.safe_load_all(manifest.read_text()):
            if obj:
                kubernetes.utils.create_from_dict(api, obj)
    return _token_kubeconfig(admin_kubeconfig, api, OPERATOR_NAMESPACE, OPERATOR_ACCOUNT, path)
