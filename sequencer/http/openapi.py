"""The OpenAPI 3 document of the HTTP API, derived from the protos' descriptors and annotations.

Schemas follow the proto3 JSON mapping (lowerCamelCase names; 64-bit integers as strings; enums
by name; Timestamp as RFC 3339, Duration as "1.5s"). `scripts/gen_openapi.py` writes it to
docs/openapi.json; `make protos-check` fails when that file differs from what the protos give,
and the server serves the same document at /openapi.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor

from sequencer.http.routes import Route, field_path, load_routes
from sequencer.http.transcoder import MAX_WAIT

# RPCs that take an idempotency key (header Idempotency-Key, or the body's requestId), and the
# ones that honour `Prefer: wait=N`.
KEYED = frozenset({"SubmitEvent", "SkipSequence", "RetryBlockedEvent", "CreateWebhookSubscription"})
WAITABLE = frozenset({"SubmitEvent", "GetEventStatus"})

_SCALARS: dict[int, dict[str, Any]] = {
    descriptor.FieldDescriptor.TYPE_STRING: {"type": "string"},
    descriptor.FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
    descriptor.FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    descriptor.FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    descriptor.FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    descriptor.FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    descriptor.FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    descriptor.FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    descriptor.FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    descriptor.FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    descriptor.FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    descriptor.FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    descriptor.FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    descriptor.FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
    descriptor.FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "description": 'seconds with an "s" suffix, e.g. "1.5s"'},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
}
PROBLEM = {
    "type": "object",
    "description": "RFC 9457 problem details; reason and metadata come from the gRPC ErrorInfo.",
    "required": ["type", "title", "status", "detail", "reason"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "reason": {"type": "string"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "instance": {"type": "string"},
        "correlation_id": {"type": "string"},
    },
}


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, message: descriptor.Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        name = message.full_name
        if name not in self.components:
            self.components[name] = {}  # placeholder first: recursive messages terminate
            self.components[name] = self._message(message)
        return {"$ref": f"#/components/schemas/{name}"}

    def enum(self, enum: descriptor.EnumDescriptor) -> dict[str, Any]:
        name = enum.full_name
        if name not in self.components:
            self.components[name] = {"type": "string", "enum": [v.name for v in enum.values]}
        return {"$ref": f"#/components/schemas/{name}"}

    def field(self, field: descriptor.FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        single = self.single(field)
        return {"type": "array", "items": single} if field.is_repeated else single

    def single(self, field: descriptor.FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None:
            return self.ref(field.message_type)
        if field.enum_type is not None:
            return self.enum(field.enum_type)
        return dict(_SCALARS[field.type])

    def _message(self, message: descriptor.Descriptor) -> dict[str, Any]:
        properties = {f.json_name: self.field(f) for f in message.fields}
        return {"type": "object", "properties": properties, "additionalProperties": False}


def _query_parameters(schemas: _Schemas, route: Route) -> list[dict[str, Any]]:
    """GET/DELETE fields outside the path, as query parameters (one level of nested messages,
    e.g. `entity.entity_type`), named by their proto field paths."""
    parameters: list[dict[str, Any]] = []

    def walk(message: descriptor.Descriptor, prefix: str, depth: int) -> None:
        for field in message.fields:
            path = prefix + field.name
            if path in route.variables:
                continue
            if field.message_type is not None and field.message_type.full_name not in _WELL_KNOWN:
                if depth < 1 and not field.is_repeated:
                    walk(field.message_type, path + ".", depth + 1)
                continue
            parameters.append({"name": path, "in": "query", "required": False, "schema": schemas.field(field)})

    walk(route.rpc.input_type, "", 0)
    return parameters


def _operation(schemas: _Schemas, route: Route) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    for variable in route.variables:
        leaf = field_path(route.rpc.input_type, variable)[-1]
        schema = schemas.single(leaf)
        if leaf.type == leaf.TYPE_ENUM:
            schema = {"type": "string", "description": "the enum value's name, or its short form (shipment)"}
        parameters.append({"name": variable, "in": "path", "required": True, "schema": schema})
    if not route.body:
        parameters += _query_parameters(schemas, route)
    success = "202" if route.path.endswith("/SubmitEvent") else "200"
    operation: dict[str, Any] = {
        "operationId": f"{route.rpc.containing_service.name}_{route.rpc.name}",
        "tags": [route.rpc.containing_service.name],
        "summary": f"{route.rpc.containing_service.full_name}.{route.rpc.name}",
        "parameters": parameters,
        "responses": {
            success: {
                "description": "the RPC's response, proto3 JSON",
                "content": {"application/json": {"schema": schemas.ref(route.rpc.output_type)}},
            },
            "default": {
                "description": "an error",
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
            },
        },
    }
    if success == "202":
        operation["responses"][success]["headers"] = {
            "Location": {"description": "/v1/transactions/{transaction_id}", "schema": {"type": "string"}}
        }
        operation["responses"]["200"] = {
            "description": "terminal within `Prefer: wait=N`",
            "content": {"application/json": {"schema": schemas.ref(route.rpc.output_type)}},
        }
    if route.rpc.name in KEYED:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                # SubmitEvent takes it only here or in `requestId`; the others in `requestId` too.
                "required": False,
                "description": 'an RFC 8941 string ("abc"); the bare form abc is accepted too',
                "schema": {"type": "string"},
            }
        )
    if route.rpc.name in WAITABLE:
        parameters.append(
            {
                "name": "Prefer",
                "in": "header",
                "required": False,
                "description": f"RFC 7240 `wait=N` (at most {MAX_WAIT} s)",
                "schema": {"type": "string"},
            }
        )
    if route.body:
        body_schema = (
            schemas.ref(route.rpc.input_type)
            if route.body == "*"
            else schemas.field(route.rpc.input_type.fields_by_name[route.body])
        )
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_schema}}}
    return operation


def build(routes: Iterable[Route] | None = None) -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, Any] = {}
    for route in sorted(routes if routes is not None else load_routes(), key=lambda r: (r.template, r.http_method)):
        paths.setdefault(route.template, {})[route.http_method.lower()] = _operation(schemas, route)
    probe = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}
    paths["/healthz"] = {"get": {"operationId": "healthz", "summary": "the process lives", "responses": {"200": probe}}}
    paths["/readyz"] = {
        "get": {
            "operationId": "readyz",
            "summary": "the database and the ledger are reachable",
            "responses": {
                "200": probe,
                "503": {
                    "description": "not ready",
                    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
                },
            },
        }
    }
    components = dict(sorted(schemas.components.items()))
    components["Problem"] = PROBLEM
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "logistics sequencer HTTP/JSON API",
            "version": "v1",
            "description": "Transcoded from the gRPC API by its google.api.http annotations (SPEC 13).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }


def render(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=False) + "\n").encode()
