"""Hard limits answer with clear statuses and change nothing."""

from __future__ import annotations

import grpc
import pytest

from logistics.sequencer.v1 import sequencer_pb2
from tests.support import System, error_info, shipment_event


async def test_oversized_request_is_refused(system: System) -> None:
    event = shipment_event("LIM-1", 1, "shipment_created")
    event.source = "x" * (2 * 1024 * 1024)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.submit(event, "lim-1")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await system.status("00000000-0000-0000-0000-000000000000")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_oversized_metadata_is_refused(system: System) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.sequencer.SubmitEvent(
            sequencer_pb2.SubmitEventRequest(event=shipment_event("LIM-2", 1, "shipment_created")),
            metadata=(("idempotency-key", "lim-2"), ("x-padding", "p" * 40_000)),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Nothing was accepted: the same key is still free for the real request.
    call = system.sequencer.SubmitEvent(
        sequencer_pb2.SubmitEventRequest(event=shipment_event("LIM-2", 1, "shipment_created")),
        metadata=(("idempotency-key", "lim-2"),),
        timeout=5,
    )
    await call
    assert "idempotency-replayed" not in dict(await call.trailing_metadata())


async def test_page_sizes_are_bounded(system: System) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.admin.ListGaps(sequencer_pb2.ListGapsRequest(page_size=-1), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"
    for n in range(2, 8):
        await system.submit(shipment_event(f"LIM-P{n}", 2, "shipment_picked"))
    reply = await system.admin.ListGaps(sequencer_pb2.ListGapsRequest(page_size=100_000), timeout=5)
    assert len(reply.gaps) == 6 and not reply.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.admin.ListGaps(sequencer_pb2.ListGapsRequest(page_token="not base64!"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
