"""A throwaway CA and certificates for TLS tests, made with the openssl command line."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    cert: str
    key: str


@dataclass(frozen=True)
class Certificates:
    ca: str
    server: Pair
    clients: dict[str, Pair]


def make_certificates(directory: Path, client_names: list[str]) -> Certificates:
    """A CA, a server certificate for localhost/127.0.0.1, and one client certificate per CN."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=directory)  # fmt: skip

    def issue(name: str, cn: str, extensions: str) -> Pair:
        (directory / f"{name}.ext").write_text(extensions)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=directory)  # fmt: skip
        return Pair(str(directory / f"{name}.pem"), str(directory / f"{name}.key"))

    server = issue("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    clients = {cn: issue(f"client-{cn}", cn, "extendedKeyUsage=clientAuth\n") for cn in client_names}
    return Certificates(str(directory / "ca.pem"), server, clients)
