"""Fixtures for the local node: one real local control plane (API emulator +
LocalNode, HTTP only) shared by the module's tests (helpers: local_node_kit)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import kubernetes
import pytest
from kubernetes.client import CoreV1Api
from sftjob_local.cluster import LocalCluster

# The shared cluster has 2 GPUs so scheduling tests can fill it.
CLUSTER_GPUS = 2
# What the node knows of these images' USER (it never pulls one): test_run_as_non_root.py.
IMAGE_USERS = {
    "example.test/user-root:": "",
    "example.test/user-zero:": "0:0",
    "example.test/user-named:": "trainer",
    "example.test/user-1000:": "1000:1000",
}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # fast restarts keep the OnFailure test short; everything else is default
    with LocalCluster(
        workdir=tmp_path_factory.mktemp("local-cluster"),
        gpus=CLUSTER_GPUS,
        restart_backoff=0.2,
        image_users=IMAGE_USERS,
    ) as c:
        yield c


@pytest.fixture(scope="session")
def core(cluster: LocalCluster) -> CoreV1Api:
    client = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))
    return CoreV1Api(client)


@pytest.fixture
def ns(core: CoreV1Api) -> str:
    """A fresh namespace per test so names and Services never collide."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name
