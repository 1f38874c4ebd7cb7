"""`make up`: PostgreSQL (embedded unless DATABASE_URL is set), migrations, ledger, sequencer.

Ctrl-C (or SIGTERM) stops both services gracefully, then the embedded PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import embedded_pg, startup
from common.migrate import upgrade
from common.settings import Env, database_url
from logistics.client.config import ClientConfig

ROOT = Path(__file__).resolve().parent.parent
# The embedded PostgreSQL's data (git-ignored); LOGISTICS_DATA_DIR moves it.
DATA_DIR = Path(os.environ.get("LOGISTICS_DATA_DIR", ROOT / ".pgdata"))

# pgserver's platformdirs warns when XDG_RUNTIME_DIR is unset; harmless here.
warnings.filterwarnings("ignore", module="platformdirs")


def is_serving(address: str, timeout: float = 2.0, config: ClientConfig | None = None) -> bool:
    """One health check (the container health check uses it): plaintext, or TLS (mutual with a
    client certificate) when LOGISTICS_TLS_CA is set. Health needs no token."""
    config = config or ClientConfig()
    credentials = config.credentials()
    options = config.channel_options()
    channel = (
        grpc.secure_channel(address, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class StartFailed(Exception):
    """A service did not come up: everything started is stopped and `make up` fails."""


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Until the HTTP listener answers (it is bound before the start-up line, so this is quick)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - our own loopback URL
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise StartFailed(f"the sequencer's HTTP listener did not answer at {url}")
        time.sleep(0.2)


class Child:
    """A service subprocess whose JSON log lines pass through to our stderr; its start-up line
    tells the ports it bound (so port 0 works too)."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self.listening = threading.Event()
        self.proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", name], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True
        )
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            sys.stderr.write(line)
            if f'"{self.name} listening"' in line:
                entry = json.loads(line)
                self.port, self.metrics_port = int(entry["port"]), int(entry["metrics_port"])
                self.http_port = int(entry.get("http_port", 0))
                self.listening.set()

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Until the start-up line: a service logs it once its server is started and its health
        SERVING, whatever its transport (plaintext, TLS, mutual TLS), so no probe is needed."""
        deadline = time.monotonic() + timeout
        while not self.listening.wait(0.2):
            if self.proc.poll() is not None:
                raise StartFailed(f"{self.name} exited with code {self.proc.returncode} during start-up (see above)")
            if time.monotonic() > deadline:
                raise StartFailed(f"{self.name} did not start within {timeout:.0f}s")


def _buf_hint() -> str:
    """buf comes from the project's node_modules (`make node`); npx must never fetch the
    unrelated npm package of that name."""
    if (ROOT / "node_modules" / ".bin" / "buf").exists():
        return "buf from node_modules"
    return "buf from node_modules: run `make node` once first"


def _auth_line(env: dict[str, str]) -> str:
    if env.get("SEQUENCER_IDENTITIES_FILE") or env.get("SEQUENCER_TLS_CLIENT_CA"):
        return "auth: credentials required (identities file / client certificates)"
    return (
        "auth: development mode, no credentials configured: every caller has every role, and\n"
        "      x-client-id names the idempotency scope (refused off loopback unless *_ALLOW_INSECURE=true)"
    )


def main() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python"), env.get("PYTHONPATH", "")])
    try:
        server = prepare_database(env)
    except Exception as exc:
        # A bad DATABASE_URL (scheme, host, refused, password) is one line, not a traceback.
        found = startup.one_line(exc, env.get("DATABASE_URL", ""))
        if found is None:
            raise
        raise SystemExit(f"make up failed: {found[0]}") from None
    run_services(env, server)


def prepare_database(env: dict[str, str]) -> Any:
    """The database (embedded unless DATABASE_URL is set) with both services' migrations at head;
    the embedded server (to stop at the end) or None. Sets env's DATABASE_URL."""
    server = None
    if env.get("DATABASE_URL", "").strip():
        url = env["DATABASE_URL"]
        where = "DATABASE_URL"
    else:
        server = embedded_pg.start(DATA_DIR, stop_at_exit=True)
        url = embedded_pg.ensure_database(server.get_uri(), "logistics")
        env["DATABASE_URL"] = url
        where = f"embedded PostgreSQL, data in {DATA_DIR}"
    print(f"database: {where}", flush=True)
    for service in ("ledger", "sequencer"):
        upgrade(ROOT / service / "migrations", database_url(env), service)
    print("migrations: ledger and sequencer at head", flush=True)
    return server


def run_services(env: dict[str, str], server: Any) -> None:
    """Ledger, then sequencer; until Ctrl-C, SIGTERM or a service's exit."""
    children: list[Child] = []

    def shutdown() -> None:
        for child in reversed(children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.proc.kill()
        if server is not None:
            server.cleanup()
        print("stopped", flush=True)

    def stop(_signum: int = 0, _frame: FrameType | None = None) -> None:
        """Ctrl-C or SIGTERM: a clean stop, exit status 0."""
        shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        ledger = Child("ledger", env)
        children.append(ledger)
        ledger.wait_serving()
        host = Env("LEDGER_", env).address("LISTEN_ADDR", "127.0.0.1:50052").rpartition(":")[0]
        env.setdefault("SEQUENCER_LEDGER_TARGET", f"{host}:{ledger.port}")
        sequencer = Child("sequencer", env)
        children.append(sequencer)
        sequencer.wait_serving()
    except StartFailed as failed:
        shutdown()
        raise SystemExit(f"make up failed: {failed}") from None
    sequencer_addr = f"127.0.0.1:{sequencer.port}"
    ledger_addr = f"127.0.0.1:{ledger.port}"
    http_addr = f"127.0.0.1:{sequencer.http_port}"
    try:
        wait_http(f"http://{http_addr}/healthz")
    except StartFailed as failed:
        shutdown()
        raise SystemExit(f"make up failed: {failed}") from None
    print(
        f"""
ready:
  sequencer  grpc://{sequencer_addr}   metrics http://127.0.0.1:{sequencer.metrics_port}/metrics
  sequencer  http://{http_addr}   (HTTP/JSON API, docs/http.md; OpenAPI at /openapi.json)
  ledger     grpc://{ledger_addr}   metrics http://127.0.0.1:{ledger.metrics_port}/metrics

try it ({_buf_hint()}; grpcurl works the same with -plaintext):
  npx --no-install buf curl --protocol grpc --http2-prior-knowledge -H 'idempotency-key: demo-1' \\
    -d '{{"event": {{"entityType": "ENTITY_TYPE_SHIPMENT", "entityId": "SHP-1", "sequence": "1", \\
    "shipmentCreated": {{"orderId": "ORD-1"}}}}}}' \\
    http://{sequencer_addr}/logistics.sequencer.v1.SequencerService/SubmitEvent
  npx --no-install buf curl --protocol grpc --http2-prior-knowledge -d '{{"shipmentId": "SHP-1"}}' \\
    http://{ledger_addr}/logistics.ledger.v1.LedgerService/GetShipment
  curl -s http://{http_addr}/v1/shipments/SHP-1

operate it (docs/cli.md):
  LOGISTICS_SEQUENCER_ADDR={sequencer_addr} .venv/bin/python -m ops gaps

{_auth_line(env)}
Ctrl-C stops everything.""",
        flush=True,
    )
    while True:
        for child in children:
            if child.proc.poll() is not None:
                print(f"{child.name} exited with code {child.proc.returncode}; stopping", flush=True)
                shutdown()
                sys.exit(1)
        time.sleep(0.5)


if __name__ == "__main__":
    main()
