"""A Python caller of the sequencer and the ledger through the installed `logistics-client`.

It delivers one shipment's events out of order, as a real queue might (MSI 1, then MSI 3 before
MSI 2), each with its own idempotency key, waits until all are applied, reads the shipment from
the ledger and prints one JSON line:
  {"shipmentId": "...", "states": ["EVENT_STATE_QUEUED", "EVENT_STATE_PARKED", ...],
   "final": ["EVENT_STATE_APPLIED", ...], "shipment": {"status": "SHIPMENT_STATUS_LOADED", "version": 3}}

Run (addresses and credentials from LOGISTICS_*, see logistics.client.config):
  pip install ./clients/python
  LOGISTICS_SEQUENCER_ADDR=127.0.0.1:50051 LOGISTICS_LEDGER_ADDR=127.0.0.1:50052 \
    python clients/python/example.py [SHIPMENT_ID]
Running it again with the same shipment id replays every stored answer: nothing runs twice.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

from logistics import client as lc
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2


def shipment_event(shipment_id: str, sequence: int, kind: str) -> events_pb2.Event:
    event = events_pb2.Event(
        entity_type=events_pb2.ENTITY_TYPE_SHIPMENT, entity_id=shipment_id, sequence=sequence, source="python-example"
    )
    if kind == "created":
        event.shipment_created.order_id = f"ORD-{shipment_id}"
    elif kind == "picked":
        event.shipment_picked.warehouse_id = "WH-1"
    else:
        event.shipment_loaded.vehicle_id = "TRUCK-7"
    return event


async def main(shipment_id: str) -> None:
    config = lc.ClientConfig.from_env()
    async with lc.SequencerClient.from_env(config) as sequencer, lc.LedgerClient.from_env(config) as ledger:
        results = []
        for sequence, kind in ((1, "created"), (3, "loaded"), (2, "picked")):
            # A key derived from the data: a re-run (or a retry after a crash) replays, never repeats.
            result = await sequencer.submit(
                shipment_event(shipment_id, sequence, kind), idempotency_key=f"py-example:{shipment_id}:{sequence}"
            )
            print(f"SubmitEvent seq={sequence} {result.state} replayed={result.replayed}")
            results.append(result)
            if sequence == 1:
                await sequencer.wait(result.transaction_id, timeout=30.0)
        final = [await sequencer.wait(r.transaction_id, timeout=30.0) for r in results]
        shipment = await ledger.get_shipment(shipment_id)
    print(
        json.dumps(
            {
                "shipmentId": shipment_id,
                "states": [str(r.state) for r in results],
                "final": [str(s.state) for s in final],
                "shipment": {"status": ledger_pb2.ShipmentStatus.Name(shipment.status), "version": shipment.version},
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else f"SHP-PY-{uuid.uuid4().hex[:8]}"))
