"""Fuzzing every public RPC of both services with random and mutated protobuf bytes, random
field values and random metadata. Every answer must be a well-formed status (never INTERNAL,
UNKNOWN or a dropped connection) and a rejected call must leave the database unchanged.

`make test` runs 10,000 calls; FUZZ_EXAMPLES=5000 (x20 calls each) for a long run."""

from __future__ import annotations

import os
import string
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from ledger.config import Settings as LedgerSettings
from ledger.server import build_server as build_ledger
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer.server import build_server as build_sequencer
from tests.support import inventory_event, shipment_event

SERVICES = [
    sequencer_pb2.DESCRIPTOR.services_by_name["SequencerService"],
    sequencer_pb2.DESCRIPTOR.services_by_name["SequencerAdminService"],
    ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"],
]
METHODS = [(s, m) for s in SERVICES for m in s.methods]
STATE_CHANGING = {
    "SubmitEvent",
    "SubmitEvents",
    "SkipSequence",
    "ApplyEvent",
    "ApplyEvents",
    "CreateWebhookSubscription",
    "DeleteWebhookSubscription",
    "RedeliverWebhook",
}
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}

# A few valid requests to mutate, so mutations reach deep into the handlers.
SEEDS: dict[str, list[Message]] = {
    "SubmitEvent": [
        sequencer_pb2.SubmitEventRequest(event=shipment_event("FZ-1", 1, "shipment_created"), request_id="fz-1"),
        sequencer_pb2.SubmitEventRequest(
            event=inventory_event("FZ-SKU", 2, "inventory_moved", from_location="A", to_location="B", quantity=3),
            request_id="fz-2",
        ),
    ],
    "SubmitEvents": [
        sequencer_pb2.SubmitEventsRequest(
            requests=[
                sequencer_pb2.SubmitEventRequest(
                    event=shipment_event("FZ-3", 1, "shipment_created"), request_id="fz-b1"
                ),
                sequencer_pb2.SubmitEventRequest(
                    event=shipment_event("FZ-3", 2, "shipment_picked"), request_id="fz-b2"
                ),
                sequencer_pb2.SubmitEventRequest(
                    event=inventory_event("FZ-SKU3", 1, "inventory_received", location="A", quantity=4),
                    request_id="fz-b3",
                ),
            ]
        ),
    ],
    "ApplyEvent": [
        ledger_pb2.ApplyEventRequest(event=shipment_event("FZ-2", 1, "shipment_created"), correlation_id="c"),
        ledger_pb2.ApplyEventRequest(
            event=inventory_event("FZ-SKU2", 1, "inventory_received", location="A", quantity=5)
        ),
    ],
    "ApplyEvents": [
        ledger_pb2.ApplyEventsRequest(
            requests=[
                ledger_pb2.ApplyEventRequest(event=shipment_event("FZ-4", 1, "shipment_created"), correlation_id="c"),
                ledger_pb2.ApplyEventRequest(event=shipment_event("FZ-4", 2, "shipment_picked")),
                ledger_pb2.ApplyEventRequest(
                    event=inventory_event("FZ-SKU4", 1, "inventory_received", location="A", quantity=5)
                ),
            ]
        ),
    ],
    "CreateWebhookSubscription": [
        sequencer_pb2.CreateWebhookSubscriptionRequest(
            url="http://127.0.0.1:9/hooks",
            states=[events_pb2.EVENT_STATE_APPLIED, events_pb2.EVENT_STATE_REJECTED],
            entity_type=events_pb2.ENTITY_TYPE_SHIPMENT,
            description="fuzz",
            request_id="fz-sub",
        )
    ],
    "SkipSequence": [
        sequencer_pb2.SkipSequenceRequest(
            entity=events_pb2.EntityRef(entity_type=events_pb2.ENTITY_TYPE_SHIPMENT, entity_id="FZ-1"),
            sequence=2,
            reason="fuzz",
            request_id="fz-skip",
        )
    ],
}

INTS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 2**62, 2**63 - 1, -(2**63)]),
)
UINTS = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1]))
TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.:/", max_size=20),
    st.sampled_from(["", "\x00", "a\x00b", "x" * 300, "é" * 129, "SHP-1", "FZ-1", " ", "\n"]),
)


def scalar(field: d.FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in (d.FieldDescriptor.TYPE_STRING,):
        return TEXT
    if kind == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=40)
    if kind == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == d.FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 12)
    if kind in (d.FieldDescriptor.TYPE_UINT64, d.FieldDescriptor.TYPE_FIXED64):
        return UINTS
    if kind in (d.FieldDescriptor.TYPE_UINT32, d.FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if kind in (d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_SINT32, d.FieldDescriptor.TYPE_SFIXED32):
        return st.integers(-(2**31), 2**31 - 1)
    if kind in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True)
    return INTS


@st.composite
def message(draw: Any, descriptor: d.Descriptor, depth: int = 0) -> Message:
    """A message of this type with random values in a random subset of its fields."""
    from google.protobuf import message_factory

    msg = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.message_type is not None:
            if depth >= 3 or field.is_repeated:
                continue
            child = draw(message(field.message_type, depth + 1))
            getattr(msg, field.name).CopyFrom(child)
        elif field.is_repeated:
            getattr(msg, field.name).extend(draw(st.lists(scalar(field), max_size=3)))
        else:
            setattr(msg, field.name, draw(scalar(field)))
    return msg


@st.composite
def payload(draw: Any, method: d.MethodDescriptor) -> bytes:
    """Random bytes, a mutated valid request, or a structurally valid request of random values."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return bytes(draw(st.binary(max_size=200)))
    if choice == 1 and method.name in SEEDS:
        raw = bytearray(draw(st.sampled_from(SEEDS[method.name])).SerializeToString())
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, max(0, len(raw) - 1)))
            operation = draw(st.integers(0, 2))
            if operation == 0 and raw:
                raw[position] = draw(st.integers(0, 255))
            elif operation == 1:
                raw[position:position] = draw(st.binary(min_size=1, max_size=8))
            elif raw:
                del raw[position : position + draw(st.integers(1, 8))]
        return bytes(raw)
    return bytes(draw(message(method.input_type)).SerializeToString())


HEADER = st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True).filter(
    lambda k: not k.startswith("grpc-") and k not in {"te", "content-type", "user-agent"} and not k.endswith("-bin")
)
METADATA = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from(
                ["idempotency-key", "x-idempotency-key", "x-client-id", "x-correlation-id", "authorization"]
            ),
            HEADER,
        ),
        st.text(alphabet=string.printable.strip() + " ", max_size=300),
    ),
    max_size=4,
)

CALL = st.sampled_from(METHODS).flatmap(lambda sm: st.tuples(st.just(sm[0]), st.just(sm[1]), payload(sm[1]), METADATA))


class Target:
    def __init__(self, sequencer_app: Any, ledger_app: Any) -> None:
        self.sequencer_app = sequencer_app
        self.ledger_app = ledger_app
        self.channels = {
            "sequencer": grpc.aio.insecure_channel(f"127.0.0.1:{sequencer_app.port}"),
            "ledger": grpc.aio.insecure_channel(f"127.0.0.1:{ledger_app.port}"),
        }
        self.calls = 0
        self.codes: dict[str, int] = {}

    async def fingerprint(self) -> tuple[Any, ...]:
        query = text(
            "SELECT (SELECT count(*) FROM sequencer.events), (SELECT count(*) FROM sequencer.idempotency_keys),"
            " (SELECT count(*) FROM sequencer.entities), (SELECT coalesce(sum(watermark), 0) FROM sequencer.entities),"
            " (SELECT count(*) FROM sequencer.gaps), (SELECT count(*) FROM ledger.entity_history),"
            " (SELECT count(*) FROM sequencer.outbox_subscriptions),"
            " (SELECT count(*) FROM sequencer.outbox_deliveries),"
            " (SELECT coalesce(sum(version), 0) FROM ledger.entity_versions),"
            " (SELECT count(*) FROM ledger.shipments), (SELECT count(*) FROM ledger.inventory_balances)"
        )
        async with self.sequencer_app.engine.connect() as conn:
            return tuple((await conn.execute(query)).one())

    async def call(
        self, service: d.ServiceDescriptor, method: d.MethodDescriptor, raw: bytes, md: Any
    ) -> grpc.StatusCode:
        channel = self.channels["ledger" if service.name == "LedgerService" else "sequencer"]
        path = f"/{service.full_name}/{method.name}"
        self.calls += 1
        try:
            if method.server_streaming:
                stream: Any = channel.unary_stream(path)(raw, metadata=md, timeout=0.5)  # type: ignore[arg-type]
                await stream.read()
                stream.cancel()
                code = grpc.StatusCode.OK
            else:
                await channel.unary_unary(path)(raw, metadata=md, timeout=5)  # type: ignore[arg-type]
                code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if method.server_streaming and code == grpc.StatusCode.DEADLINE_EXCEEDED:
                code = grpc.StatusCode.OK  # an open stream with nothing to say yet
            assert code not in NEVER, f"{path} answered {code.name}: {exc.details()} for {raw!r} {md!r}"
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        return code

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


@pytest.fixture
async def target(database_url: str, sequencer_settings: Any) -> AsyncIterator[Target]:
    ledger_app = await build_ledger(
        LedgerSettings(database_url=database_url, listen_addr="127.0.0.1:0", metrics_addr="127.0.0.1:0")
    )
    # No forwarder: the database changes only when a fuzzed call is accepted.
    sequencer_app = await build_sequencer(sequencer_settings, run_forwarder=False)
    fuzz = Target(sequencer_app, ledger_app)
    yield fuzz
    print("fuzz calls:", fuzz.calls, "answers:", dict(sorted(fuzz.codes.items())))
    await fuzz.close()
    await sequencer_app.stop(0)
    await ledger_app.stop(0)


EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "500"))


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(calls=st.lists(CALL, min_size=20, max_size=20))
async def test_every_rpc_answers_bad_input_with_a_clean_status(target: Target, calls: list[Any]) -> None:
    before = await target.fingerprint()
    for service, method, raw, md in calls:
        code = await target.call(service, method, raw, md)
        if code == grpc.StatusCode.OK and method.name in STATE_CHANGING:
            before = await target.fingerprint()  # an accepted change: the new baseline
            continue
        after = await target.fingerprint()
        assert after == before, f"{method.name} answered {code.name} but changed the database"


def test_the_fuzz_run_is_big_enough() -> None:
    # 20 calls per example: the default run makes 10,000 calls.
    assert EXAMPLES * 20 >= 10_000 or "FUZZ_EXAMPLES" in os.environ
