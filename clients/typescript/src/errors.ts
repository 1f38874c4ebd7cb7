// Typed google.rpc.ErrorInfo decoding: the stable, machine-readable reason of every error the
// sequencer and the ledger answer (IDEMPOTENCY_KEY_MISSING, SEQUENCE_CONFLICT, TRANSIENT, ...).
//
// Over gRPC the details travel in the `grpc-status-details-bin` trailer (a serialized
// google.rpc.Status, base64 in text form); Connect's transports parse it into ConnectError
// details. `errorInfo(err)` reads a ConnectError; `decodeStatusDetails(value)` reads the raw
// trailer value (bytes, or base64 with or without padding, as other tools print it).

import { fromBinary } from "@bufbuild/protobuf";
import { base64Decode } from "@bufbuild/protobuf/wire";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { ConnectError } from "@connectrpc/connect";

import { ErrorInfoSchema, type ErrorInfo } from "./gen/google/rpc/error_details_pb.js";
import { StatusSchema, type Status } from "./gen/google/rpc/status_pb.js";

export type { ErrorInfo, Status };

/** The ErrorInfo of a failed call, or undefined when its status carried none. */
export function errorInfo(err: unknown): ErrorInfo | undefined {
  if (!(err instanceof ConnectError)) return undefined;
  return err.findDetails(ErrorInfoSchema)[0];
}

/** The ErrorInfo reason of a failed call ("" when none): what callers branch on. */
export function errorReason(err: unknown): string {
  return errorInfo(err)?.reason ?? "";
}

/** The google.rpc.Status in a `grpc-status-details-bin` value. */
export function decodeStatusDetails(value: Uint8Array | string): Status {
  const bytes = typeof value === "string" ? base64Decode(value.trim()) : value;
  return fromBinary(StatusSchema, bytes);
}

/** The ErrorInfo details of a `grpc-status-details-bin` value. */
export function errorInfosOfStatusDetails(value: Uint8Array | string): ErrorInfo[] {
  const found: ErrorInfo[] = [];
  for (const detail of decodeStatusDetails(value).details) {
    const info = anyUnpack(detail, ErrorInfoSchema);
    if (info !== undefined) found.push(info);
  }
  return found;
}
