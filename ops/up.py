"""`make up`: PostgreSQL (embedded unless DATABASE_URL is set), migrations, ledger, sequencer.

Ctrl-C (or SIGTERM) stops both services gracefully, then the embedded PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import embedded_pg
from common.migrate import upgrade
from common.settings import Env

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / ".pgdata"


def is_serving(address: str, timeout: float = 2.0) -> bool:
    """One health check (the container health check uses it)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _wait_serving(address: str, proc: subprocess.Popen[bytes], name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with code {proc.returncode} during start-up (see its log above)")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"{name} did not become SERVING at {address} within {timeout:.0f}s")


def main() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python"), env.get("PYTHONPATH", "")])
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
        upgrade(ROOT / service / "migrations", env["DATABASE_URL"], service)
    print("migrations: ledger and sequencer at head", flush=True)

    ledger_addr = Env("LEDGER_", env).address("LISTEN_ADDR", "127.0.0.1:50052")
    sequencer_addr = Env("SEQUENCER_", env).address("LISTEN_ADDR", "127.0.0.1:50051")
    env.setdefault("SEQUENCER_LEDGER_TARGET", ledger_addr)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def stop(_signum: int = 0, _frame: FrameType | None = None) -> None:
        for _name, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if server is not None:
            server.cleanup()
        print("stopped", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for name, address in (("ledger", ledger_addr), ("sequencer", sequencer_addr)):
            proc = subprocess.Popen([sys.executable, "-m", name], env=env, cwd=ROOT)  # noqa: S603
            procs.append((name, proc))
            _wait_serving(address, proc, name)
    except SystemExit:
        stop()
        raise
    print(
        f"""
ready:
  sequencer  grpc://{sequencer_addr}   metrics http://{env.get("SEQUENCER_METRICS_ADDR", "127.0.0.1:9464")}/metrics
  ledger     grpc://{ledger_addr}   metrics http://{env.get("LEDGER_METRICS_ADDR", "127.0.0.1:9465")}/metrics

try it (buf from node_modules; grpcurl works the same with -plaintext):
  npx buf curl --protocol grpc --http2-prior-knowledge -H 'idempotency-key: demo-1' \\
    -d '{{"event": {{"entityType": "ENTITY_TYPE_SHIPMENT", "entityId": "SHP-1", "sequence": "1", \\
    "shipmentCreated": {{"orderId": "ORD-1"}}}}}}' \\
    http://{sequencer_addr}/logistics.sequencer.v1.SequencerService/SubmitEvent
  npx buf curl --protocol grpc --http2-prior-knowledge -d '{{"shipmentId": "SHP-1"}}' \\
    http://{ledger_addr}/logistics.ledger.v1.LedgerService/GetShipment

Ctrl-C stops everything.""",
        flush=True,
    )
    while True:
        for name, proc in procs:
            if proc.poll() is not None:
                print(f"{name} exited with code {proc.returncode}; stopping", flush=True)
                stop()
        time.sleep(0.5)


if __name__ == "__main__":
    main()
