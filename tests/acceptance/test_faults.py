"""Fault tests (SPEC 8), black-box: real service processes (a ledger, two sequencer replicas on
one database) on a PostgreSQL cluster the test owns, driven over gRPC only, by a producer that
batches (SubmitEvents), reorders (some events park) and retries with the same keys. Every fault
kind of tests/chaos/pipeline.py is injected once at a random moment under load: PostgreSQL
crash-restart, pg_terminate_backend of every service session, the ledger paused past the
forwarder's deadline, a replica paused past its lease, kill -9 of the ledger, kill -9 of a
replica. Then the audit: nothing lost, nothing applied twice, per-entity order kept, the ledger
equal to the in-order model. `make chaos` runs the same campaign for minutes (docs/faults.md);
`python -m tests.chaos --only KIND` runs one kind alone."""

from __future__ import annotations

import asyncio
import zlib
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.chaos.campaign import Plan, run
from tests.chaos.pipeline import FAULTS
from tests.cluster import Cluster

# Seconds of load the six faults are spread over; they outlast it (a pause lasts up to 4 s, a
# restart a few seconds), and the load goes on until the last one is over.
SHORT = 6.0


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A private cluster the test may crash."""
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


async def test_every_fault_once_under_load(cluster: Cluster) -> None:
    # Output (the campaign's timeline) is shown when the test fails.
    plan = Plan.every_fault(SHORT, times=1, seed=zlib.crc32(b"faults"), drain=60.0, audit_timeout=90.0)
    report = await run(plan, cluster, await asyncio.to_thread(cluster.fresh_database), say=print)
    assert report.injected == Counter(dict.fromkeys(FAULTS, 1))
    assert report.findings.submitted > 0
    assert report.clean, report.table()
