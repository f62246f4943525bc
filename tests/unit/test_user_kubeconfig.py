"""`sftjob logs`/`plot` read the cluster as kubectl does: the kubeconfig's current context,
or --context, and that context's namespace (else `default`)."""

from __future__ import annotations

from pathlib import Path

import yaml
from sftjob_operator.kube import user_api_client


def write_kubeconfig(path: Path) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "one", "cluster": {"server": "https://one.example:6443"}},
            {"name": "two", "cluster": {"server": "https://two.example:6443"}},
        ],
        "users": [{"name": "me", "user": {"token": "t0k3n"}}],
        "contexts": [
            {"name": "team-a", "context": {"cluster": "one", "user": "me", "namespace": "a"}},
            {"name": "bare", "context": {"cluster": "two", "user": "me"}},
        ],
        "current-context": "team-a",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_current_context_gives_server_and_namespace(tmp_path: Path) -> None:
    client, namespace = user_api_client(str(write_kubeconfig(tmp_path / "config")))
    assert (client.configuration.host, namespace) == ("https://one.example:6443", "a")


def test_context_flag_picks_another_and_a_context_without_namespace_is_default(
    tmp_path: Path,
) -> None:
    client, namespace = user_api_client(str(write_kubeconfig(tmp_path / "config")), "bare")
    assert (client.configuration.host, namespace) == ("https://two.example:6443", "default")
