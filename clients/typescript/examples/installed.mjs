// The installed package, as a project that ran `npm install @logistics/client` uses it (plain
// ESM JavaScript: no build step). A call without an idempotency key is refused and its ErrorInfo
// reason decoded; MSI 1 of a shipment is submitted with a key, followed until APPLIED, and the
// shipment read from the ledger. Prints one JSON line:
//   {"refusedReason":"IDEMPOTENCY_KEY_MISSING","state":"EVENT_STATE_QUEUED","final":"EVENT_STATE_APPLIED",
//    "shipment":{"status":"SHIPMENT_STATUS_CREATED","version":"1"}}
//
// Run: SEQUENCER_ADDR=127.0.0.1:50051 LEDGER_ADDR=127.0.0.1:50052 node examples/installed.mjs SHIPMENT_ID

import { setTimeout as sleep } from "node:timers/promises";

import { create, enumToJson, toJson } from "@bufbuild/protobuf";
import { ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  EntityType,
  EventSchema,
  EventState,
  EventStateSchema,
  LedgerService,
  SequencerService,
  ShipmentSchema,
  errorInfo,
  errorReason,
} from "@logistics/client";

const sequencerAddr = process.env.SEQUENCER_ADDR ?? "127.0.0.1:50051";
const ledgerAddr = process.env.LEDGER_ADDR ?? "127.0.0.1:50052";
const shipmentId = process.argv[2] ?? `SHP-NPM-${Date.now()}`;

const sequencer = createClient(SequencerService, createGrpcTransport({ baseUrl: `http://${sequencerAddr}` }));
const ledger = createClient(LedgerService, createGrpcTransport({ baseUrl: `http://${ledgerAddr}` }));

const event = create(EventSchema, {
  entityType: EntityType.SHIPMENT,
  entityId: shipmentId,
  sequence: 1n,
  source: "npm-example",
  payload: { case: "shipmentCreated", value: { orderId: `ORD-${shipmentId}` } },
});

let refusedReason = "";
try {
  await sequencer.submitEvent({ event }, { timeoutMs: 5000 });
  throw new Error("a submission without an idempotency key was accepted");
} catch (err) {
  if (!(err instanceof ConnectError)) throw err;
  refusedReason = errorReason(err);
  console.log(`refused: ${err.rawMessage} (domain ${errorInfo(err)?.domain})`);
}

const answer = await sequencer.submitEvent(
  { event },
  { headers: { "idempotency-key": `npm-example:${shipmentId}:1` }, timeoutMs: 5000 },
);
let state = answer.state;
const deadline = Date.now() + 15000;
while (state !== EventState.APPLIED && Date.now() < deadline) {
  await sleep(100);
  const { status } = await sequencer.getEventStatus({ transactionId: answer.transactionId }, { timeoutMs: 5000 });
  state = status?.state ?? EventState.UNSPECIFIED;
}
const { shipment } = await ledger.getShipment({ shipmentId }, { timeoutMs: 5000 });
const shown = toJson(ShipmentSchema, shipment);
console.log(
  JSON.stringify({
    refusedReason,
    state: enumToJson(EventStateSchema, answer.state),
    final: enumToJson(EventStateSchema, state),
    shipment: { status: shown.status, version: shown.version },
  }),
);
