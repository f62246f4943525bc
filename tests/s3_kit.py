"""A real S3 server for the tests, and a TCP proxy that breaks connections in front of it.

`S3Server` runs tests/s3_server_main.py (moto in server mode, authentication on) in its own
process under the S3 server's Python: $S3_TEST_SERVER_PYTHON, else .venv-s3server/bin/python
at the repository root, which `make install` builds (moto needs botocore, whose
python-dateutil<3 cannot share the project's environment with kubernetes' >=3).

`CuttingProxy` forwards TCP to the server and, for the first `cuts` connections whose
request carries more than `cut_after` bytes, resets the connection in the middle of the
request body: a real network fault (the client sees a connection reset mid-upload), not a
patched client.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import struct
import subprocess
import threading
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
SERVER_MAIN = Path(__file__).with_name("s3_server_main.py")
ENV_SERVER_PYTHON = "S3_TEST_SERVER_PYTHON"


def server_python() -> str:
    chosen = os.environ.get(ENV_SERVER_PYTHON) or str(REPO / ".venv-s3server" / "bin" / "python")
    if not Path(chosen).exists():
        raise RuntimeError(
            f"no S3 server Python at {chosen}: run `make install` (it builds .venv-s3server "
            f"with moto[server]) or set {ENV_SERVER_PYTHON}"
        )
    return chosen


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class S3Server:
    """moto's S3 server in its own process; `endpoint`, `access_key`, `secret_key`."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self._log: IO[bytes] = log_path.open("wb")
        self.process = subprocess.Popen(
            [server_python(), str(SERVER_MAIN), str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError(f"the S3 server did not start: see {log_path}")
        started = json.loads(line)
        self.endpoint: str = started["endpoint"]
        self.access_key: str = started["accessKeyId"]
        self.secret_key: str = started["secretAccessKey"]

    def env(self) -> dict[str, str]:
        """The key pair as a pod gets it from its Secret."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def filesystem(self, endpoint: str | None = None) -> Any:
        """An Arrow S3 filesystem with the server's key pair (the tests' own client)."""
        from pyarrow import fs

        host = (endpoint or self.endpoint).removeprefix("http://")
        return fs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            endpoint_override=host,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )

    def make_bucket(self, name: str) -> None:
        self.filesystem().create_dir(name)

    def put(self, path: str, data: bytes) -> None:
        with self.filesystem().open_output_stream(path) as out:
            out.write(data)

    def keys(self, prefix: str) -> set[str]:
        from pyarrow import fs

        infos = self.filesystem().get_file_info(
            fs.FileSelector(prefix, recursive=True, allow_not_found=True)
        )
        return {info.path for info in infos if info.type == fs.FileType.File}

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


class CuttingProxy:
    """TCP proxy to `target_port`; resets the first `cuts` large requests mid-body."""

    def __init__(self, target_port: int, *, cut_after: int, cuts: int) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.cut_count = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _take_cut(self) -> bool:
        with self._lock:
            if self.cuts_left <= 0:
                return False
            self.cuts_left -= 1
            self.cut_count += 1
            return True

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        sent = 0
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        try:
            while not self._stopped.is_set():
                for key, _ in selector.select(timeout=0.5):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = source.recv(65536)
                    if not data:
                        return
                    if source is client:
                        sent += len(data)
                        if sent > self.cut_after and self._take_cut():
                            # Forward part of the body, then reset both sides: the
                            # connection dies mid-upload as on a flaky network.
                            upstream.sendall(data[: max(0, len(data) - (sent - self.cut_after))])
                            _reset(client)
                            _reset(upstream)
                            return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dropped connection looks to the other side."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
