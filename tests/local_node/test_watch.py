"""The node's list+watch cache resumes from the last resourceVersion after the
server ends a watch, instead of relisting (real HTTP to the emulator)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sftjob_local.emulator import EmulatorThread
from sftjob_local.node_kube import Informer, KubeHttp, cancel_and_wait

pytestmark = pytest.mark.local


async def test_informer_resumes_watch_after_server_timeout(tmp_path: Path) -> None:
    with EmulatorThread() as srv:
        api = KubeHttp(srv.write_kubeconfig(tmp_path / "kubeconfig"))
        seen: list[tuple[str, str]] = []
        path = "/api/v1/namespaces/default/configmaps"
        # 1 s server-side timeout: the stream ends and must be resumed
        informer = Informer(
            api, path, lambda t, o: seen.append((t, o["metadata"]["name"])), watch_timeout=1
        )
        task = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(informer.synced.wait(), 5)
            seen.clear()  # whatever the namespace held before
            await api.create(path, {"metadata": {"name": "a"}, "data": {}})
            await asyncio.sleep(1.6)  # the first watch has ended by now
            await api.create(path, {"metadata": {"name": "b"}, "data": {}})
            await api.delete(f"{path}/a")
            for _ in range(100):
                if len(seen) >= 3:
                    break
                await asyncio.sleep(0.02)
            assert seen == [("ADDED", "a"), ("ADDED", "b"), ("DELETED", "a")]
            assert informer.watches >= 2, "the watch was not re-established"
            assert informer.relists == 1, "resumed watches must not relist"
            assert sorted(o["metadata"]["name"] for o in informer.cache.values()) == ["b"]
        finally:
            await cancel_and_wait(task)
            await api.close()
