"""The ledger's errors. Each carries an ErrorInfo reason; interceptors.py maps them to codes.

Business-rule refusals (illegal transition, insufficient stock) are not errors: they are
REJECTED outcomes recorded in the history. These classes are for requests the ledger cannot
process at all.
"""

from __future__ import annotations

from common.errors import DeadlineReached, DomainError, InvalidArgument, NotFound, Retryable

__all__ = [
    "DeadlineReached",
    "EntityNotFound",
    "InvalidArgument",
    "InvalidEvent",
    "InvalidPageToken",
    "InvalidRequest",
    "InventoryItemNotFound",
    "LedgerError",
    "NotFound",
    "OutOfOrder",
    "Retryable",
    "SequenceConflict",
    "ShipmentNotFound",
    "in_batch",
]


class LedgerError(DomainError):
    """Base of every ledger-specific error."""


class InvalidEvent(LedgerError, InvalidArgument):
    """The event is malformed; the ledger re-checks what the sequencer checked, trusting nothing."""

    reason = "INVALID_EVENT"


class InvalidRequest(LedgerError, InvalidArgument):
    """A query field is missing or out of range (for example a negative page size)."""

    reason = "INVALID_ARGUMENT"


class InvalidPageToken(LedgerError, InvalidArgument):
    """The page token was not issued by this service."""

    reason = "INVALID_PAGE_TOKEN"


class SequenceConflict(LedgerError):
    """The MSI was already processed with a different payload: a producer bug, never applied."""

    reason = "SEQUENCE_CONFLICT"


class OutOfOrder(LedgerError):
    """The MSI is not the direct successor of the entity's version (compare-and-set failed).

    Metadata `expected_sequence` tells the caller which MSI the ledger waits for.
    """

    reason = "OUT_OF_ORDER"


class ShipmentNotFound(LedgerError, NotFound):
    reason = "SHIPMENT_NOT_FOUND"


class InventoryItemNotFound(LedgerError, NotFound):
    reason = "INVENTORY_ITEM_NOT_FOUND"


class EntityNotFound(LedgerError, NotFound):
    """No event of this entity was ever processed, so it has no history."""

    reason = "ENTITY_NOT_FOUND"


def in_batch(error: LedgerError, index: int) -> LedgerError:
    """The same refusal about item `index` of an ApplyEvents request: same class (so the same
    code and reason), with the item named in the message, in `field` and in `index`, so the
    caller knows which event to look at."""
    where = f"requests[{index}]"
    metadata = {**error.metadata, "index": index}
    if "field" in metadata:
        metadata["field"] = f"{where}.{metadata['field']}"
    return type(error)(f"{where}: {error.message}", **metadata)
