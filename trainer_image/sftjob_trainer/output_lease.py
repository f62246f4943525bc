"""One writer per output folder: a lease file that a crashed writer cannot hold forever.

Two jobs on one claim and output path both wrote checkpoint-N into the same folder (and
TRL's rotation deleted each other's). Rank 0 now holds `<output>/sftjob-lease.json`
(holder: job, attempt, host, pid, a random token; `renewedAt`), renewed by a daemon thread
every quarter of the lease time. Another run finding it:

- takes it when it is free, its own, held by an earlier attempt of the same job (the
  operator launches an attempt only once the earlier one's pods are gone), held by a
  process of this host that no longer exists, or not renewed for the lease time (by the
  holder's clock, or as watched from here, so clock skew between hosts cannot keep it);
- refuses (ConfigError, naming the holder) once it has seen the holder renew it.

A decision (read, decide, write) is made under `sftjob-lease.json.lock`, created with
O_EXCL, so two runs starting together cannot both take a free lease; a lock left by a
process killed inside that instant is broken after LOCK_STALE_SECONDS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoints import JobIdentity
from .failures import ConfigError

log = logging.getLogger("sftjob_trainer.output_lease")

LEASE_FILE = "sftjob-lease.json"
ENV_LEASE_SECONDS = "SFTJOB_OUTPUT_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 60.0
LOCK_STALE_SECONDS = 10.0


@dataclass(frozen=True)
class Holder:
    identity: JobIdentity
    attempt: int
    host: str
    pid: int
    token: str
    renewed_at: float
    lease_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.identity.to_json(),
            "attempt": self.attempt,
            "host": self.host,
            "pid": self.pid,
            "token": self.token,
            "renewedAt": self.renewed_at,
            "leaseSeconds": self.lease_seconds,
        }

    @classmethod
    def from_json(cls, data: Any) -> Holder | None:
        try:
            return cls(
                identity=JobIdentity.from_json(data.get("job")),
                attempt=int(data.get("attempt") or 1),
                host=str(data["host"]),
                pid=int(data["pid"]),
                token=str(data["token"]),
                renewed_at=float(data["renewedAt"]),
                lease_seconds=float(data.get("leaseSeconds") or DEFAULT_LEASE_SECONDS),
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            return None

    def describe(self) -> str:
        return (
            f"{self.identity.describe()}, attempt {self.attempt}, "
            f"process {self.pid} on host {self.host}"
        )


def take_reason(
    held: Holder | None, me: Holder, now: float, pid_alive: Callable[[int], bool]
) -> str | None:
    """Why `me` may take the lease at once, or None: then watch whether the holder renews it."""
    if held is None:
        return "free"
    if held.token == me.token:
        return "ours"
    if (
        held.identity.key is not None
        and held.identity.key == me.identity.key
        and held.attempt < me.attempt
    ):
        return f"held by attempt {held.attempt} of this job, which the operator has ended"
    # A container restarted in place may get its predecessor's pid: that one is gone too.
    if held.host == me.host and (held.pid == me.pid or not pid_alive(held.pid)):
        return f"its holder (process {held.pid} on this host) is gone"
    if now - held.renewed_at > held.lease_seconds:
        return f"not renewed for {now - held.renewed_at:.0f}s (lease {held.lease_seconds:.0f}s)"
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_seconds_from_env() -> float:
    value = os.environ.get(ENV_LEASE_SECONDS, "").strip()
    try:
        return float(value) if value else DEFAULT_LEASE_SECONDS
    except ValueError:
        raise ConfigError(
            f"{ENV_LEASE_SECONDS} must be a number of seconds, got {value!r}"
        ) from None


class OutputLease:
    """The lease on one output folder, held by this process while it trains."""

    def __init__(
        self, output: Path, identity: JobIdentity, attempt: int, lease_seconds: float
    ) -> None:
        self.output = output
        self.path = output / LEASE_FILE
        self.lock_path = output / f"{LEASE_FILE}.lock"
        self.lease_seconds = lease_seconds
        self.me = Holder(
            identity=identity,
            attempt=attempt,
            host=socket.gethostname(),
            pid=os.getpid(),
            token=secrets.token_hex(8),
            renewed_at=0.0,
            lease_seconds=lease_seconds,
        )
        self.lost_to: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ file access
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        deadline = time.monotonic() + 2 * LOCK_STALE_SECONDS
        while True:
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                with contextlib.suppress(OSError):
                    if time.time() - self.lock_path.stat().st_mtime > LOCK_STALE_SECONDS:
                        self.lock_path.unlink()  # left by a process killed while deciding
                        continue
                if time.monotonic() > deadline:
                    raise ConfigError(f"cannot lock {self.lock_path}: held too long") from None
                time.sleep(0.05)
        try:
            os.close(fd)
            yield
        finally:
            with contextlib.suppress(OSError):
                self.lock_path.unlink()

    def _read(self) -> Holder | None:
        try:
            return Holder.from_json(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        holder = dataclasses.replace(self.me, renewed_at=time.time())
        temporary = self.path.with_name(f".{LEASE_FILE}.{self.me.token}.tmp")
        temporary.write_text(json.dumps(holder.to_json(), indent=2))
        os.replace(temporary, self.path)

    # ------------------------------------------------------------------ lifecycle
    def acquire(self) -> None:
        """Take the lease, waiting at most the lease time to learn whether its holder is alive."""
        self.output.mkdir(parents=True, exist_ok=True)
        watched: tuple[float, float] | None = None  # (holder's renewedAt, when first seen)
        while True:
            with self._locked():
                held = self._read()
                reason = take_reason(held, self.me, time.time(), pid_alive)
                if reason is None and held is not None and watched is not None:
                    if held.renewed_at != watched[0]:
                        raise ConfigError(self._in_use(held))
                    if time.monotonic() - watched[1] > held.lease_seconds:
                        reason = f"not renewed for {held.lease_seconds:.0f}s while watched"
                if reason is not None:
                    if held is not None and reason != "free":
                        log.warning("taking the output lease of %s: %s", held.describe(), reason)
                    self._write()
                    break
            assert held is not None
            if watched is None:
                watched = (held.renewed_at, time.monotonic())
                log.info("output %s is leased by %s; watching it", self.output, held.describe())
            time.sleep(min(1.0, held.lease_seconds / 8))
        self._thread = threading.Thread(target=self._renew, name="output-lease", daemon=True)
        self._thread.start()

    def _in_use(self, held: Holder) -> str:
        return (
            f"output {self.output} is in use by {held.describe()}, which renewed its lease "
            f"{self.path.name} while this run waited: two runs writing one output would mix "
            "and delete each other's checkpoints. Give this job another output.path (or "
            "claim), or wait for the other run to end (a crashed run's lease is taken over "
            f"{held.lease_seconds:.0f}s after its last renewal)."
        )

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                with self._locked():
                    held = self._read()
                    if held is not None and held.token != self.me.token:
                        self.lost_to = held
                        log.error("output lease lost to %s", held.describe())
                        return
                    self._write()
            except Exception:  # noqa: BLE001 - a missed renewal is retried; training goes on
                log.warning("output lease renewal failed", exc_info=True)

    def check(self) -> None:
        """Raise if another run took the output (this one stalled past the lease time)."""
        if self.lost_to is not None:
            raise ConfigError(
                f"output {self.output} was taken over by {self.lost_to.describe()} while this "
                "run had not renewed its lease: stopping so the two runs do not mix checkpoints"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(ConfigError, OSError), self._locked():
            held = self._read()
            if held is not None and held.token == self.me.token:
                self.path.unlink()


def lease_callback(lease: OutputLease) -> Any:
    """A TrainerCallback that stops the run at a step end once the lease was lost."""
    from transformers import TrainerCallback

    class KeepLease(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            lease.check()

    return KeepLease()
