"""What the local control plane keeps in its workdir so that a restart is the same cluster.

    state.db                 every API object, uid and resourceVersion (emulator/statedb.py)
    secrets/<name>           identities that must not change across restarts (tokens, signing
                             keys): created once, mode 0600, read back on every start

`persistent_secret(workdir, name)` is the one place for such identities: whatever hands out
credentials (the admin user's token in the kubeconfig, the key that signs ServiceAccount
tokens) should take them from here, so kubeconfigs and tokens issued before a restart keep
working after it. An ephemeral cluster (`sftjob local up --ephemeral`) should use
`fresh_secret()` instead: nothing of it outlives the process.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

STATE_DB = "state.db"
SECRETS_DIR = "secrets"

__all__ = ["STATE_DB", "fresh_secret", "persistent_secret", "state_db_path"]


def state_db_path(workdir: Path | str) -> Path:
    """Where the cluster's objects are kept: `<workdir>/state.db`."""
    return Path(workdir) / STATE_DB


def fresh_secret(nbytes: int = 32) -> str:
    """A new random secret (URL-safe text), for a cluster that keeps nothing."""
    return secrets.token_urlsafe(nbytes)


def persistent_secret(workdir: Path | str, name: str, nbytes: int = 32) -> str:
    """The secret `name` of this workdir: read back if it exists, else created (mode 0600).

    The file appears complete or not at all (written aside, then hard-linked into place), so
    two processes starting at once agree on one value and a crash leaves no empty secret.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid secret name {name!r}")
    folder = Path(workdir) / SECRETS_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / name
    if not path.exists():
        aside = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(fresh_secret(nbytes) + "\n")
            with contextlib.suppress(FileExistsError):  # another process was first: use its
                os.link(aside, path)
        finally:
            aside.unlink(missing_ok=True)
    return path.read_text().strip()
