"""`Kube` whose reads come from the watch cache; writes still go straight to the API.

`read_job`, `list_job_pods`, `read_config_map_data`, `list_profiles` and
`read_namespace_labels` keep their signatures and answer from `WatchCache` (no request). Each write goes through `Kube` and then records what the watch
must show before the job's next pass may trust the cache (see watch_cache's expectations).
Writes for a job that is gone (or re-created with another uid) are refused with `JobGone`
before they reach the API, so a pass that was running when its job was deleted stops at its
next write: the cache says so for free, and one live GET confirms the job before a pass's
first write (see `_pass_job_is_current`).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiClient

from .children import LABEL_JOB
from .kube import CreateResult, ErrorHook, Kube
from .reconciler import JobGone
from .watch_cache import WatchCache


@dataclass
class PassJob:
    """The job whose pass runs in this context (set by the controller around each pass;
    asyncio.to_thread carries it into the API threads)."""

    namespace: str
    name: str
    uid: str
    confirmed: bool = False  # read live once, before the pass's first write


PASS_JOB: ContextVar[PassJob | None] = ContextVar("sftjob_pass_job", default=None)


class CachedKube(Kube):
    def __init__(self, api_client: ApiClient, cache: WatchCache, on_error: ErrorHook | None = None):
        super().__init__(api_client, on_error=on_error)
        self.cache = cache

    # ----------------------------------------------------------------- reads

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        from .watch_cache import job_key

        return self.cache.job(job_key(namespace, name))

    def list_job_pods(self, namespace: str, job_name: str, label: str) -> list[dict[str, Any]]:
        if label != LABEL_JOB:  # only the job label is indexed
            return super().list_job_pods(namespace, job_name, label)
        return self.cache.job_pods(namespace, job_name)

    def read_config_map_data(self, namespace: str, name: str) -> dict[str, str] | None:
        config_map = self.cache.config_map(namespace, name)
        return None if config_map is None else dict(config_map.get("data") or {})

    def list_profiles(self) -> list[dict[str, Any]]:
        return self.cache.profiles()

    def read_namespace_labels(self, namespace: str) -> dict[str, str] | None:
        return self.cache.namespace_labels(namespace)

    # ----------------------------------------------------------------- writes

    def _pass_job_is_current(self) -> bool:
        """False once this pass's job is gone or re-created under its name: a pass over the
        old job must write nothing into a new one.

        The cache answers first (free). Before the pass's first write the API is asked once:
        the watch lags by milliseconds, and a job deleted and re-created in that window
        would otherwise receive the old job's writes (a status patch names the job, not its
        uid). One GET per pass that writes; passes that write nothing cost nothing.
        """
        job = PASS_JOB.get()
        if job is None:
            return True
        if self.cache.job_uid(job.namespace, job.name) != job.uid:
            return False
        if not job.confirmed:
            live = super().read_job(job.namespace, job.name)
            if live is None or live["metadata"].get("uid") != job.uid:
                return False
            job.confirmed = True
        return True

    def _require_current(self) -> None:
        if not self._pass_job_is_current():
            raise JobGone

    def _require_owner(self, manifest: dict[str, Any]) -> None:
        self._require_current()
        namespace = manifest["metadata"].get("namespace", "")
        for ref in manifest["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "SFTJob" and self.cache.job_uid(
                namespace, ref["name"]
            ) != ref.get("uid"):
                raise JobGone

    def create_if_absent(self, manifest: dict[str, Any], *args: Any, **kwargs: Any) -> CreateResult:
        self._require_owner(manifest)
        result = super().create_if_absent(manifest, *args, **kwargs)
        if result != "foreign":  # another owner's object may never show under this job
            self.cache.expect_child(manifest)
        return result

    def patch_config_map_data(
        self, namespace: str, name: str, data: dict[str, str], *args: Any, **kwargs: Any
    ) -> None:
        self._require_current()
        super().patch_config_map_data(namespace, name, data, *args, **kwargs)
        self.cache.expect_config_map_data(namespace, name, data)

    def delete_pod(self, namespace: str, name: str, *args: Any, **kwargs: Any) -> None:
        self._require_current()
        super().delete_pod(namespace, name, *args, **kwargs)
        self.cache.expect_pod_gone(namespace, name)

    def patch_job_status(
        self, namespace: str, name: str, status: dict[str, Any], *args: Any, **kwargs: Any
    ) -> str | None:
        """As `Kube.patch_job_status`: the new resourceVersion, None when the job is gone."""
        if self.cache.job_uid(namespace, name) is None or not self._pass_job_is_current():
            return None  # the watch saw it deleted (or re-created): as a 404 would say
        version = super().patch_job_status(namespace, name, status, *args, **kwargs)
        if version is None:
            return None
        self.cache.expect_job_status(namespace, name, status)
        return version

    def delete_job(self, namespace: str, name: str, *args: Any, **kwargs: Any) -> None:
        if self._pass_job_is_current():  # never the new job of the same name (TTL)
            super().delete_job(namespace, name, *args, **kwargs)
