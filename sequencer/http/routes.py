"""The HTTP routes, read from the `google.api.http` annotations of the generated descriptors.

Served routes equal the annotations by construction: nothing here names a path. Only the subset
of AIP-127 templates the protos use is supported (literal segments, `{field.path}` variables of
one segment, a trailing `:verb`); anything else fails at start-up, not at request time.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, json_format, message, message_factory

from logistics.ledger.v1 import ledger_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer.http.problems import Problem

# The files whose services the HTTP listener transcodes.
FILES = (sequencer_pb2.DESCRIPTOR, ledger_pb2.DESCRIPTOR)
LEDGER_SERVICE = "logistics.ledger.v1.LedgerService"
_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\}")
_LITERAL = re.compile(r"[A-Za-z0-9._~-]+")


@dataclass(frozen=True)
class Route:
    """One annotated binding: an HTTP method and path template bound to one unary RPC."""

    http_method: str
    template: str
    body: str
    rpc: descriptor.MethodDescriptor
    pattern: re.Pattern[str]
    variables: tuple[str, ...]

    @property
    def service(self) -> str:
        return str(self.rpc.containing_service.full_name)

    @property
    def path(self) -> str:
        """The gRPC method path, e.g. /logistics.sequencer.v1.SequencerService/SubmitEvent."""
        return f"/{self.service}/{self.rpc.name}"

    @property
    def request_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.rpc.input_type)

    @property
    def response_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.rpc.output_type)


def _binding(rule: http_pb2.HttpRule) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind is None or kind == "custom":
        raise ValueError(f"unsupported HttpRule pattern {kind!r}")
    return kind.upper(), str(getattr(rule, kind))


def compile_template(template: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """`/v1/entities/{entity.entity_type}/{entity.entity_id}/sequences/{sequence}:skip` -> a regex
    over the raw (still percent-encoded) path and the variables' field paths, in order."""
    if not template.startswith("/"):
        raise ValueError(f"template {template!r} must start with /")
    path, verb = template, ""
    last = template.rsplit("/", 1)[-1]
    if ":" in last and not last.endswith("}"):
        path, _, verb = template.rpartition(":")
    parts: list[str] = []
    variables: list[str] = []
    for segment in path[1:].split("/"):
        variable = _VARIABLE.fullmatch(segment)
        if variable:
            parts.append(f"(?P<v{len(variables)}>[^/]+)")
            variables.append(variable.group(1))
        elif _LITERAL.fullmatch(segment):
            parts.append(re.escape(segment))
        else:
            raise ValueError(f"unsupported segment {segment!r} in {template!r}")
    regex = "/" + "/".join(parts) + (":" + re.escape(verb) if verb else "")
    return re.compile(regex), tuple(variables)


def load_routes(files: Iterable[descriptor.FileDescriptor] = FILES) -> list[Route]:
    """Every annotated binding of every service in `files`, the most literal templates first so
    that a verb route (`/v1/events:batch`) wins over a variable that could swallow it."""
    routes: list[Route] = []
    for file in files:
        for service in file.services_by_name.values():
            for rpc in service.methods:
                options = rpc.GetOptions()
                if not options.HasExtension(annotations_pb2.http):
                    continue
                if rpc.client_streaming or rpc.server_streaming:
                    raise ValueError(f"{rpc.full_name}: only unary RPCs can be annotated")
                rule = options.Extensions[annotations_pb2.http]
                for binding in (rule, *rule.additional_bindings):
                    method, template = _binding(binding)
                    pattern, variables = compile_template(template)
                    if binding.body not in ("", "*") and binding.body not in rpc.input_type.fields_by_name:
                        raise ValueError(f"{rpc.full_name}: body {binding.body!r} is not a field")
                    for variable in variables:
                        field_path(rpc.input_type, variable)
                    routes.append(Route(method, template, binding.body, rpc, pattern, variables))
    routes.sort(key=lambda r: (len(r.variables), -len(r.template)))
    return routes


@dataclass(frozen=True)
class Match:
    route: Route
    params: dict[str, str]


def match(routes: Iterable[Route], http_method: str, raw_path: str) -> Match:
    """The route for this method and path; 404 when no template matches the path, 405 (with
    the allowed methods) when templates match but none for this method."""
    allowed: list[str] = []
    for route in routes:
        found = route.pattern.fullmatch(raw_path)
        if found is None:
            continue
        if route.http_method != http_method:
            allowed.append(route.http_method)
            continue
        params = {}
        for index, variable in enumerate(route.variables):
            try:
                params[variable] = urllib.parse.unquote(found.group(f"v{index}"), errors="strict")
            except UnicodeDecodeError:
                raise Problem(400, "MALFORMED_REQUEST", f"path variable {variable} is not UTF-8") from None
        return Match(route, params)
    if allowed:
        raise Problem(
            405,
            "METHOD_NOT_ALLOWED",
            f"{http_method} is not allowed here; allowed: {', '.join(sorted(set(allowed)))}",
            headers={"Allow": ", ".join(sorted(set(allowed)))},
        )
    raise Problem(404, "ROUTE_NOT_FOUND", f"no route for {http_method} {raw_path}")


def field_path(message_type: descriptor.Descriptor, path: str) -> list[descriptor.FieldDescriptor]:
    """The fields along a dotted path (proto or JSON names), singular messages in between."""
    fields: list[descriptor.FieldDescriptor] = []
    current: descriptor.Descriptor | None = message_type
    for part in path.split("."):
        if current is None:
            raise KeyError(path)
        found = current.fields_by_name.get(part) or current.fields_by_camelcase_name.get(part)
        if found is None:
            raise KeyError(path)
        fields.append(found)
        current = found.message_type if found.type == found.TYPE_MESSAGE else None
        if found.type == found.TYPE_MESSAGE and found.is_repeated:
            current = None
    return fields


def enum_value(enum: descriptor.EnumDescriptor, text: str) -> str:
    """Accepts an enum value by its name (ENTITY_TYPE_SHIPMENT), without the enum's prefix, in any
    case, with `-` for `_` (shipment, inventory-item), or by number; unknown text is passed on
    unchanged for json_format to refuse with a clear message."""
    names = enum.values_by_name
    if text in names or text.isdigit():
        return text
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    normal = text.strip().upper().replace("-", "_")
    for candidate in (normal, prefix + normal):
        if candidate in names:
            return candidate
    return text


def _put(target: dict[str, Any], fields: list[descriptor.FieldDescriptor], value: Any, where: str, path: str) -> None:
    """Sets `value` at the field path in a proto3-JSON dict, refusing a second, different value."""
    node = target
    for field in fields[:-1]:
        key = field.json_name if field.json_name in node else field.name
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise Problem(400, "MALFORMED_REQUEST", f"{path}: {field.name} is not an object")
        node = child
    last = fields[-1]
    existing = [k for k in dict.fromkeys((last.name, last.json_name)) if k in node]
    if existing:
        if last.is_repeated and isinstance(value, list):
            raise Problem(400, "MALFORMED_REQUEST", f"{path} is given twice")
        if str(node[existing[0]]) != str(value):
            raise Problem(400, "MALFORMED_REQUEST", f"{path} differs between the {where} and the body")
        for key in existing:
            del node[key]
    node[last.name] = value


def _convert(field: descriptor.FieldDescriptor, text: str) -> Any:
    if field.enum_type is not None:
        return enum_value(field.enum_type, text)
    return text


def build_request(route: Route, params: Mapping[str, str], query: Iterable[tuple[str, str]], body: bytes) -> Any:
    """The RPC's request message from the path variables, the query string and the JSON body
    (proto3 JSON mapping; unknown fields are refused, as a mistyped field name should be)."""
    document: dict[str, Any] = {}
    if route.body:
        if body.strip():
            try:
                parsed = json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise Problem(400, "MALFORMED_REQUEST", f"the body is not valid JSON: {exc}") from exc
            if route.body == "*":
                if not isinstance(parsed, dict):
                    raise Problem(400, "MALFORMED_REQUEST", "the body must be a JSON object")
                document = parsed
            else:
                document = {route.body: parsed}
    elif body.strip():
        raise Problem(400, "MALFORMED_REQUEST", f"{route.http_method} {route.template} takes no body")
    for variable, value in params.items():
        fields = field_path(route.rpc.input_type, variable)
        _put(document, fields, _convert(fields[-1], value), "path", variable)
    grouped: dict[str, list[str]] = {}
    for name, value in query:
        grouped.setdefault(name, []).append(value)
    for name, values in grouped.items():
        if route.body == "*":
            raise Problem(
                400, "MALFORMED_REQUEST", f"query parameter {name!r}: this route takes its fields in the body"
            )
        try:
            fields = field_path(route.rpc.input_type, name)
        except KeyError:
            raise Problem(400, "MALFORMED_REQUEST", f"unknown query parameter {name!r}") from None
        leaf = fields[-1]
        if leaf.message_type is not None and leaf.message_type.full_name not in _SCALAR_MESSAGES:
            raise Problem(400, "MALFORMED_REQUEST", f"query parameter {name!r} names a message, not a field")
        if name in route.variables:
            raise Problem(400, "MALFORMED_REQUEST", f"query parameter {name!r} is a path variable")
        if leaf.is_repeated:
            _put(document, fields, [_convert(leaf, v) for v in values], "query", name)
        elif len(values) > 1:
            raise Problem(400, "MALFORMED_REQUEST", f"query parameter {name!r} is given more than once")
        else:
            _put(document, fields, _convert(leaf, values[0]), "query", name)
    request = route.request_class()
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise Problem(
            400, "MALFORMED_REQUEST", f"the request is not a valid {route.rpc.input_type.name}: {exc}"
        ) from exc
    return request


# Well-known messages that the proto3 JSON mapping writes as one string (query-friendly).
_SCALAR_MESSAGES = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"})


def render(response: message.Message) -> bytes:
    """The proto3 JSON of a response (lowerCamelCase names, fields at their defaults included so
    that callers see `awaitingSequence: "0"` rather than a missing key); deterministic, so one
    stored answer always renders to the same bytes."""
    document = json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
