// @logistics/client: the generated stubs of logistics.{events,sequencer,ledger}.v1 (protoc-gen-es,
// for Connect v2 clients) and a typed google.rpc.ErrorInfo decoder.
//
//   import { SequencerService, errorReason } from "@logistics/client";
//   import { createClient } from "@connectrpc/connect";
//   import { createGrpcTransport } from "@connectrpc/connect-node";
//   const sequencer = createClient(SequencerService, createGrpcTransport({ baseUrl: "http://127.0.0.1:50051" }));

export * from "./gen/logistics/events/v1/events_pb.js";
export * from "./gen/logistics/sequencer/v1/sequencer_pb.js";
export * from "./gen/logistics/ledger/v1/ledger_pb.js";
export * from "./gen/google/rpc/status_pb.js";
export * from "./gen/google/rpc/error_details_pb.js";
export { decodeStatusDetails, errorInfo, errorInfosOfStatusDetails, errorReason } from "./errors.js";
