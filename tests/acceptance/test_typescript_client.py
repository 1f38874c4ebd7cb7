"""The TypeScript client (clients/typescript/example.ts, Connect v2 + protoc-gen-es stubs) against
a real sequencer and ledger started as subprocesses.

The example submits a shipment's MSI 1, then MSI 3 before MSI 2, each with its own
`idempotency-key`, waits for everything to be applied and reads the shipment from the ledger. Its
last stdout line is a JSON summary; the ledger is also read independently over Python gRPC.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import grpc

from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from tests.processes import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "clients" / "typescript" / "example.ts"
RUN_TIMEOUT = 60.0


def run_example(sequencer: ServiceProcess, ledger: ServiceProcess, shipment_id: str) -> dict[str, object]:
    env = {**os.environ, "SEQUENCER_ADDR": sequencer.address, "LEDGER_ADDR": ledger.address}
    result = subprocess.run(
        ["npx", "--no-install", "tsx", str(EXAMPLE.relative_to(ROOT)), shipment_id],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"example failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, result.stderr
    summary = json.loads(lines[-1])
    assert isinstance(summary, dict)
    # One printed answer per SubmitEvent, in submission order.
    submits = [line for line in lines if line.startswith("SubmitEvent ")]
    assert [line.split()[1] for line in submits] == ["seq=1", "seq=3", "seq=2"]
    return summary


def test_typescript_example_delivers_out_of_order_events(services: tuple[ServiceProcess, ServiceProcess]) -> None:
    sequencer, ledger = services
    shipment_id = f"SHP-TS-{uuid.uuid4().hex[:10]}"

    summary = run_example(sequencer, ledger, shipment_id)

    assert summary["shipmentId"] == shipment_id
    assert summary["states"] == ["EVENT_STATE_QUEUED", "EVENT_STATE_PARKED", "EVENT_STATE_QUEUED"]
    assert summary["awaitingSequences"] == [0, 2, 0]
    assert summary["shipment"] == {"status": "SHIPMENT_STATUS_LOADED", "version": 3}

    # The ledger agrees, read over another client: each MSI applied once, in order.
    with grpc.insecure_channel(ledger.address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        shipment = stub.GetShipment(ledger_pb2.GetShipmentRequest(shipment_id=shipment_id), timeout=10).shipment
        entity = events_pb2.EntityRef(entity_type=events_pb2.ENTITY_TYPE_SHIPMENT, entity_id=shipment_id)
        history = stub.ListEntityHistory(ledger_pb2.ListEntityHistoryRequest(entity=entity), timeout=10).entries
    assert shipment.status == ledger_pb2.SHIPMENT_STATUS_LOADED
    assert shipment.version == 3
    assert shipment.order_id == f"ORD-{shipment_id}"
    assert shipment.warehouse_id == "WH-1"
    assert shipment.vehicle_id == "TRUCK-7"
    assert [(e.sequence, e.kind, e.outcome) for e in history] == [
        (1, "shipment_created", ledger_pb2.APPLY_OUTCOME_APPLIED),
        (2, "shipment_picked", ledger_pb2.APPLY_OUTCOME_APPLIED),
        (3, "shipment_loaded", ledger_pb2.APPLY_OUTCOME_APPLIED),
    ]

    # Run again with the same shipment: every key replays its stored answer, nothing runs twice.
    again = run_example(sequencer, ledger, shipment_id)
    assert again["states"] == summary["states"]
    assert again["shipment"] == {"status": "SHIPMENT_STATUS_LOADED", "version": 3}
