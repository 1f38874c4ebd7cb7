"""Shared fixtures of the acceptance tests: the services as real subprocesses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.processes import ServiceProcess, start_ledger, start_sequencer


@pytest.fixture
def services(database_url: str) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """A ledger and a sequencer with default settings on one fresh database; (sequencer, ledger)."""
    ledger = start_ledger(database_url)
    try:
        sequencer = start_sequencer(database_url, ledger.port)
        try:
            yield sequencer, ledger
        finally:
            sequencer.terminate()
    finally:
        ledger.terminate()
