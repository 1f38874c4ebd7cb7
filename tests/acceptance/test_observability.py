"""Metrics and logs of real service processes: the named series move, and one correlation id
can be followed from the caller through both services' logs and the ledger's history."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from tests.processes import ServiceProcess, start_ledger, start_sequencer
from tests.support import SHIPMENT, shipment_event


@pytest.fixture
def services(database_url: str) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    ledger = start_ledger(database_url)
    sequencer = start_sequencer(database_url, ledger.port, SEQUENCER_GAP_ALERT_AFTER="0.5")
    yield sequencer, ledger
    sequencer.terminate()
    ledger.terminate()


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            series[name] = float(number)
    return series


def total(series: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in series.items() if k.startswith(prefix))


def wait_applied(stub: sequencer_pb2_grpc.SequencerServiceStub, transaction_id: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status = stub.GetEventStatus(sequencer_pb2.GetEventStatusRequest(transaction_id=transaction_id), timeout=5)
        if status.status.state == events_pb2.EVENT_STATE_APPLIED:
            return
        time.sleep(0.05)
    raise AssertionError("not applied")


def test_metrics_move_and_correlation_is_followed(services: tuple[ServiceProcess, ServiceProcess]) -> None:
    sequencer, ledger = services
    before = scrape(sequencer.metrics_port)
    with grpc.insecure_channel(sequencer.address) as channel:
        stub = sequencer_pb2_grpc.SequencerServiceStub(channel)
        request = sequencer_pb2.SubmitEventRequest(event=shipment_event("SHP-M1", 1, "shipment_created"))
        first = stub.SubmitEvent(
            request, metadata=(("idempotency-key", "m1"), ("x-correlation-id", "follow-me")), timeout=5
        )
        stub.SubmitEvent(request, metadata=(("idempotency-key", "m1"),), timeout=5)  # a replay
        stub.SubmitEvent(
            sequencer_pb2.SubmitEventRequest(event=shipment_event("SHP-M2", 2, "shipment_picked")),
            metadata=(("idempotency-key", "m2"),),
            timeout=5,
        )  # parked: a gap
        wait_applied(stub, first.transaction_id)
    time.sleep(1.0)  # the gap monitor refreshes its gauges a few times a second at this threshold

    after = scrape(sequencer.metrics_port)
    submit_ok = 'sequencer_rpc_requests_total{code="OK",method="/logistics.sequencer.v1.SequencerService/SubmitEvent"}'
    assert after[submit_ok] - before.get(submit_ok, 0) == 3
    assert total(after, "sequencer_rpc_latency_seconds_count") >= 3
    assert after['sequencer_events_total{state="EVENT_STATE_QUEUED"}'] >= 1
    assert after['sequencer_events_total{state="EVENT_STATE_PARKED"}'] >= 1
    assert after['sequencer_events_total{state="EVENT_STATE_APPLIED"}'] >= 1
    assert after["sequencer_idempotency_replays_total"] == 1
    assert after["sequencer_parked_events"] == 1 and after["sequencer_gaps"] == 1
    assert after["sequencer_oldest_gap_age_seconds"] > 0 and after["sequencer_gaps_alerting"] == 1
    assert after["sequencer_ledger_apply_latency_seconds_count"] >= 1
    assert after['sequencer_ledger_outcomes_total{outcome="EVENT_STATE_APPLIED"}'] >= 1
    assert "sequencer_forwarder_retries_total" in after

    ledger_metrics = scrape(ledger.metrics_port)
    applied = 'ledger_rpc_requests_total{code="OK",method="/logistics.ledger.v1.LedgerService/ApplyEvents"'
    assert total(ledger_metrics, applied) >= 1
    assert total(ledger_metrics, "ledger_outcomes_total") >= 1

    # One correlation id: the caller's, through the sequencer's logs, the ledger's logs and history.
    def mine(entry: dict[str, object]) -> bool:
        return entry.get("correlation_id") == "follow-me"

    seq_lines = [e for e in sequencer.logs if mine(e)]
    assert any(str(e.get("rpc", "")).endswith("/SubmitEvent") for e in seq_lines)
    assert any(e.get("msg") == "event forwarded" and e.get("transaction_id") == first.transaction_id for e in seq_lines)
    assert any(str(e.get("rpc", "")).endswith("/ApplyEvents") for e in ledger.logs if mine(e))
    with grpc.insecure_channel(ledger.address) as channel:
        history = ledger_pb2_grpc.LedgerServiceStub(channel).ListEntityHistory(
            ledger_pb2.ListEntityHistoryRequest(entity=events_pb2.EntityRef(entity_type=SHIPMENT, entity_id="SHP-M1")),
            timeout=5,
        )
    assert [(e.correlation_id, e.transaction_id) for e in history.entries] == [("follow-me", first.transaction_id)]
    gap_alert = sequencer.wait_log(lambda e: e.get("msg") == "gap older than alert threshold")
    assert gap_alert["entity_id"] == "SHP-M2" and gap_alert["awaiting_sequence"] == 1
