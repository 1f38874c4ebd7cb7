"""Typed results: enum members that print their names, statuses as frozen dataclasses.

The generated messages carry enums as bare integers (`status.state == 3`), which is what goes
on the wire and stays so. The client's results wrap them in `IntEnum` mirrors of the proto
enums: a member *is* its number (comparisons with `events_pb2.EVENT_STATE_APPLIED` and
assignment to proto fields keep working) and prints its proto name (`EVENT_STATE_APPLIED`, as
buf curl, grpcurl and `python -m ops --json` print it). A unit test checks each mirror against
the generated enum, name for name and number for number.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from typing import Any, NamedTuple, Self

from google.protobuf import timestamp_pb2

from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2


class _ProtoEnum(enum.IntEnum):
    """An IntEnum mirror of a proto enum; members print as the proto value name."""

    @property
    def proto_name(self) -> str:
        return f"{self._prefix()}{self.name}"

    @classmethod
    def _prefix(cls) -> str:
        return PREFIXES[cls.__name__]

    @classmethod
    def parse(cls, text: str) -> Self:
        """A member from its short (`applied`) or proto (`EVENT_STATE_APPLIED`) name, any case."""
        name = text.strip().upper().removeprefix(cls._prefix())
        try:
            return cls[name]
        except KeyError:
            choices = ", ".join(m.name.lower() for m in cls if m.value)
            raise ValueError(f"{text!r} is not one of {choices}") from None

    def __str__(self) -> str:
        return self.proto_name

    def __format__(self, spec: str) -> str:
        return format(self.proto_name, spec)


class EventState(_ProtoEnum):
    """logistics.events.v1.EventState."""

    UNSPECIFIED = 0
    PARKED = 1
    QUEUED = 2
    APPLIED = 3
    REJECTED = 4
    DUPLICATE = 5
    SKIPPED = 6
    BLOCKED = 7


class EntityType(_ProtoEnum):
    """logistics.events.v1.EntityType."""

    UNSPECIFIED = 0
    SHIPMENT = 1
    INVENTORY_ITEM = 2


PREFIXES = {"EventState": "EVENT_STATE_", "EntityType": "ENTITY_TYPE_"}
#: The proto enum each mirror reflects (checked by tests/unit/test_client_results.py).
MIRRORS: dict[type[_ProtoEnum], Any] = {EventState: events_pb2.EventState, EntityType: events_pb2.EntityType}


def event_state(number: int) -> EventState:
    """The member for a wire number; a number this client does not know yet stays usable as
    UNSPECIFIED rather than failing a read (a newer server may add states)."""
    try:
        return EventState(number)
    except ValueError:
        return EventState.UNSPECIFIED


def entity_type(number: int) -> EntityType:
    try:
        return EntityType(number)
    except ValueError:
        return EntityType.UNSPECIFIED


class EntityKey(NamedTuple):
    """An entity: its type (printing `ENTITY_TYPE_SHIPMENT`) and id. Accepted wherever the
    client takes an entity, like a `(type, id)` tuple or an `EntityRef`."""

    entity_type: EntityType
    entity_id: str

    @classmethod
    def of(cls, ref: events_pb2.EntityRef) -> EntityKey:
        return cls(entity_type(ref.entity_type), ref.entity_id)


def timestamp(message: timestamp_pb2.Timestamp, present: bool) -> dt.datetime | None:
    """An aware UTC datetime, None when the field is unset."""
    return message.ToDatetime(tzinfo=dt.UTC) if present else None


@dataclasses.dataclass(frozen=True)
class Status:
    """Everything known about one accepted event (`EventStatus`), with enum members and
    datetimes; `.proto` is the message as received."""

    transaction_id: str
    entity: EntityKey
    sequence: int
    state: EventState
    awaiting_sequence: int
    reason: str
    reason_detail: str
    entity_version: int
    correlation_id: str
    idempotency_key: str
    forward_attempts: int
    ledger_code: str
    accepted_at: dt.datetime | None
    queued_at: dt.datetime | None
    processed_at: dt.datetime | None
    blocked_at: dt.datetime | None
    proto: sequencer_pb2.EventStatus = dataclasses.field(repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        return self.state in (EventState.APPLIED, EventState.REJECTED, EventState.SKIPPED)

    @classmethod
    def of(cls, message: sequencer_pb2.EventStatus) -> Status:
        return cls(
            transaction_id=message.transaction_id,
            entity=EntityKey.of(message.entity),
            sequence=message.sequence,
            state=event_state(message.state),
            awaiting_sequence=message.awaiting_sequence,
            reason=message.reason,
            reason_detail=message.reason_detail,
            entity_version=message.entity_version,
            correlation_id=message.correlation_id,
            idempotency_key=message.idempotency_key,
            forward_attempts=message.forward_attempts,
            ledger_code=message.ledger_code,
            accepted_at=timestamp(message.accepted_at, message.HasField("accepted_at")),
            queued_at=timestamp(message.queued_at, message.HasField("queued_at")),
            processed_at=timestamp(message.processed_at, message.HasField("processed_at")),
            blocked_at=timestamp(message.blocked_at, message.HasField("blocked_at")),
            proto=message,
        )
