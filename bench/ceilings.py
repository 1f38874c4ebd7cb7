"""The database ceiling: pgbench running the statements the sequencer and the ledger run on the
in-order path (the services' own SQL text, read from their modules at import time), at the
pipeline's client count, against the same database.

pgbench works on copies of the tables (`CREATE TABLE ... (LIKE ... INCLUDING ALL)`: same
columns, keys, indexes and checks) and of the sequencer's functions, in schemas of its own, so
the live services never see its rows (their forwarder would otherwise try to forward them).

The statements are taken from sequencer/mailbox.py (the ingress batch), ledger/queries.py (the
ApplyEvents transaction: the sorted advisory locks, LOAD_HEADS, record_events) and
sequencer/queries.py (the outcome step), with only the schema renamed and each parameter turned
into a pgbench variable (or NULL where the service passes None), so a change of the services'
SQL changes this script with it. The values the services build in Python (arrays, and the
ledger's rows as JSON arrays of objects, one per event) come from one SELECT before each
transaction; the keys of each JSON row are checked at import against the record set the
ledger's statement reads, and after the run the ledger's copies must hold every event's history
row (a compare-and-set that never matched would otherwise go unnoticed: pgbench checks nothing).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from bench.database import Database
from ledger import domain as ledger_domain
from ledger import models as ledger_models
from ledger import queries as ledger_sql
from logistics.events.v1 import events_pb2
from logistics.sequencer.v1 import sequencer_pb2
from sequencer import hints, mailbox, states
from sequencer import queries as sequencer_sql
from sequencer.ingress import SUBMIT_METHOD

SEQ = "ceiling_sequencer"
LED = "ceiling_ledger"
# One pgbench transaction: a batch of BATCH in-order submissions, one event each of the
# client's BATCH entities (the next MSI of each), then every event's apply and outcome.
BATCH = 16
CALLER = "bench-ceiling"
CHANNEL = "bench_ceiling"  # a NOTIFY channel nobody listens on
EVENT = bytes.fromhex("0802120a70676220656e7469747918012a0562656e6368a201050a01411005")
KIND = events_pb2.Event.FromString(EVENT).WhichOneof("payload") or ""
REQUEST = sequencer_pb2.SubmitEventRequest(event=events_pb2.Event.FromString(EVENT)).SerializeToString(
    deterministic=True
)
RESPONSE = sequencer_pb2.SubmitEventResponse(
    transaction_id=str(uuid.UUID(int=0)), state=states.QUEUED, correlation_id="0" * 32
).SerializeToString()

# SQLAlchemy's named parameters (ledger, sequencer queries) and psycopg's (mailbox).
_NAMED = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")
_PYFORMAT = re.compile(r"%\((\w+)\)s")


def pgbench_sql(sql: str, schema: str, target: str, values: Mapping[str, str]) -> str:
    """A service's statement as pgbench runs it: `schema.` renamed to `target.`, each parameter
    replaced by `values[name]` (a pgbench variable `:var`, or an SQL literal such as NULL)."""
    pattern = _PYFORMAT if _PYFORMAT.search(sql) else _NAMED

    def parameter(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"no pgbench value for parameter {name!r} of {sql[:60]!r}")
        return values[name]

    renamed = re.sub(rf"\b{schema}\.", f"{target}.", sql)
    return pattern.sub(parameter, renamed)


def _var(*names: str) -> dict[str, str]:
    return {name: f":{name}" for name in names}


def _text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _array(items: list[str]) -> str:
    return f"ARRAY[{', '.join(items)}]::text"


# k is the event's number in the batch (1..BATCH): a literal, or `k` of the JSON rows below.
def _entity(k: int | str) -> str:
    return f"'pgb-' || :client_id || '-' || {k}"


def _tx(k: int | str) -> str:
    # Deterministic, so the event row, its idempotency record and the ledger's history agree.
    return f"md5(:client_id || '-' || {k} || '-' || :seq)::uuid"


KS = range(1, BATCH + 1)
_PAYLOAD = hints.encode(CALLER, [hints.Change(2, f"pgb-@-{k}", states.QUEUED) for k in KS])

CONSTANTS = {
    "row_lock": "false",
    "lock_timeout": "9990ms",
    "queued": str(states.QUEUED),
    "method": SUBMIT_METHOD,
    "channel": CHANNEL,
    "origin": CALLER,
}


def _json_rows(row: Mapping[str, str]) -> str:
    """The JSON array of objects the ledger's repository passes for one record set: one object
    per event of the batch, in request order, each value an SQL expression of k (1..BATCH)."""
    pairs = ", ".join(f"{_text(key)}, {value}" for key, value in row.items())
    return f"(SELECT jsonb_agg(jsonb_build_object({pairs}) ORDER BY k) FROM generate_series(1, {BATCH}) AS k)::text"


_SEQ = "CAST(:seq AS bigint)"
# ledger/repository.py's rows for the batch's inventory_received events (`load_heads`' items,
# `record_events`' moves, history rows and balances): each entity moves from MSI seq - 1 to
# seq, its one balance (location A) to seq x 5 on hand; NULL where the ledger sends None.
LEDGER_ROWS = {
    "items": {
        "n": "k - 1",
        "entity_type": "2",
        "entity_id": _entity("k"),
        "sequence": _SEQ,
        "location_1": "'A'",
        "location_2": "NULL",
        "reservation_id": "NULL",  # inventory_received names no reservation
    },
    "moves": {
        "entity_type": "2",
        "entity_id": _entity("k"),
        "expected": "CAST(:expected AS bigint)",
        "version": _SEQ,
        "updated_at": "now()",
    },
    "history": {
        "entity_type": "2",
        "entity_id": _entity("k"),
        "sequence": _SEQ,
        "kind": _text(KIND),
        "outcome": str(int(ledger_domain.Outcome.APPLIED)),
        "reason": "''",
        "reason_detail": "''",
        "correlation_id": _text("0" * 32),
        "transaction_id": _tx("k"),
        "source": _text("bench"),
        "occurred_at": "NULL",  # the event carries no occurred_at
        "processed_at": "now()",
        "payload_hash": f"'\\x' || encode(sha256(decode('{EVENT.hex()}', 'hex')), 'hex')",
    },
    "balances": {
        "sku": _entity("k"),
        "location": "'A'",
        "on_hand": f"{_SEQ} * 5",
        "reserved": "0",
        "updated_at": "now()",
    },
}

# The batch's parameters, which the services build in Python (the sequencer's arrays, the
# ledger's JSON rows): one statement outside the transactions, with no table access, whose
# columns become the pgbench variables below.
PARAMETERS = ",\n    ".join(
    [
        "now() AS now",
        "now() + interval '48 hours' AS expires_at",
        "now() + interval '30 seconds' AS lease_until",
        "now() - interval '60 seconds' AS hand_over_before",
        f"{_array([_text(CALLER)] * BATCH)} AS callers",
        _array([_entity(k) + " || '-' || :seq" for k in KS]) + " AS keys",
        f"{_array(['2'] * BATCH)} AS types",
        f"{_array([_entity(k) for k in KS])} AS ids",
        f"{_array([':seq'] * BATCH)} AS seqs",
        f"{_array([_tx(k) for k in KS])} AS txs",
        f"{_array([str(states.QUEUED)] * BATCH)} AS states",
        f"array_fill(decode('{EVENT.hex()}', 'hex'), ARRAY[{BATCH}])::text AS events",
        f"array_fill(sha256(decode('{EVENT.hex()}', 'hex')), ARRAY[{BATCH}])::text AS hashes",
        f"{_array([_text('0' * 32)] * BATCH)} AS correlations",
        f"array_fill(sha256(decode('{REQUEST.hex()}', 'hex')), ARRAY[{BATCH}])::text AS fingerprints",
        f"array_fill(decode('{REQUEST.hex()}', 'hex'), ARRAY[{BATCH}])::text AS requests",
        f"array_fill(decode('{RESPONSE.hex()}', 'hex'), ARRAY[{BATCH}])::text AS responses",
        f"replace({_text(_PAYLOAD)}, '@', :client_id::text) AS payload",
        "'{}' AS empty",
        f"array_fill(NULL::text, ARRAY[{BATCH}])::text AS skips",
        f"{_array([str(states.APPLIED)] * BATCH)} AS outcome_states",
        f"{_array([_text('')] * BATCH)} AS blanks",
        # The ledger locks its entities sorted (by id: pgb-c-1, pgb-c-10, ..., pgb-c-9).
        f"{_array([_entity(k) for k in sorted(KS, key=str)])} AS lock_ids",
        *[f"{_json_rows(row)} AS {name}" for name, row in LEDGER_ROWS.items()],
        *[f"{_text(value)} AS {name}" for name, value in CONSTANTS.items()],
    ]
)


# psycopg sends a str untyped and a datetime, bool or int with its type; pgbench sends every
# value untyped, so those parameters carry their type as a cast.
_TYPED = {"now": "timestamptz", "expires_at": "timestamptz", "row_lock": "boolean", "queued": "smallint"}
_BATCH_VALUES = {
    **_var(
        "callers", "keys", "types", "ids", "seqs", "lock_timeout", "txs", "states", "events", "hashes",
        "correlations", "fingerprints", "requests", "responses", "method", "channel", "payload",
    ),
    **{name: f"CAST(:{name} AS {kind})" for name, kind in _TYPED.items()},
    # Every submission of the batch is answered and stored; in order nothing parks, no gap moves.
    "answer_callers": ":callers",
    "answer_keys": ":keys",
    "answer_txs": ":txs",
    "skips": ":skips",  # in-order events, no operator's skip markers
    "traceparents": ":skips",  # and no caller's trace context (NULLs alike)
    **{name: ":empty" for name in (
        "parked_types", "parked_ids", "parked_counts", "gap_types", "gap_ids", "gap_awaiting", "closed_types",
        "closed_ids",
    )},
}  # fmt: skip


def _sequencer(sql: str) -> str:
    return pgbench_sql(sql, "sequencer", SEQ, _BATCH_VALUES)


# The outcome step of the batch, as sequencer/forwarding.py runs it: every outcome in one statement.
_OUTCOME_VALUES = {
    "types": "CAST(:types AS smallint[])",
    "ids": ":ids",
    "sequences": ":seqs",
    "states": ":outcome_states",
    "reasons": ":blanks",
    "details": ":blanks",
    "versions": ":seqs",
    "row_lock": "CAST(:row_lock AS boolean)",
    "now": "CAST(:now AS timestamptz)",
    "owner": ":origin",
    "lease_until": "CAST(:lease_until AS timestamptz)",
    "hand_over_before": "CAST(:hand_over_before AS timestamptz)",
}


# The sequencer's ingress transaction for the batch, as sequencer/ingress.py runs it: BEGIN, the
# locks with the reads (one statement), every write with the one NOTIFY (one statement), COMMIT.
INGRESS = [
    "BEGIN;",
    _sequencer(mailbox.LOCK_SUBMISSIONS) + ";",
    _sequencer(mailbox.WRITE_BATCH) + ";",
    "COMMIT;",
]


# The ledger's ApplyEvents for the batch, as ledger/service.py `_apply_items` runs it (advisory
# strategy, one transaction): BEGIN, every entity's lock in one statement, every item's head in
# one read after the locks, every write (balances, version CAS, history rows) in one statement,
# COMMIT. inventory_received writes balances only, so record_events gets UPSERT_BALANCES alone.
_LEDGER_VALUES = {"entity_types": ":types", "entity_ids": ":lock_ids", **_var(*LEDGER_ROWS)}
_LEDGER_STATEMENTS = [
    ledger_sql.ADVISORY_LOCKS.text,
    ledger_sql.LOAD_HEADS.text,
    ledger_sql.record_events((ledger_sql.UPSERT_BALANCES,)).text,
]


def _ledger(sql: str) -> str:
    return pgbench_sql(sql, "ledger", LED, _LEDGER_VALUES)


def _record_sets(statements: Iterable[str]) -> dict[str, set[str]]:
    """The keys the ledger's statements read from each JSON parameter: the column list of a
    jsonb_to_recordset, the columns of a jsonb_populate_recordset's table."""
    sql = " ".join(statements)
    found = {
        param: {column.split()[0] for column in columns.split(", ")}
        for param, columns in re.findall(r"jsonb_to_recordset\(CAST\(:(\w+) AS jsonb\)\) AS \w+\(([^)]*)\)", sql)
    }
    for table, param in re.findall(r"jsonb_populate_recordset\(NULL::([\w.]+), CAST\(:(\w+) AS jsonb\)\)", sql):
        found[param] = set(ledger_models.metadata.tables[table].c.keys())
    return found


def _check_ledger_rows() -> None:
    """A key the ledger reads but the script leaves out would be NULL, and one it does not read
    would be ignored: either way the script would not run what the ledger runs."""
    expected = _record_sets(_LEDGER_STATEMENTS)
    given = {name: set(row) for name, row in LEDGER_ROWS.items()}
    if given != expected:
        raise RuntimeError(f"the ceiling's ledger rows {given} differ from the ledger's record sets {expected}")


_check_ledger_rows()

# The forwarder's batch: the ledger's ApplyEvents in one transaction, then every outcome recorded
# by the sequencer in one statement (sequencer/forwarding.py).
FORWARD = [
    "BEGIN;",
    *[_ledger(sql) + ";" for sql in _LEDGER_STATEMENTS],
    "COMMIT;",
    pgbench_sql(sequencer_sql.RECORD_OUTCOMES.text, "sequencer", SEQ, _OUTCOME_VALUES) + ";",
]


# pgbench keeps a client's variables from one transaction to the next: `seq` (from -D seq=0)
# counts the batches, and every entity of the client is at MSI seq - 1 when its batch starts.
SCRIPT = "\n".join(
    [
        f"-- Generated by bench/ceilings.py from the services' SQL; one transaction = {BATCH} in-order events.",
        "\\set seq :seq + 1",
        "\\set expected :seq - 1",
        f"SELECT {PARAMETERS}",
        "\\gset",
        "-- 1. sequencer ingress: one group commit for the batch (sequencer/mailbox.py)",
        *INGRESS,
        "-- 2./3. the forwarder's batch: ledger ApplyEvents, sequencer record_outcomes_v1",
        *FORWARD,
    ]
) + "\n"  # fmt: skip


def _check_variables(script: str) -> None:
    """pgbench sends an undefined variable as NULL: every variable used must be set first."""
    defined = {"client_id", "seq", "expected", *re.findall(r" AS (\w+)(?:,|\n\\gset)", script)}
    used = set(re.findall(r"(?<![:\w]):([A-Za-z_]\w*)", script))
    if used - defined:
        raise RuntimeError(f"pgbench variables used but never set: {sorted(used - defined)}")


_check_variables(SCRIPT)


def _transactions(statements: list[str]) -> int:
    """BEGIN ... COMMIT blocks, and statements outside them (each its own transaction)."""
    count, inside = 0, False
    for line in statements:
        if line == "BEGIN;":
            count, inside = count + 1, True
        elif line == "COMMIT;":
            inside = False
        elif not inside:
            count += 1
    return count


# Round trips of the services per batch (BEGIN and COMMIT included; the PARAMETERS select stands
# for the services' Python and is not counted): 4 for the ingress, 5 for ApplyEvents, 1 outcome.
_SERVICE_LINES = [line for line in SCRIPT.splitlines() if line.endswith(";")]
SERVICE_STATEMENTS = len(_SERVICE_LINES)
STATEMENTS_PER_EVENT = round(SERVICE_STATEMENTS / BATCH, 3)
TRANSACTIONS_PER_EVENT = round(_transactions(_SERVICE_LINES) / BATCH, 3)


def _setup(db: Database, clients: int) -> None:
    tables: dict[str, tuple[str, tuple[str, ...]]] = {
        SEQ: ("sequencer", ("entities", "events", "gaps", "idempotency_keys")),
        LED: (
            "ledger",
            ("entity_versions", "entity_history", "inventory_balances", "inventory_reservations", "shipments"),
        ),
    }
    with db.connect() as conn:
        for schema, (source, names) in tables.items():
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.execute(f"CREATE SCHEMA {schema}")
            for name in names:
                conn.execute(f"CREATE TABLE {schema}.{name} (LIKE {source}.{name} INCLUDING ALL)")
        # The sequencer's server-side steps as migrated (lock_submissions_v2 of the ingress,
        # record_outcomes_v1, ...), pointed at the copies and, for those that name it, at a NOTIFY
        # channel nobody listens on, so the live services are never woken by the ceiling.
        definitions = conn.execute(
            "SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'sequencer' ORDER BY p.oid"
        ).fetchall()
        missing = {"lock_submissions_v2", "record_outcomes_v1"} - {name for name, _ in definitions}
        if missing:
            raise RuntimeError(f"the sequencer's schema lacks {sorted(missing)}: not migrated?")
        for _name, definition in definitions:
            copy = re.sub(r"\bsequencer\.", f"{SEQ}.", definition).replace(f"'{hints.CHANNEL}'", f"'{CHANNEL}'")
            conn.execute(copy)
        ids = [f"pgb-{c}-{k}" for c in range(clients) for k in KS]
        conn.execute(
            f"INSERT INTO {SEQ}.entities (entity_type, entity_id, updated_at) "
            "SELECT 2, id, now() FROM unnest(%s::text[]) id",
            (ids,),
        )
        conn.execute(
            f"INSERT INTO {LED}.entity_versions (entity_type, entity_id, version, updated_at) "
            "SELECT 2, id, 0, now() FROM unnest(%s::text[]) id",
            (ids,),
        )
        conn.execute(
            f"INSERT INTO {LED}.inventory_balances (sku, location, on_hand, reserved, updated_at) "
            "SELECT id, 'A', 0, 0, now() FROM unnest(%s::text[]) id",
            (ids,),
        )
        conn.execute(f"ANALYZE {SEQ}.entities")
        conn.execute(f"ANALYZE {LED}.entity_versions")


def _ledger_history(db: Database) -> tuple[int, int]:
    """History rows in the ledger's copy, and the sum of its versions (each entity's MSIs)."""
    with db.connect() as conn:
        row = conn.execute(
            f"SELECT (SELECT count(*) FROM {LED}.entity_history), "
            f"(SELECT COALESCE(sum(version), 0) FROM {LED}.entity_versions)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _teardown(db: Database) -> None:
    with db.connect() as conn:
        for schema in (SEQ, LED):
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def pgbench_ceiling(db: Database, clients: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """events/s pgbench sustains with the in-order path's statements, or why there is none."""
    binary = shutil.which("pgbench")
    result: dict[str, Any] = {
        "clients": clients,
        "statements_per_event": STATEMENTS_PER_EVENT,
        "transactions_per_event": TRANSACTIONS_PER_EVENT,
        "events_per_transaction": BATCH,
    }
    if binary is None:
        return {**result, "available": False, "events_per_s": None, "note": "not available (pgbench not on PATH)"}
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "ceiling.pgbench.sql"
    script.write_text(SCRIPT)
    _setup(db, clients)
    try:
        threads = max(1, min(clients, 2))
        # Pipeline mode needs the extended protocol; psycopg prepares statements after five
        # uses, so in steady state the services run prepared statements too.
        command = [binary, "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads), "-D", "seq=0"]
        # The password goes through the environment, not the command line (visible in `ps`).
        url = make_url(db.libpq_url)
        env = {**os.environ, **({"PGPASSWORD": url.password} if url.password else {})}
        target = url.set(password=None).render_as_string(hide_password=False)
        command += ["-T", str(max(1, round(seconds))), "-f", str(script), target]
        proc = subprocess.run(  # noqa: S603
            command, capture_output=True, text=True, timeout=seconds + 120, check=False, env=env
        )
        history, versions = _ledger_history(db)
    finally:
        _teardown(db)
    (workdir / "pgbench.out").write_text(proc.stdout + proc.stderr)
    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", proc.stdout)
    latency = re.search(r"latency average = ([0-9.]+) ms", proc.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", proc.stdout)
    aborted = "aborted" in proc.stderr or proc.returncode != 0
    processed = re.search(r"number of transactions actually processed: (\d+)", proc.stdout)
    if tps is None or aborted:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**result, "available": False, "events_per_s": None, "note": "pgbench failed: " + " | ".join(tail)}
    # Every batch pgbench counts must have moved its entities and recorded their history, as the
    # ledger does (it rolls back otherwise); pgbench itself checks no statement's result. (A batch
    # cut off by -T after the ledger's COMMIT adds rows pgbench does not count.)
    batches = int(processed.group(1)) if processed else None
    if history != versions or batches is None or history < batches * BATCH:
        note = f"the ledger's statements wrote {history} history rows, {versions} MSIs, for {batches} batches"
        return {**result, "available": False, "events_per_s": None, "note": "pgbench ran wrong: " + note}
    return {
        **result,
        "available": True,
        "events_per_s": round(float(tps.group(1)) * BATCH, 1),
        "transactions_per_s": float(tps.group(1)),
        "latency_ms_avg": float(latency.group(1)) if latency else None,
        "failed_transactions": int(failed.group(1)) if failed else 0,
        "seconds": max(1, round(seconds)),
        "mode": "prepared",
        "note": (
            f"events/s = pgbench tps x {BATCH}: one pgbench transaction is one ingress batch of {BATCH} "
            "in-order submissions, then the forwarder's batch of them: one ledger ApplyEvents transaction "
            "(locks, one read, one write) and one outcome statement; latency_ms_avg is per batch"
        ),
    }
