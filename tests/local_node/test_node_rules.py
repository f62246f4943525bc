"""The local node's pure rules: GPU requests, $(VAR) expansion, mount-path
rewriting, quantities, termination messages, DNS records."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sftjob_local.node_dns import compute_records, render_hosts
from sftjob_local.node_spec import (
    MountMap,
    expand,
    gpu_requests,
    parse_quantity,
    resource_field_ref,
    termination_message,
)


def test_gpu_requests_sum_containers_and_take_max_with_init_containers() -> None:
    pod = {
        "spec": {
            "containers": [
                {"resources": {"limits": {"nvidia.com/gpu": 2}}},
                {"resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"cpu": "1"}}},
                {},
            ],
            "initContainers": [{"resources": {"limits": {"nvidia.com/gpu": "4"}}}],
        }
    }
    assert gpu_requests(pod) == {"nvidia.com/gpu": 4}
    pod["spec"]["initContainers"] = []
    assert gpu_requests(pod) == {"nvidia.com/gpu": 3}
    assert gpu_requests({"spec": {"containers": [{"resources": {"limits": {"amd.com/gpu": 1}}}]}}) == {"amd.com/gpu": 1}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)/x", "1/x"),
        ("$$(A)", "$(A)"),
        ("$(MISSING)", "$(MISSING)"),
        ("$(A", "$(A"),
        ("a$b $(B)$(A)", "a$b two1"),
    ],
)
def test_expand_follows_kubernetes(text: str, expected: str) -> None:
    assert expand(text, {"A": "1", "B": "two"}) == expected


def test_mount_map_rewrites_whole_path_prefixes_only() -> None:
    m = MountMap()
    m.add("/data", "/real/d")
    m.add("/data/ckpt/", "/real/c")
    m.add("/dev/termination-log", "/real/t")
    assert m.rewrite("/data") == "/real/d"
    assert (
        m.rewrite("--in=/data/x.json --out=/data/ckpt/s1") == "--in=/real/d/x.json --out=/real/c/s1"
    )
    assert m.rewrite("open('/data/a')") == "open('/real/d/a')"
    assert m.rewrite("/database /x/data /data2 /data.bak") == "/database /x/data /data2 /data.bak"
    assert m.rewrite("/dev/termination-log") == "/real/t"
    assert m.resolve("/data/ckpt/a") == "/real/c/a"
    assert m.resolve("/elsewhere") is None


def test_quantities() -> None:
    assert parse_quantity("500m") == Decimal("0.5")
    assert parse_quantity("2Gi") == 2 * 2**30
    assert parse_quantity(3) == 3
    with pytest.raises(ValueError):
        parse_quantity("3 bananas")
    container = {"resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}}}
    assert resource_field_ref(container, {"resource": "limits.cpu"}, {}) == "2"
    assert resource_field_ref(container, {"resource": "limits.memory", "divisor": "1Mi"}, {}) == "1024"  # fmt: skip
    assert resource_field_ref({}, {"resource": "limits.cpu"}, {"cpu": "8"}) == "8"


def test_termination_message_file_wins_and_fallback_needs_an_error() -> None:
    log = b"".join(f"l{i}\n".encode() for i in range(100))
    assert termination_message(b"msg", log, "FallbackToLogsOnError", 1) == "msg"
    assert termination_message(b"", log, "FallbackToLogsOnError", 0) == ""
    assert termination_message(b"", log, "File", 1) == ""
    tail = termination_message(b"", log, "FallbackToLogsOnError", 1)
    assert tail.startswith("l20\n") and tail.endswith("l99\n")


def _pod(name: str, ns: str, ip: str, labels: dict, **spec: str) -> dict:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": spec,
        "status": {"phase": "Running", "podIP": ip},
    }


def test_dns_records_follow_services_like_coredns() -> None:
    pods = [
        _pod("a", "ns1", "127.0.1.1", {"j": "x"}, hostname="r0", subdomain="hl"),
        _pod("b", "ns1", "127.0.1.2", {"j": "x"}, hostname="r1", subdomain="hl"),
        _pod("c", "ns1", "127.0.1.3", {"j": "y"}, hostname="r2", subdomain="nosvc"),
        _pod("d", "ns2", "127.0.1.4", {"j": "x"}),
    ]
    pods.append(
        dict(
            _pod("e", "ns1", "127.0.1.5", {"j": "x"}),
            status={"phase": "Pending", "podIP": "127.0.1.5"},
        )
    )
    services = [
        {
            "metadata": {"name": "hl", "namespace": "ns1"},
            "spec": {"clusterIP": "None", "selector": {"j": "x"}},
        },  # fmt: skip
        {
            "metadata": {"name": "web", "namespace": "ns1"},
            "spec": {"clusterIP": "10.0.0.1", "selector": {"j": "x"}},
        },  # fmt: skip
        {"metadata": {"name": "web", "namespace": "ns2"}, "spec": {"selector": {"j": "x"}}},
    ]
    rec = compute_records(pods, services)
    assert rec["hl.ns1.svc.cluster.local"] == ["127.0.1.1", "127.0.1.2"]
    assert rec["r1.hl.ns1.svc.cluster.local"] == ["127.0.1.2"]
    assert "r2.nosvc.ns1.svc.cluster.local" not in rec  # no Service named like the subdomain
    assert rec["web.ns1.svc"] == ["127.0.1.1"]  # not headless: one address
    assert rec["web.ns2"] == ["127.0.1.4"]
    assert "web" not in rec and rec["hl"] == ["127.0.1.1", "127.0.1.2"]  # bare only when unique
    assert all("127.0.1.5" not in ips for ips in rec.values())  # not ready
    assert "127.0.1.2 r1.hl.ns1.svc.cluster.local\n" in render_hosts(rec)
    # publishNotReadyAddresses: a pod with an IP is published before it runs
    early = {"metadata": {"name": "early", "namespace": "ns1"}, "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"j": "x"}}}  # fmt: skip
    rec = compute_records(pods, [early])
    assert rec["early.ns1.svc"] == ["127.0.1.1", "127.0.1.2", "127.0.1.5"]
