"""Fixtures: the API emulator with the SFTJob CRD, the operator process, a namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
import yaml
from operator_harness import ROOT, Cluster, start_operator, stop_operator
from sftjob_local.emulator import EmulatorThread


# Module scope: one operator per test module; it must stop with its tier, not keep running
# for the rest of the run.
@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmulatorThread, Path]]:
    workdir = tmp_path_factory.mktemp("emulator")
    with EmulatorThread(log_dir=workdir / "logs") as server:
        kubeconfig = server.write_kubeconfig(workdir / "kubeconfig", "default")
        api = kubernetes.config.new_client_from_config(str(kubeconfig))
        crd = yaml.safe_load((ROOT / "crds" / "sftjob.yaml").read_text())
        kubernetes.client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
        yield server, kubeconfig


@pytest.fixture(scope="module")
def operator_process(
    emulator: tuple[EmulatorThread, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[object]:
    _, kubeconfig = emulator
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    process = start_operator(kubeconfig, log_path)
    yield process
    stop_operator(process)
    print(log_path.read_text()[-5000:])
    (Path("/tmp/operator-last.log")).write_text(log_path.read_text())


@pytest.fixture()
def cluster(emulator: tuple[EmulatorThread, Path]) -> Cluster:
    _, kubeconfig = emulator
    api = kubernetes.config.new_client_from_config(str(kubeconfig))
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    kubernetes.client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
    return Cluster(api, namespace, kubeconfig)
