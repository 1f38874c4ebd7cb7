"""The client's typed results: IntEnum mirrors equal to the proto enums, statuses with names,
and the LOGISTICS_* client configuration."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest

from logistics import client as lc
from logistics.client import results
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2


@pytest.mark.parametrize("mirror", [lc.EventState, lc.EntityType], ids=["EventState", "EntityType"])
def test_each_mirror_has_exactly_the_proto_enums_names_and_numbers(mirror: type[results._ProtoEnum]) -> None:
    assert set(results.MIRRORS) == {lc.EventState, lc.EntityType}
    proto = results.MIRRORS[mirror]
    assert {m.proto_name: int(m) for m in mirror} == dict(proto.items())


def test_a_state_is_its_number_and_prints_its_name() -> None:
    state = lc.EventState.APPLIED
    assert state == int(events_pb2.EVENT_STATE_APPLIED) == 3
    assert str(state) == "EVENT_STATE_APPLIED" and f"{state}" == "EVENT_STATE_APPLIED"
    assert lc.EventState.parse("applied") is state and lc.EventState.parse("EVENT_STATE_APPLIED") is state
    with pytest.raises(ValueError, match="parked"):
        lc.EventState.parse("done")
    # A state a newer server added does not fail a read.
    assert results.event_state(99) is lc.EventState.UNSPECIFIED


def test_a_status_carries_enum_members_and_datetimes() -> None:
    message = sequencer_pb2.EventStatus(
        transaction_id="tx-1",
        entity=events_pb2.EntityRef(entity_type=events_pb2.ENTITY_TYPE_SHIPMENT, entity_id="SHP-1"),
        sequence=2,
        state=events_pb2.EVENT_STATE_PARKED,
        awaiting_sequence=1,
    )
    message.accepted_at.FromDatetime(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    status = lc.Status.of(message)
    assert status.state is lc.EventState.PARKED and str(status.state) == "EVENT_STATE_PARKED"
    assert status.entity == lc.EntityKey(lc.EntityType.SHIPMENT, "SHP-1")
    assert str(status.entity.entity_type) == "ENTITY_TYPE_SHIPMENT" and status.entity.entity_id == "SHP-1"
    assert status.accepted_at == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert status.processed_at is None and not status.terminal
    assert status.proto is message


def test_submit_result_state_is_a_member() -> None:
    result = lc.SubmitResult(
        response=sequencer_pb2.SubmitEventResponse(state=events_pb2.EVENT_STATE_QUEUED),
        replayed=False,
        correlation_id="c",
        idempotency_key="k",
        expires_at=None,
    )
    assert result.state is lc.EventState.QUEUED


def test_client_config_from_the_environment(tmp_path: Path) -> None:
    assert lc.ClientConfig.from_env({}) == lc.ClientConfig()
    assert lc.ClientConfig().credentials() is None
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    config = lc.ClientConfig.from_env(
        {
            "LOGISTICS_SEQUENCER_ADDR": "10.0.0.1:1",
            "LOGISTICS_LEDGER_ADDR": "10.0.0.2:2",
            "LOGISTICS_TOKEN_FILE": str(token_file),
            "LOGISTICS_CLIENT_ID": "erp",
        }
    )
    assert (config.sequencer, config.ledger, config.token, config.client_id) == (
        "10.0.0.1:1",
        "10.0.0.2:2",
        "s3cret",
        "erp",
    )
    assert lc.ClientConfig.from_env({"LOGISTICS_TOKEN": "t", "LOGISTICS_TOKEN_FILE": str(token_file)}).token == "t"
    with pytest.raises(lc.ClientConfigError, match="go together"):
        lc.ClientConfig.from_env({"LOGISTICS_TLS_CA": "ca.pem", "LOGISTICS_TLS_CERT": "c.pem"})
    with pytest.raises(lc.ClientConfigError, match="cannot be read"):
        lc.ClientConfig.from_env({"LOGISTICS_TLS_CA": str(tmp_path / "missing.pem")}).credentials()
    with_ca = lc.ClientConfig.from_env({"LOGISTICS_TLS_CA": str(token_file), "LOGISTICS_TLS_SERVER_NAME": "seq"})
    assert isinstance(with_ca.credentials(), grpc.ChannelCredentials)
    assert with_ca.channel_options() == [("grpc.ssl_target_name_override", "seq")]
