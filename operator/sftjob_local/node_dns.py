"""Cluster DNS for pod processes of the local node, without a DNS server.

Records, computed from the Pods and Services the node watches (like CoreDNS
from EndpointSlices):

* a Service with a selector → the IPs of the ready (Running) pods of this
  node it selects (with `publishNotReadyAddresses`, every pod that has an
  IP, i.e. from the moment the node accepted it), under `<svc>.<ns>.svc.cluster.local`, `<svc>.<ns>.svc` and
  `<svc>.<ns>`; a headless Service (`clusterIP: None`) lists every such IP, a
  normal one the first (there is no virtual IP / kube-proxy);
* a pod with `spec.hostname` + `spec.subdomain`, selected by a Service named
  `subdomain` in its namespace → `<hostname>.<subdomain>.<ns>.svc.cluster.local`
  (and `.svc`), exactly as a real cluster requires;
* bare `<svc>`: resolved in the pod's own namespace by the Python hook below;
  in `/etc/hosts` only when the name is unique across namespaces.

How processes see them (measured: glibc resolves through `/etc/hosts`, which
torch's C++ TCPStore/gloo use; Python can be hooked):

1. the node writes every record to `<workdir>/hosts` (hosts(5) format);
2. when `/etc/hosts` is writable (root in a container/CI) the node also keeps
   a managed block there, marked with its pid, removed on stop; blocks of dead
   nodes are dropped on the next write. This covers every resolver (C, C++,
   Python, curl);
3. every pod gets `PYTHONPATH=<workdir>/pyhook:...` whose `sitecustomize.py`
   wraps `socket.getaddrinfo`/`gethostbyname[_ex]` to answer from the file of
   step 1 (with the pod namespace as search domain), so Python code resolves
   cluster names even where `/etc/hosts` is read-only (a laptop). C/C++
   resolution without step 2 is not covered in general; for torch (whose
   C++ TCPStore resolves MASTER_ADDR / `tcp://` rendezvous hosts with glibc)
   the hook, when the node does not manage /etc/hosts, also wraps
   `torch.distributed.TCPStore` so it receives the pod IP (waiting until
   the peer's name is published), which makes gloo/nccl rendezvous through
   Service names work on a laptop without root.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path
from typing import Any

Obj = dict[str, Any]

CLUSTER_DOMAIN = "cluster.local"
BEGIN = "# BEGIN sftjob-local node"
END = "# END sftjob-local node"


def _selects(selector: dict[str, str] | None, labels: dict[str, str] | None) -> bool:
    if not selector:
        return False  # a Service without selector has manual endpoints: none here
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def compute_records(pods: list[Obj], services: list[Obj]) -> dict[str, list[str]]:
    """name → IPs for the given (this node's) pods and all services."""
    ready: list[Obj] = []  # Running: endpoints of every Service
    addressed: list[Obj] = []  # has an IP (Pending too): publishNotReadyAddresses
    for pod in pods:
        status = pod.get("status") or {}
        deleting = (pod.get("metadata") or {}).get("deletionTimestamp")
        if not status.get("podIP") or deleting or status.get("phase") in ("Succeeded", "Failed"):
            continue
        addressed.append(pod)
        if status.get("phase") == "Running":
            ready.append(pod)
    for group in (ready, addressed):
        group.sort(
            key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"])
        )
    records: dict[str, list[str]] = {}

    def add(name: str, ip: str) -> None:
        ips = records.setdefault(name.lower(), [])
        if ip not in ips:
            ips.append(ip)

    bare: dict[str, set[str]] = {}
    for svc in services:
        meta = svc.get("metadata") or {}
        spec = svc.get("spec") or {}
        ns = meta.get("namespace", "default")
        name = meta["name"]
        selector = spec.get("selector")
        members = [
            p
            for p in (addressed if spec.get("publishNotReadyAddresses") else ready)
            if p["metadata"].get("namespace", "default") == ns
            and _selects(selector, p["metadata"].get("labels"))
        ]
        headless = spec.get("clusterIP") == "None"
        ips = [p["status"]["podIP"] for p in members]
        if not headless:
            ips = ips[:1]
        for ip in ips:
            for fqdn in (f"{name}.{ns}.svc.{CLUSTER_DOMAIN}", f"{name}.{ns}.svc", f"{name}.{ns}"):
                add(fqdn, ip)
            bare.setdefault(name, set()).add(ns)
        for pod in members:
            pspec = pod.get("spec") or {}
            if pspec.get("subdomain") == name:
                host = pspec.get("hostname") or pod["metadata"]["name"]
                ip = pod["status"]["podIP"]
                add(f"{host}.{name}.{ns}.svc.{CLUSTER_DOMAIN}", ip)
                add(f"{host}.{name}.{ns}.svc", ip)
    for name, namespaces in bare.items():
        if len(namespaces) == 1:
            ns = next(iter(namespaces))
            for ip in records.get(f"{name}.{ns}.svc.{CLUSTER_DOMAIN}", []):
                add(name, ip)
    return records


def render_hosts(records: dict[str, list[str]]) -> str:
    lines = []
    for name in sorted(records):
        for ip in records[name]:
            lines.append(f"{ip} {name}")
    return "\n".join(lines) + ("\n" if lines else "")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_BLOCK = re.compile(
    rf"^{re.escape(BEGIN)} pid=(\d+) id=(\S+)\n.*?^{re.escape(END)} id=\2\n", re.M | re.S
)


def update_etc_hosts(etc_hosts: Path, block_id: str, hosts_text: str | None) -> None:
    """Replace (or with None remove) this node's block in /etc/hosts, dropping
    blocks left by nodes whose process is gone. Written in place, not renamed:
    /etc/hosts is often a bind mount. An exclusive flock serializes nodes of
    several processes (parallel test runs), which would otherwise drop each
    other's blocks in their read-modify-write."""
    with open(etc_hosts, "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            current = fh.read()

            def keep(match: re.Match[str]) -> str:
                pid, bid = int(match.group(1)), match.group(2)
                if bid == block_id or not _pid_alive(pid):
                    return ""
                return match.group(0)

            text = _BLOCK.sub(keep, current)
            if text and not text.endswith("\n"):
                text += "\n"
            if hosts_text:
                text += (
                    f"{BEGIN} pid={os.getpid()} id={block_id}\n{hosts_text}{END} id={block_id}\n"
                )
            if text != current:
                fh.seek(0)
                fh.write(text)
                fh.truncate()
                fh.flush()
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def etc_hosts_writable(etc_hosts: Path = Path("/etc/hosts")) -> bool:
    with contextlib.suppress(OSError):
        return os.access(etc_hosts, os.W_OK) and etc_hosts.is_file()
    return False


# The hook every pod's Python imports at start-up (through PYTHONPATH). It must
# stay dependency-free and never break the interpreter: any error → no hook.
SITECUSTOMIZE = r'''
"""sftjob local node: resolve cluster names from the node's hosts file (Python only)."""
import os as _os
import socket as _socket


def _install():
    path = _os.environ.get("SFTJOB_LOCAL_HOSTS_FILE")
    if not path:
        return
    ns = _os.environ.get("SFTJOB_LOCAL_POD_NAMESPACE", "default")
    search = [ns + ".svc.cluster.local", "svc.cluster.local", "cluster.local"]
    cache = {"mtime": None, "map": {}}

    def table():
        try:
            mtime = _os.stat(path).st_mtime_ns
        except OSError:
            return {}
        if mtime != cache["mtime"]:
            entries = {}
            try:
                with open(path) as fh:
                    for line in fh:
                        parts = line.split("#", 1)[0].split()
                        for name in parts[1:]:
                            entries.setdefault(name.lower(), []).append(parts[0])
            except OSError:
                return cache["map"]
            cache["map"], cache["mtime"] = entries, mtime
        return cache["map"]

    def lookup(host):
        if not isinstance(host, str) or not host:
            return None
        name = host.rstrip(".").lower()
        entries = table()
        if name in entries:
            return entries[name]
        if not host.endswith(".") and name.count(".") < 5:
            for domain in search:
                hit = entries.get(name + "." + domain)
                if hit:
                    return hit
        return None

    real_getaddrinfo = _socket.getaddrinfo
    real_gethostbyname = _socket.gethostbyname
    real_gethostbyname_ex = _socket.gethostbyname_ex

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        ips = lookup(host.decode() if isinstance(host, bytes) else host)
        if ips and family in (0, _socket.AF_INET):
            out = []
            for ip in ips:
                out.extend(real_getaddrinfo(ip, port, _socket.AF_INET, type, proto, flags))
            return out
        return real_getaddrinfo(host, port, family, type, proto, flags)

    def gethostbyname(host):
        ips = lookup(host)
        return ips[0] if ips else real_gethostbyname(host)

    def gethostbyname_ex(host):
        ips = lookup(host)
        return (host, [], list(ips)) if ips else real_gethostbyname_ex(host)

    _socket.getaddrinfo = getaddrinfo
    _socket.gethostbyname = gethostbyname
    _socket.gethostbyname_ex = gethostbyname_ex
    if _os.environ.get("SFTJOB_LOCAL_TORCH_HOOK") == "1":
        _install_torch_hook(lookup)


def _install_torch_hook(lookup):
    """torch's C++ TCPStore resolves with glibc, which cannot see the node's
    names without /etc/hosts: hand it the address instead. Cluster names not
    published yet (peer pod still starting) are waited for, like DNS retries."""
    import importlib.util
    import sys
    import time

    def resolve(host):
        if not isinstance(host, str):
            return host
        deadline = time.monotonic() + float(_os.environ.get("SFTJOB_LOCAL_RESOLVE_TIMEOUT", "120"))
        cluster_name = host.rstrip(".").endswith((".svc", ".svc.cluster.local"))
        while True:
            ips = lookup(host)
            if ips:
                return ips[0]
            if not cluster_name or time.monotonic() > deadline:
                return host
            time.sleep(0.1)

    def patch(dist):
        original = getattr(dist, "TCPStore", None)
        if original is None:
            return

        class TCPStore(original):
            def __init__(self, *args, **kwargs):
                if "host_name" in kwargs:
                    kwargs["host_name"] = resolve(kwargs["host_name"])
                elif args:
                    args = (resolve(args[0]),) + tuple(args[1:])
                super().__init__(*args, **kwargs)

        TCPStore.__name__ = TCPStore.__qualname__ = "TCPStore"
        for name, module in list(sys.modules.items()):
            if name.startswith("torch.distributed") and getattr(module, "TCPStore", None) is original:
                module.TCPStore = TCPStore

    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name != "torch.distributed":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                try:
                    patch(module)
                except Exception:
                    pass

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, Finder())


def _chain():
    """Run the sitecustomize this one shadows (a distro's or a venv's), if any."""
    import importlib.machinery
    import importlib.util
    import sys

    here = _os.path.dirname(_os.path.abspath(__file__))
    path = [p for p in sys.path if _os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


for _step in (_install, _chain):
    try:
        _step()
    except Exception:  # never break the pod's interpreter
        pass
'''


def write_pyhook(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder
