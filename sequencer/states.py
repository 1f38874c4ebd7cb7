"""Event states: the one source of their numbers, taken from the contract's enum.

The SQL of this service receives states as parameters from here; the models' CHECK constraint
and a unit test hold it to the proto enum."""

from __future__ import annotations

from common.logs import enum_name
from logistics.events.v1 import events_pb2

PARKED = events_pb2.EVENT_STATE_PARKED
QUEUED = events_pb2.EVENT_STATE_QUEUED
APPLIED = events_pb2.EVENT_STATE_APPLIED
REJECTED = events_pb2.EVENT_STATE_REJECTED
DUPLICATE = events_pb2.EVENT_STATE_DUPLICATE
SKIPPED = events_pb2.EVENT_STATE_SKIPPED
BLOCKED = events_pb2.EVENT_STATE_BLOCKED

# States an event row can be in (DUPLICATE is an answer, never a row's state). A BLOCKED event
# is held: it waits for an operator, and its entity with it.
HELD = frozenset({PARKED, QUEUED, BLOCKED})
TERMINAL = frozenset({APPLIED, REJECTED, SKIPPED})


def state_name(state: int) -> str:
    """The enum name (EVENT_STATE_QUEUED), for logs and metric labels."""
    return events_pb2.EventState.Name(state)  # type: ignore[arg-type]


def entity_type_name(entity_type: int) -> str:
    """The enum name (ENTITY_TYPE_SHIPMENT), for logs: both services log enum names, never
    numbers (a value the enum lacks, from bad input, stays its number)."""
    return enum_name(events_pb2.EntityType, entity_type)
