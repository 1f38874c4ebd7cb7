"""`make up` as a new user runs it: no DATABASE_URL (embedded PostgreSQL), then health,
reflection under both protocol versions, an event applied end to end, a clean Ctrl-C, and data
that survives a restart."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from tests.support import shipment_event

ROOT = Path(__file__).resolve().parents[2]


def submit_until_terminal(address: str, shipment_id: str, key: str, timeout: float) -> int:
    """Submits a shipment's first event and polls its status until it is applied or `timeout`
    passes; returns the last state seen."""
    with grpc.insecure_channel(address) as channel:
        stub = sequencer_pb2_grpc.SequencerServiceStub(channel)
        reply = stub.SubmitEvent(
            sequencer_pb2.SubmitEventRequest(event=shipment_event(shipment_id, 1, "shipment_created")),
            metadata=(("idempotency-key", key),),
            timeout=10,
        )
        deadline = time.monotonic() + timeout
        while True:
            status = stub.GetEventStatus(
                sequencer_pb2.GetEventStatusRequest(transaction_id=reply.transaction_id), timeout=5
            ).status
            if status.state == events_pb2.EVENT_STATE_APPLIED or time.monotonic() > deadline:
                return int(status.state)
            time.sleep(0.05)


class MakeUp:
    def __init__(self, data_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env.update(
            LOGISTICS_DATA_DIR=str(data_dir),
            # Port 0 so a developer's own `make up` on the default ports is never disturbed;
            # the banner prints the bound ports.
            SEQUENCER_LISTEN_ADDR="127.0.0.1:0",
            SEQUENCER_METRICS_ADDR="127.0.0.1:0",
            SEQUENCER_HTTP_ADDR="127.0.0.1:0",
            LEDGER_LISTEN_ADDR="127.0.0.1:0",
            LEDGER_METRICS_ADDR="127.0.0.1:0",
        )
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            ["make", "--no-print-directory", "up"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line.rstrip())

    def wait_ready(self, timeout: float = 120.0) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = "\n".join(self.output)
            seq = re.search(r"sequencer\s+grpc://(\S+)", text)
            led = re.search(r"ledger\s+grpc://(\S+)", text)
            if seq and led and "Ctrl-C stops everything" in text:
                return seq.group(1), led.group(1)
            assert self.proc.poll() is None, "make up exited:\n" + text
            time.sleep(0.2)
        raise AssertionError("make up did not get ready:\n" + "\n".join(self.output))

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)
        code = self.proc.wait(60)
        self.reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "pgdata"


def reflection_services(address: str, version: str) -> set[str]:
    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        replies = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in replies[0].list_services_response.service}
        # Every listed service can be described (what grpcurl/buf curl do next).
        requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=n) for n in names]
        for reply in call(iter(requests), timeout=5):
            assert reply.HasField("file_descriptor_response"), reply
    return names


def test_make_up_runs_everything_from_nothing(data_dir: Path) -> None:
    up = MakeUp(data_dir)
    try:
        sequencer_addr, ledger_addr = up.wait_ready()
        assert "embedded PostgreSQL" in "\n".join(up.output)
        for address in (sequencer_addr, ledger_addr):
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for version in ("v1", "v1alpha"):
            assert {
                "logistics.sequencer.v1.SequencerService",
                "logistics.sequencer.v1.SequencerAdminService",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            } <= reflection_services(sequencer_addr, version)
            assert "logistics.ledger.v1.LedgerService" in reflection_services(ledger_addr, version)
        assert submit_until_terminal(sequencer_addr, "SHP-UP", "up-1", 15) == events_pb2.EVENT_STATE_APPLIED
        with grpc.insecure_channel(ledger_addr) as channel:
            shipment = (
                ledger_pb2_grpc.LedgerServiceStub(channel)
                .GetShipment(ledger_pb2.GetShipmentRequest(shipment_id="SHP-UP"), timeout=5)
                .shipment
            )
            assert shipment.status == ledger_pb2.SHIPMENT_STATUS_CREATED and shipment.version == 1
        # The operator line the banner prints runs as printed (the CLI from the project's venv).
        printed = up.output[up.output.index("operate it (docs/cli.md):") + 1].strip()
        assert printed == f"LOGISTICS_SEQUENCER_ADDR={sequencer_addr} .venv/bin/python -m ops gaps"
        cli = subprocess.run(["bash", "-c", printed], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert (cli.returncode, cli.stdout) == (0, "(none)\n"), cli.stderr
        # The HTTP/JSON listener is up too (SPEC 13), and its ledger read sees the same shipment.
        http_addr = re.search(r"sequencer\s+http://(\S+)", "\n".join(up.output))
        assert http_addr, "\n".join(up.output)
        with urllib.request.urlopen(f"http://{http_addr.group(1)}/readyz", timeout=5) as answer:
            assert json.loads(answer.read())["status"] == "ready"
        with urllib.request.urlopen(f"http://{http_addr.group(1)}/v1/shipments/SHP-UP", timeout=5) as answer:
            assert json.loads(answer.read())["shipment"]["status"] == "SHIPMENT_STATUS_CREATED"
        assert up.interrupt() in (0, 2, -signal.SIGINT)  # make dies of the SIGINT it passed on
        assert "stopped" in up.output
        assert not (data_dir / "postmaster.pid").exists(), "embedded PostgreSQL still running"

        again = MakeUp(data_dir)
        try:
            _, ledger_addr = again.wait_ready()
            with grpc.insecure_channel(ledger_addr) as channel:
                shipment = (
                    ledger_pb2_grpc.LedgerServiceStub(channel)
                    .GetShipment(ledger_pb2.GetShipmentRequest(shipment_id="SHP-UP"), timeout=5)
                    .shipment
                )
            assert shipment.version == 1, "data did not survive the restart"
            again.interrupt()
        finally:
            again.kill()
    finally:
        up.kill()


def test_a_failed_start_stops_everything_and_exits_non_zero(database_url: str) -> None:
    """A misspelt setting stops the sequencer at start-up: `make up`'s runner says so, stops
    the ledger it had started, and fails (it used to print a traceback and exit 0)."""
    import sys

    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "LEDGER_LISTEN_ADDR": "127.0.0.1:0",
        "LEDGER_METRICS_ADDR": "127.0.0.1:0",
        "SEQUENCER_METRICS_ADDR": "127.0.0.1:0",
        "SEQUENCER_HTTP_ADDR": "127.0.0.1:0",
        "SEQUENCER_LISTEN_ADRR": "127.0.0.1:0",  # the typo
    }
    done = subprocess.run(
        [sys.executable, "-m", "ops", "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "make up failed: sequencer exited with code" in done.stderr
    assert "SEQUENCER_LISTEN_ADRR" in done.stderr
    assert "stopped" in done.stdout and "ready:" not in done.stdout
    assert "Traceback" not in done.stderr.split("make up failed")[-1]


def test_a_ledger_on_tls_comes_up_and_takes_the_forwarded_events(database_url: str, tmp_path: Path) -> None:
    """The ledger serves TLS and the sequencer reaches it with its CA: `make up`'s runner is
    ready (it used to probe the ledger in plaintext for 60 s and give up), an event submitted to
    the sequencer is applied over TLS, and Ctrl-C stops both with status 0."""
    import sys

    from tests.certs import make_certificates

    certs = make_certificates(tmp_path / "certs", [])
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "LEDGER_LISTEN_ADDR": "127.0.0.1:0",
        "LEDGER_METRICS_ADDR": "127.0.0.1:0",
        "LEDGER_TLS_CERT": certs.server.cert,
        "LEDGER_TLS_KEY": certs.server.key,
        "SEQUENCER_LISTEN_ADDR": "127.0.0.1:0",
        "SEQUENCER_METRICS_ADDR": "127.0.0.1:0",
        "SEQUENCER_HTTP_ADDR": "127.0.0.1:0",
        "SEQUENCER_LEDGER_TLS_CA": certs.ca,
        "SEQUENCER_LEDGER_TLS_SERVER_NAME": "localhost",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops", "up"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        sequencer = ""
        deadline = time.monotonic() + 90
        for line in proc.stdout:
            found = re.search(r"sequencer\s+grpc://(\S+)", line)
            if found:
                sequencer = found.group(1)
            if "Ctrl-C stops everything" in line or time.monotonic() > deadline:
                break
        assert sequencer, "make up never became ready"
        assert submit_until_terminal(sequencer, "SHP-TLS", "tls-1", 30) == events_pb2.EVENT_STATE_APPLIED
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
