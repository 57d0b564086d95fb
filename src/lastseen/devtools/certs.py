"""A certificate authority of a run's own and a server certificate for 127.0.0.1 it signs, made
with the ``openssl`` command: an HTTPS upstream for the tests and the benchmark."""

from __future__ import annotations

import dataclasses
import shutil
import ssl
import subprocess
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA's certificate (PEM): what LASTSEEN_UPSTREAM_CA_FILE names
    cert: Path  # the server's certificate (PEM), for 127.0.0.1
    key: Path  # its private key (PEM)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


def available() -> bool:
    return shutil.which("openssl") is not None


def make(directory: Path) -> Certificates:
    """Writes a CA and a server certificate signed by it into ``directory`` (valid two days);
    ``FileNotFoundError`` without an ``openssl`` command."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=lastseen test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
    )  # fmt: skip
    return Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
