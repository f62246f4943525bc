"""TLS for the emulator: a private CA and a serving certificate for the loopback address.

Why TLS on a loopback server: kubectl (client-go's clientcmd) reads a kubeconfig user's
credentials only when the cluster is served over TLS (``IsConfigTransportTLS``); over plain
http it sends no token at all, so bearer-token authentication needs https. As on a kubeadm
cluster, a CA signs the serving certificate; the CA goes into kubeconfigs
(``certificate-authority-data``) and into pods as ``ca.crt``.

The certificates are made with the ``openssl`` command (EC P-256, valid ten years), kept in
``directory`` when given (a restarted cluster keeps its CA, so kubeconfigs stay valid).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import secrets
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path

_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {cn}
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,digitalSignature,keyEncipherment,keyCertSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclasses.dataclass(frozen=True)
class ServingCertificate:
    directory: Path

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def cert_file(self) -> Path:
        return self.directory / "apiserver.crt"

    @property
    def key_file(self) -> Path:
        return self.directory / "apiserver.key"

    @property
    def ca_pem(self) -> bytes:
        return self.ca_file.read_bytes()

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def _subject_alt_names(host: str) -> str:
    names = {"DNS:localhost", "IP:127.0.0.1", "DNS:kubernetes.default.svc"}
    try:
        ipaddress.ip_address(host)
        names.add(f"IP:{host}")
    except ValueError:
        names.add(f"DNS:{host}")
    return ",".join(sorted(names))


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError(
            "the local control plane serves https (kubectl sends tokens only over TLS) and "
            "makes its certificates with the `openssl` command, which is not installed"
        )
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=60)


def serving_certificate(host: str, directory: Path | None = None) -> ServingCertificate:
    """The CA and serving certificate in ``directory`` (made when absent; a temp dir if None)."""
    folder = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="sftjob-pki-"))
    cert = ServingCertificate(folder)
    san = _subject_alt_names(host)
    marker = folder / "apiserver.san"
    if all(p.exists() for p in (cert.ca_file, cert.cert_file, cert.key_file)) and (
        marker.exists() and marker.read_text() == san
    ):
        return cert
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    (folder / "ca.cnf").write_text(_CONFIG.format(cn="sftjob-local-ca", san=san))
    (folder / "server.cnf").write_text(_CONFIG.format(cn="sftjob-local-apiserver", san=san))
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    if not (cert.ca_file.exists() and (folder / "ca.key").exists()):
        _openssl(
            "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
            "-config", "ca.cnf", "-extensions", "ca", cwd=folder,
        )  # fmt: skip
    _openssl(
        "req", "-new", *ec, "-keyout", "apiserver.key", "-out", "apiserver.csr",
        "-config", "server.cnf", cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-set_serial", f"0x{secrets.token_hex(16)}", "-days", "3650",
        "-extfile", "server.cnf", "-extensions", "server", "-out", "apiserver.crt", cwd=folder,
    )  # fmt: skip
    marker.write_text(san)
    return cert
