"""The ledger's per-item apply spans: ApplyEvents holds events of many traces, so each item's
span takes the item's own traceparent as parent (set by the sequencer's forwarder) and links the
call's server span (sequencer/traces.py has the other half)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from common import tracing
from common.logs import enum_name
from ledger.batch import ApplyResult
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2


@contextlib.contextmanager
def applying(
    requests: Sequence[ledger_pb2.ApplyEventRequest],
) -> Iterator[Callable[[Sequence[ApplyResult]], None]]:
    """Spans from now to the end of the block, one per item, with the outcome the block reports
    through the yielded callback (a failure of the whole call marks them all)."""
    started = time.time_ns()
    call = trace.get_current_span()
    outcomes: list[ApplyResult] = []
    failed: BaseException | None = None
    try:
        yield outcomes.extend
    except BaseException as exc:
        failed = exc
        raise
    finally:
        for index, item in enumerate(requests):
            span = tracing.start(
                "ledger.apply",
                # No traceparent of its own: the item's span is the call's child.
                parent=item.traceparent or trace.set_span_in_context(call),
                links=[call],
                start_time=started,
                attributes={
                    "logistics.entity_type": enum_name(events_pb2.EntityType, item.event.entity_type),
                    "logistics.entity_id": item.event.entity_id,
                    "logistics.sequence": item.event.sequence,
                    "logistics.transaction_id": item.transaction_id,
                },
            )
            if index < len(outcomes):
                span.set_attribute("logistics.outcome", outcomes[index].outcome.name)
            if failed is not None:
                span.set_status(Status(StatusCode.ERROR, type(failed).__name__))
            span.end()
