"""Validation limits of the contract, one source for both services (an event the sequencer
accepts is one the ledger takes, and the other way round)."""

from __future__ import annotations

import re

MAX_ENTITY_ID = 128
ENTITY_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/#@+-]{1,128}")
MAX_TEXT = 256
MAX_QUANTITY = 1_000_000_000
MAX_PACKAGE_COUNT = 100_000
MAX_SEQUENCE = 2**63 - 1
