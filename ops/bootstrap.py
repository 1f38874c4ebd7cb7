"""`python -m ops bootstrap DIR`: the credentials of a deployment, made once, on first start.

docker-compose runs it in a one-shot container against the `secrets` volume before anything
else starts. What it writes, only where missing (a second run changes nothing, so tokens and
certificates survive restarts and upgrades):

- `ca.pem` / `ca.key`: a private CA; `ledger.pem`/`.key` and `sequencer.pem`/`.key`: server
  certificates for the compose service names, `localhost` and 127.0.0.1 (openssl command line);
- `tokens/ops.token` (role admin), `tokens/producer.token` (submitter, reader),
  `tokens/sequencer.token` (role sequencer: the sequencer's calls to the ledger): random
  bearer tokens, readable by the service user only;
- `sequencer-identities.json` and `ledger-identities.json`: the callers of each service with the
  SHA-256 of their tokens (never the tokens themselves).

Operators read a token from the volume (`docker compose exec sequencer cat
/secrets/tokens/ops.token`) and give it to the CLI as LOGISTICS_TOKEN (docs/cli.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

#: caller -> (roles, which services know it)
CALLERS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "ops": (["admin"], ("sequencer", "ledger")),
    "producer": (["submitter", "reader"], ("sequencer", "ledger")),
    "sequencer": (["sequencer"], ("ledger",)),
}
SERVICES = ("ledger", "sequencer")
CERT_DAYS = "825"


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=120)  # noqa: S603, S607


def _private(path: Path, data: str) -> None:
    """Writes a file only its owner can read (tokens, keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(data)


def certificates(directory: Path) -> list[str]:
    """The CA and one server certificate per service, where missing; the files written."""
    written: list[str] = []
    if not (directory / "ca.pem").exists():
        _openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", CERT_DAYS,
                 "-subj", "/CN=logistics-ca", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
        os.chmod(directory / "ca.key", 0o600)
        written += ["ca.pem", "ca.key"]
    for service in SERVICES:
        if (directory / f"{service}.pem").exists():
            continue
        (directory / f"{service}.ext").write_text(
            f"subjectAltName=DNS:{service},DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        )
        _openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={service}",
                 "-keyout", f"{service}.key", "-out", f"{service}.csr")  # fmt: skip
        _openssl(directory, "x509", "-req", "-in", f"{service}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", CERT_DAYS, "-extfile", f"{service}.ext",
                 "-out", f"{service}.pem")  # fmt: skip
        os.chmod(directory / f"{service}.key", 0o600)
        (directory / f"{service}.csr").unlink()
        (directory / f"{service}.ext").unlink()
        written += [f"{service}.pem", f"{service}.key"]
    return written


def tokens(directory: Path) -> list[str]:
    """A token per caller and each service's identities file, where missing."""
    written: list[str] = []
    folder = directory / "tokens"
    folder.mkdir(mode=0o700, exist_ok=True)
    for caller in CALLERS:
        path = folder / f"{caller}.token"
        if not path.exists():
            _private(path, secrets.token_urlsafe(32) + "\n")
            written.append(f"tokens/{caller}.token")
    for service in SERVICES:
        path = directory / f"{service}-identities.json"
        if path.exists():
            continue
        identities = [
            {
                "caller": caller,
                "roles": roles,
                "token_sha256": hashlib.sha256((folder / f"{caller}.token").read_text().strip().encode()).hexdigest(),
            }
            for caller, (roles, services) in CALLERS.items()
            if service in services
        ]
        path.write_text(json.dumps({"identities": identities}, indent=2) + "\n")
        written.append(path.name)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m ops bootstrap DIR", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    directory.mkdir(parents=True, exist_ok=True)
    written = certificates(directory) + tokens(directory)
    if written:
        print(f"bootstrap: wrote {', '.join(written)} in {directory}")
    else:
        print(f"bootstrap: {directory} already holds the certificates and tokens; nothing changed")
    return 0
