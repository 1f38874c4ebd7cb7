"""Metrics and logs of real service processes: the named series move (go-grpc-middleware's
gRPC series included, refusals too), and one correlation id can be followed from the caller
through both services' logs and the ledger's history."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from logistics.sequencer.v1 import sequencer_pb2, sequencer_pb2_grpc
from tests.processes import ServiceProcess, start_ledger, start_sequencer
from tests.support import SHIPMENT, error_info, shipment_event


@pytest.fixture
def services(database_url: str) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    ledger = start_ledger(database_url)
    sequencer = start_sequencer(database_url, ledger.port, SEQUENCER_GAP_ALERT_AFTER="0.5")
    yield sequencer, ledger
    sequencer.terminate()
    ledger.terminate()


def exposition(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def scrape(port: int) -> dict[str, float]:
    text = exposition(port)
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            series[name] = float(number)
    return series


Labels = dict[str, str]


def samples(port: int) -> list[tuple[str, Labels, float]]:
    """Every sample of the endpoint, parsed by prometheus_client's own text parser."""
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(exposition(port))
        for sample in family.samples
    ]


def value(found: list[tuple[str, Labels, float]], name: str, **labels: str) -> float | None:
    """The one sample of `name` whose labels include `labels` (None when absent)."""
    matching = [v for n, ls, v in found if n == name and labels.items() <= ls.items()]
    assert len(matching) <= 1, (name, labels, matching)
    return matching[0] if matching else None


SEQ = "logistics.sequencer.v1.SequencerService"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
LEDGER = "logistics.ledger.v1.LedgerService"


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
            request,
            metadata=(("idempotency-key", "m1"), ("x-correlation-id", "follow-me"), ("traceparent", TRACEPARENT)),
            timeout=5,
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
    submit_ok = (
        f'grpc_server_handled_total{{grpc_code="OK",grpc_method="SubmitEvent",grpc_service="{SEQ}",grpc_type="unary"}}'
    )
    assert after[submit_ok] - before[submit_ok] == 3
    assert total(after, "grpc_server_handling_seconds_count") >= 3
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
    applied = f'grpc_server_handled_total{{grpc_code="OK",grpc_method="ApplyEvents",grpc_service="{LEDGER}"'
    assert total(ledger_metrics, applied) >= 1
    assert total(ledger_metrics, "ledger_outcomes_total") >= 1

    # One correlation id: the caller's, through the sequencer's logs, the ledger's logs and history.
    def mine(entry: dict[str, object]) -> bool:
        return entry.get("correlation_id") == "follow-me"

    seq_lines = [e for e in sequencer.logs if mine(e)]
    assert any(str(e.get("rpc", "")).endswith("/SubmitEvent") for e in seq_lines)
    assert any(e.get("msg") == "event forwarded" and e.get("transaction_id") == first.transaction_id for e in seq_lines)
    # Tracing is off (no OTEL_TRACES_EXPORTER), yet the caller's trace is carried: its ids are on
    # the call's lines and on the forwarded event's line (the stored traceparent).
    submit_line = next(e for e in seq_lines if str(e.get("rpc", "")).endswith("/SubmitEvent"))
    assert (submit_line["trace_id"], submit_line["span_id"]) == (TRACE_ID, CALLER_SPAN)
    forwarded = next(e for e in seq_lines if e.get("msg") == "event forwarded")
    assert (forwarded["trace_id"], forwarded["span_id"]) == (TRACE_ID, CALLER_SPAN)
    assert any(str(e.get("rpc", "")).endswith("/ApplyEvents") for e in ledger.logs if mine(e))
    with grpc.insecure_channel(ledger.address) as channel:
        history = ledger_pb2_grpc.LedgerServiceStub(channel).ListEntityHistory(
            ledger_pb2.ListEntityHistoryRequest(entity=events_pb2.EntityRef(entity_type=SHIPMENT, entity_id="SHP-M1")),
            timeout=5,
        )
    assert [(e.correlation_id, e.transaction_id) for e in history.entries] == [("follow-me", first.transaction_id)]
    gap_alert = sequencer.wait_log(lambda e: e.get("msg") == "gap older than alert threshold")
    assert gap_alert["entity_id"] == "SHP-M2" and gap_alert["awaiting_sequence"] == 1
    assert gap_alert["entity_type"] == "ENTITY_TYPE_SHIPMENT"

    # Both services log enum names, never numbers, under the same field names.
    lines = [*sequencer.logs, *ledger.logs]
    assert any(e.get("entity_type") == "ENTITY_TYPE_SHIPMENT" for e in sequencer.logs)
    assert any(str(e.get("state", "")).startswith("EVENT_STATE_") for e in sequencer.logs)
    for entry in lines:
        if "entity_type" in entry:
            assert str(entry["entity_type"]).startswith("ENTITY_TYPE_"), entry
        for field in ("state", "outcome"):
            if field in entry:
                assert str(entry[field]).startswith("EVENT_STATE_"), entry


def test_grpc_series_follow_go_grpc_middleware(services: tuple[ServiceProcess, ServiceProcess]) -> None:
    """grpc_server_* (and the sequencer's grpc_client_* to the ledger) with go-grpc-middleware's
    names, labels and Go code names: present before any call, moving with real calls, a stream
    apart from unary calls, and the refusals grpc lets a server see (an oversized request, an
    unknown method) counted."""
    sequencer, ledger = services
    # Pre-initialised: every method of every registered service, every code, before its first call.
    fresh = samples(sequencer.metrics_port)
    for method in ("SubmitEvent", "GetEventStatus"):
        for code in ("OK", "InvalidArgument", "Canceled", "DeadlineExceeded", "Unimplemented", "Unavailable"):
            labels = {"grpc_type": "unary", "grpc_service": SEQ, "grpc_method": method, "grpc_code": code}
            assert value(fresh, "grpc_server_handled_total", **labels) == 0
    watch = {"grpc_type": "server_stream", "grpc_service": SEQ, "grpc_method": "WatchEventStatus"}
    assert value(fresh, "grpc_server_started_total", **watch) == 0
    assert value(fresh, "grpc_server_handling_seconds_count", **watch) == 0
    admin = {"grpc_type": "unary", "grpc_service": "logistics.sequencer.v1.SequencerAdminService"}
    assert value(fresh, "grpc_server_started_total", **admin, grpc_method="ListGaps") == 0
    apply = {"grpc_type": "unary", "grpc_service": LEDGER, "grpc_method": "ApplyEvents"}
    assert value(fresh, "grpc_client_handled_total", **apply, grpc_code="OK") == 0
    assert value(samples(ledger.metrics_port), "grpc_server_handled_total", **apply, grpc_code="Internal") == 0
    # Process and Python collectors on.
    assert value(fresh, "process_resident_memory_bytes") is not None
    assert value(fresh, "python_info") == 1
    assert value(fresh, "python_gc_collections_total", generation="0") is not None

    with grpc.insecure_channel(sequencer.address) as channel:
        stub = sequencer_pb2_grpc.SequencerServiceStub(channel)
        accepted = stub.SubmitEvent(
            sequencer_pb2.SubmitEventRequest(event=shipment_event("SHP-G1", 1, "shipment_created")),
            metadata=(("idempotency-key", "g1"),),
            timeout=5,
        )
        wait_applied(stub, accepted.transaction_id)
        with pytest.raises(grpc.RpcError) as missing_key:
            stub.SubmitEvent(
                sequencer_pb2.SubmitEventRequest(event=shipment_event("SHP-G2", 1, "shipment_created")), timeout=5
            )
        assert missing_key.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A stream (of a parked event, so it stays open until cancelled): its messages are
        # counted one by one, its time lands in the server_stream series, not the unary ones.
        parked = stub.SubmitEvent(
            sequencer_pb2.SubmitEventRequest(event=shipment_event("SHP-G4", 2, "shipment_picked")),
            metadata=(("idempotency-key", "g4"),),
            timeout=5,
        )
        stream = stub.WatchEventStatus(sequencer_pb2.WatchEventStatusRequest(transaction_id=parked.transaction_id))
        next(iter(stream))
        stream.cancel()
        # An oversized request (2 MiB over a 1 MiB limit): RESOURCE_EXHAUSTED, reason REQUEST_TOO_LARGE.
        big = shipment_event("SHP-G3", 1, "shipment_created")
        big.source = "x" * (2 * 1024 * 1024)
        with pytest.raises(grpc.RpcError) as too_large:
            stub.SubmitEvent(
                sequencer_pb2.SubmitEventRequest(event=big), metadata=(("idempotency-key", "g3"),), timeout=5
            )
        assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(too_large.value).reason == "REQUEST_TOO_LARGE"
        # An unknown method: UNIMPLEMENTED, as grpc answers it, but counted.
        with pytest.raises(grpc.RpcError) as unknown:
            nothing: Any = channel.unary_unary("/no.such.v1.Service/Nothing")
            nothing(b"", timeout=5)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED

    # A call is counted as its handler ends, which can be a moment after the caller has its
    # status (an abort sends it first; a cancellation reaches the server later): wait for none
    # to be in flight.
    deadline = time.monotonic() + 10
    while True:
        moved = samples(sequencer.metrics_port)
        in_flight = sum(v for n, _, v in moved if n == "grpc_server_in_flight_requests")
        if in_flight == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    submit = {"grpc_type": "unary", "grpc_service": SEQ, "grpc_method": "SubmitEvent"}
    assert value(moved, "grpc_server_started_total", **submit) == 4
    assert value(moved, "grpc_server_handled_total", **submit, grpc_code="OK") == 2
    assert value(moved, "grpc_server_handled_total", **submit, grpc_code="InvalidArgument") == 1
    assert value(moved, "grpc_server_handled_total", **submit, grpc_code="ResourceExhausted") == 1
    assert value(moved, "grpc_server_msg_received_total", **submit) == 4
    assert value(moved, "grpc_server_msg_sent_total", **submit) == 2
    assert value(moved, "grpc_server_handling_seconds_count", **submit) == 4
    assert value(moved, "grpc_server_in_flight_requests", **submit) == 0
    assert value(moved, "grpc_server_started_total", **watch) == 1
    assert (value(moved, "grpc_server_msg_sent_total", **watch) or 0) >= 1
    assert value(moved, "grpc_server_handled_total", **watch, grpc_code="Canceled") == 1
    assert value(moved, "grpc_server_handling_seconds_count", **watch) == 1
    unknown_labels = {"grpc_type": "unknown", "grpc_service": "unknown", "grpc_method": "unknown"}
    assert value(moved, "grpc_server_handled_total", **unknown_labels, grpc_code="Unimplemented") == 1
    # The forwarder's calls to the ledger, seen from both ends.
    sent = value(moved, "grpc_client_handled_total", **apply, grpc_code="OK")
    assert sent is not None and sent >= 1
    assert value(moved, "grpc_client_started_total", **apply) == sent
    assert value(moved, "grpc_client_handling_seconds_count", **apply) == sent
    received = value(samples(ledger.metrics_port), "grpc_server_handled_total", **apply, grpc_code="OK")
    assert received == sent
