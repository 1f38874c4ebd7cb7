"""The database ceiling: pgbench running, per event, the statements the sequencer and ledger
run on the in-order path (read from the services' SQL and checked against a statement log), at
the pipeline's client count, against the same database.

pgbench works on copies of the tables (`CREATE TABLE ... (LIKE ... INCLUDING ALL)`: same
columns, keys, indexes and checks) in schemas of its own, so the live services never see its
rows (their forwarder would otherwise try to forward them).

It mirrors the statements of sequencer/queries.py and ledger/queries.py; when those change,
this script must change with them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from bench.database import Database

SEQ = "ceiling_sequencer"
LED = "ceiling_ledger"
ENTITIES_PER_CLIENT = 20
EVENT_HEX = "0802120a70676220656e7469747918012a0562656e6368a201050a01411005"
ENTITY = "('pgb-' || :client_id || '-' || :k)"

# One pgbench transaction = one event through the whole in-order path: the sequencer's in-order
# submit step, the ledger's apply transaction and the sequencer's outcome step. The forwarder
# keeps its lease on a busy entity and gets the queued row from the submit itself, so in the
# steady state no claim, read or release happens per event.
SCRIPT = f"""
\\set k random(1, {ENTITIES_PER_CLIENT})
\\set r random(1, 1000000000000)
-- 1. sequencer SubmitEvent: one statement, its own transaction (sequencer.submit_in_order): key
--    lock with the deadline as lock_timeout, key lookup, entity lock, watermark, and the event,
--    its idempotency record and the NOTIFY. Each client owns its entities, so reading the next
--    MSI beforehand in the same statement races with nobody.
SELECT s.outcome, w.next AS seq FROM (SELECT watermark + 1 AS next FROM {SEQ}.entities
    WHERE entity_type = 2 AND entity_id = {ENTITY}) w, LATERAL {SEQ}.submit_in_order('bench',
    'pgb-' || :r, '9990ms', false, now(), CAST(2 AS smallint), {ENTITY}, w.next, gen_random_uuid(),
    decode('{EVENT_HEX}', 'hex'), sha256(decode('{EVENT_HEX}', 'hex')), md5(random()::text),
    '/logistics.sequencer.v1.SequencerService/SubmitEvent', sha256(decode('{EVENT_HEX}', 'hex')),
    decode('0a1e{EVENT_HEX}', 'hex'), decode('0a2430', 'hex'), now() + interval '48 hours',
    '{{"x":"00000000-0000-0000-0000-000000000000","t":2,"e":"pgb","s":2}}') s \\gset
-- 2. ledger ApplyEvent: entity lock, one read of the version, this MSI's history row and the
--    touched balances, then one statement for the balance write, the version CAS and the
--    history row.
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended('ledger:' || '2' || ':' || {ENTITY}, 0));
SELECT COALESCE(v.version, 0) AS version, h.sequence AS processed_sequence, h.payload_hash,
    b.location, b.on_hand, b.reserved FROM (SELECT 1) AS one
    LEFT JOIN {LED}.entity_versions v ON v.entity_type = 2 AND v.entity_id = {ENTITY}
    LEFT JOIN {LED}.entity_history h ON h.entity_type = 2 AND h.entity_id = {ENTITY} AND h.sequence =
    :seq
    LEFT JOIN {LED}.inventory_balances b ON b.sku = {ENTITY} AND b.location = ANY(ARRAY['A']) \\gset
WITH w0 AS (INSERT INTO {LED}.inventory_balances (sku, location, on_hand, reserved, updated_at)
    SELECT CAST({ENTITY} AS text), t.location, t.on_hand, t.reserved, now() FROM
    unnest(ARRAY['A'], ARRAY[:on_hand + 5]::bigint[], ARRAY[:reserved]::bigint[]) AS t(location,
    on_hand, reserved) ON CONFLICT (sku, location) DO UPDATE SET on_hand = excluded.on_hand,
    reserved = excluded.reserved, updated_at = excluded.updated_at),
  advanced AS (INSERT INTO {LED}.entity_versions AS v (entity_type, entity_id, version,
    updated_at) VALUES (2, {ENTITY}, :version + 1, now()) ON CONFLICT (entity_type, entity_id) DO
    UPDATE SET version = EXCLUDED.version, updated_at = EXCLUDED.updated_at WHERE v.version =
    :version RETURNING v.version)
INSERT INTO {LED}.entity_history (entity_type, entity_id, sequence, kind, outcome, reason,
    reason_detail, correlation_id, transaction_id, source, occurred_at, processed_at, payload_hash)
    SELECT 2, {ENTITY}, advanced.version, 'inventory_received', 1, '', '', md5(random()::text),
    gen_random_uuid()::text, 'bench', NULL, now(), sha256(decode('{EVENT_HEX}', 'hex')) FROM
    advanced RETURNING sequence;
COMMIT;
-- 3. sequencer: record the outcome in one statement, its own transaction
--    (sequencer.record_outcome): entity lock, terminal state and NOTIFY, watermark advanced and
--    lease renewed; nothing is parked, so there is nothing to release.
SELECT recorded FROM {SEQ}.record_outcome(CAST(2 AS smallint), {ENTITY}, CAST(:seq AS bigint),
    CAST(3 AS smallint), NULL, NULL, CAST(:seq AS bigint), false, now(), 'pgb', 'pgb',
    now() + interval '30 seconds', now() - interval '60 seconds');
"""

TRANSACTIONS_PER_EVENT = 3
STATEMENTS_PER_EVENT = sum(
    1 for line in SCRIPT.splitlines() if line.rstrip().endswith((";", "\\gset")) and not line.startswith("--")
)


def _setup(db: Database, clients: int) -> None:
    tables: dict[str, tuple[str, tuple[str, ...]]] = {
        SEQ: ("sequencer", ("entities", "events", "gaps", "idempotency_keys")),
        LED: ("ledger", ("entity_versions", "entity_history", "inventory_balances")),
    }
    with db.connect() as conn:
        for schema, (source, names) in tables.items():
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.execute(f"CREATE SCHEMA {schema}")
            for name in names:
                conn.execute(f"CREATE TABLE {schema}.{name} (LIKE {source}.{name} INCLUDING ALL)")
        # The sequencer's server-side steps, as migrated, pointed at the copies (and at a NOTIFY
        # channel nobody listens on, so the live services are never woken by the ceiling).
        definitions = conn.execute(
            "SELECT pg_get_functiondef(p.oid) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'sequencer' ORDER BY p.oid"
        ).fetchall()
        for (definition,) in definitions:
            copy = definition.replace("sequencer.", f"{SEQ}.").replace("'sequencer_events'", "'bench_ceiling'")
            conn.execute(copy)
        ids = [f"pgb-{c}-{k}" for c in range(clients) for k in range(1, ENTITIES_PER_CLIENT + 1)]
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
    }
    if binary is None:
        return {**result, "available": False, "events_per_s": None, "note": "not available (pgbench not on PATH)"}
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "ceiling.pgbench.sql"
    script.write_text(SCRIPT.lstrip())
    _setup(db, clients)
    try:
        threads = max(1, min(clients, 2))
        command = [binary, "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads)]
        # The password goes through the environment, not the command line (visible in `ps`).
        url = make_url(db.libpq_url)
        env = {**os.environ, **({"PGPASSWORD": url.password} if url.password else {})}
        target = url.set(password=None).render_as_string(hide_password=False)
        command += ["-T", str(max(1, round(seconds))), "-f", str(script), target]
        proc = subprocess.run(  # noqa: S603
            command, capture_output=True, text=True, timeout=seconds + 120, check=False, env=env
        )
    finally:
        _teardown(db)
    (workdir / "pgbench.out").write_text(proc.stdout + proc.stderr)
    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", proc.stdout)
    latency = re.search(r"latency average = ([0-9.]+) ms", proc.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", proc.stdout)
    aborted = "aborted" in proc.stderr or proc.returncode != 0
    if tps is None or aborted:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**result, "available": False, "events_per_s": None, "note": "pgbench failed: " + " | ".join(tail)}
    return {
        **result,
        "available": True,
        "events_per_s": float(tps.group(1)),
        "latency_ms_avg": float(latency.group(1)) if latency else None,
        "failed_transactions": int(failed.group(1)) if failed else 0,
        "seconds": max(1, round(seconds)),
        "mode": "prepared",
    }
