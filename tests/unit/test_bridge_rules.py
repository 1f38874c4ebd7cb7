"""The broker bridges' pure rules: body decoding, the settings, the dead-letter subject."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format

from common.errors import MalformedRequest
from common.settings import ConfigError
from logistics.sequencer.v1 import sequencer_pb2
from sequencer.bridges.delivery import decode
from sequencer.bridges.jetstream import NatsBridge
from sequencer.config import BrokerSettings, Settings
from tests.support import shipment_event

REQUEST = sequencer_pb2.SubmitEventRequest(event=shipment_event("S-1", 1, "shipment_created"))
BASE = {"DATABASE_URL": "postgresql://localhost/x"}


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (REQUEST.SerializeToString(), "application/x-protobuf"),
        (REQUEST.SerializeToString(), "application/protobuf"),
        (json_format.MessageToJson(REQUEST).encode(), "application/json"),
        (json_format.MessageToJson(REQUEST).encode(), "application/json; charset=utf-8"),
        # Without a content type: JSON when it is an object, else protobuf.
        (json_format.MessageToJson(REQUEST).encode(), None),
        (REQUEST.SerializeToString(), None),
    ],
)
def test_a_body_decodes_by_its_content_type(body: bytes, content_type: str | None) -> None:
    assert decode(body, content_type) == REQUEST


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\xff\xfe", "application/x-protobuf"),
        (b"{not json", "application/json"),
        (b'{"event": {"unknownField": 1}}', "application/json"),
        (REQUEST.SerializeToString(), "text/plain"),
        (b"\xff{", "application/json"),
    ],
)
def test_an_undecodable_body_is_a_malformed_request(body: bytes, content_type: str) -> None:
    with pytest.raises(MalformedRequest):
        decode(body, content_type)


def test_bridges_are_off_unless_configured() -> None:
    brokers = Settings.from_env(BASE).brokers
    assert (brokers.amqp_url, brokers.nats_url) == ("", "")
    assert (brokers.amqp_queue, brokers.amqp_dead_queue) == ("logistics.events", "logistics.events.dead")
    assert (brokers.nats_stream, brokers.nats_subjects) == ("LOGISTICS_EVENTS", "logistics.events.>")
    assert brokers.nats_dead_subject == "logistics.dead"
    assert brokers.bridge_caller == "bridge"


def test_broker_settings_come_from_the_environment() -> None:
    brokers = Settings.from_env(
        {
            **BASE,
            "SEQUENCER_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/",
            "SEQUENCER_AMQP_QUEUE": "wms.events",
            "SEQUENCER_AMQP_PREFETCH": "64",
            "SEQUENCER_NATS_URL": "nats://127.0.0.1:4222",
            "SEQUENCER_BRIDGE_CALLER": "wms-1",
        }
    ).brokers
    assert (brokers.amqp_queue, brokers.amqp_prefetch, brokers.bridge_caller) == ("wms.events", 64, "wms-1")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SEQUENCER_BRIDGE_CALLER", "a caller with spaces"),
        ("SEQUENCER_NATS_SUBJECTS", "logistics.events"),
        ("SEQUENCER_NATS_DEAD_SUBJECT", "logistics.dead.>"),
        ("SEQUENCER_AMQP_DEAD_QUEUE", "logistics.events"),
        ("SEQUENCER_AMQP_PREFETCH", "0"),
        ("SEQUENCER_AMQP_QUEUES", "typo"),
    ],
)
def test_bad_broker_settings_stop_the_start(name: str, value: str) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env({**BASE, name: value})


def test_a_dead_letter_subject_keeps_the_rest_of_the_original_subject() -> None:
    bridge = NatsBridge(None, BrokerSettings())  # type: ignore[arg-type]
    assert bridge.dead_subject("logistics.events.shipment.S-1") == "logistics.dead.shipment.S-1"
    assert bridge.dead_subject("logistics.events.x") == "logistics.dead.x"


def test_outcome_names_follow_the_documented_form() -> None:
    import uuid
    from types import SimpleNamespace

    from logistics.events.v1 import events_pb2
    from sequencer import outcomes

    tx = uuid.uuid4()
    row: Any = SimpleNamespace(
        transaction_id=tx,
        entity_type=events_pb2.ENTITY_TYPE_INVENTORY_ITEM,
        entity_id="SKU.1/a",
        event_state=events_pb2.EVENT_STATE_REJECTED,
    )
    assert outcomes.message_id(row) == f"{tx}:rejected"
    assert outcomes.nats_subject("logistics.outcomes", row) == "logistics.outcomes.inventory_item.SKU%2E1/a"
    assert outcomes.routing_key(row) == "inventory_item.SKU%2E1/a.rejected"
    # One subscription row per (sink, target), the same on every replica.
    assert outcomes.subscription_id("nats", "a") == outcomes.subscription_id("nats", "a")
    assert outcomes.subscription_id("nats", "a") != outcomes.subscription_id("amqp", "a")
    assert [outcomes.retry_delay(step) for step in (1, 2, 3, 20)] == [0.5, 1.0, 2.0, 30.0]


@pytest.mark.parametrize("name", ["SEQUENCER_OUTCOMES_NATS", "SEQUENCER_OUTCOMES_AMQP"])
def test_an_outcome_stream_needs_its_brokers_url(name: str) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env({**BASE, name: "true"})
