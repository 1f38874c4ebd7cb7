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

# One pgbench transaction = one event through the whole in-order path: the sequencer's lock-free
# key check, its accept transaction, the ledger's apply transaction and the sequencer's outcome
# transaction. The forwarder keeps its lease on a busy entity and gets the queued row from the
# submit itself, so in the steady state no claim, read or release happens per event.
SCRIPT = f"""
\\set k random(1, {ENTITIES_PER_CLIENT})
\\set r random(1, 1000000000000)
-- 1. sequencer SubmitEvent: the replay check without a lock (autocommit), then one transaction:
--    key lock (with the deadline as lock_timeout), key lookup, entity lock, watermark, and one
--    statement that inserts the event, its idempotency record and the NOTIFY.
SELECT caller_id, idempotency_key, method, fingerprint, request, status_code, response,
    transaction_id, created_at, expires_at FROM {SEQ}.idempotency_keys WHERE caller_id = 'bench' AND
    idempotency_key = 'pgb-' || :r AND expires_at > now();
BEGIN;
SELECT t.bound, pg_advisory_xact_lock(hashtextextended('idem:' || 'bench' || ':' || ('pgb-' || :r), 0))
    FROM (SELECT set_config('lock_timeout', '9990ms', true) AS bound) t;
SELECT caller_id, idempotency_key, method, fingerprint, request, status_code, response,
    transaction_id, created_at, expires_at FROM {SEQ}.idempotency_keys WHERE caller_id = 'bench' AND
    idempotency_key = 'pgb-' || :r AND expires_at > now();
SELECT pg_advisory_xact_lock(hashtextextended('seq:' || CAST(2 AS text) || ':' || {ENTITY}, 0));
SELECT watermark, parked_count FROM {SEQ}.entities WHERE entity_type = 2 AND entity_id = {ENTITY}
    \\gset
WITH ins AS (INSERT INTO {SEQ}.events (entity_type, entity_id, sequence, transaction_id, state, event,
    payload_hash, correlation_id, caller_id, idempotency_key, accepted_at, queued_at) VALUES (2,
    {ENTITY}, :watermark + 1, gen_random_uuid(), 2, decode('{EVENT_HEX}', 'hex'),
    sha256(decode('{EVENT_HEX}', 'hex')), md5(random()::text), 'bench', 'pgb-' || :r, now(), now())
    ON CONFLICT DO NOTHING RETURNING transaction_id),
  k AS (INSERT INTO {SEQ}.idempotency_keys (caller_id, idempotency_key, method, fingerprint, request,
    status_code, response, transaction_id, created_at, expires_at) SELECT 'bench', 'pgb-' || :r,
    '/logistics.sequencer.v1.SequencerService/SubmitEvent', sha256(decode('{EVENT_HEX}', 'hex')),
    decode('0a1e{EVENT_HEX}', 'hex'), 0, decode('0a2430', 'hex'), transaction_id, now(), now() +
    interval '48 hours' FROM ins ON CONFLICT (caller_id, idempotency_key) DO UPDATE SET method =
    excluded.method, fingerprint = excluded.fingerprint, request = excluded.request, status_code =
    excluded.status_code, response = excluded.response, transaction_id = excluded.transaction_id,
    created_at = excluded.created_at, expires_at = excluded.expires_at WHERE
    {SEQ}.idempotency_keys.expires_at <= excluded.created_at RETURNING 1)
SELECT (SELECT count(*) FROM k) AS stored, pg_notify('bench_ceiling', '{{"x":"' || ins.transaction_id
    || '","t":2,"e":"' || {ENTITY} || '","s":2}}') FROM ins;
COMMIT;
-- 4. ledger ApplyEvent: entity lock, one read of the version, this MSI's history row and the
--    touched balances, the balance write, then the version CAS and the history row in one.
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended('ledger:' || '2' || ':' || {ENTITY}, 0));
SELECT COALESCE(v.version, 0) AS version, h.sequence AS processed_sequence, h.payload_hash,
    b.location, b.on_hand, b.reserved FROM (SELECT 1) AS one
    LEFT JOIN {LED}.entity_versions v ON v.entity_type = 2 AND v.entity_id = {ENTITY}
    LEFT JOIN {LED}.entity_history h ON h.entity_type = 2 AND h.entity_id = {ENTITY} AND h.sequence =
    :watermark + 1
    LEFT JOIN {LED}.inventory_balances b ON b.sku = {ENTITY} AND b.location = ANY(ARRAY['A']) \\gset
INSERT INTO {LED}.inventory_balances (sku, location, on_hand, reserved, updated_at) VALUES
    ({ENTITY}, 'A', :on_hand + 5, :reserved, now()) ON CONFLICT (sku, location) DO UPDATE SET
    on_hand = excluded.on_hand, reserved = excluded.reserved, updated_at = excluded.updated_at;
WITH advanced AS (INSERT INTO {LED}.entity_versions AS v (entity_type, entity_id, version,
    updated_at) VALUES (2, {ENTITY}, :version + 1, now()) ON CONFLICT (entity_type, entity_id) DO
    UPDATE SET version = EXCLUDED.version, updated_at = EXCLUDED.updated_at WHERE v.version =
    :version RETURNING v.version)
INSERT INTO {LED}.entity_history (entity_type, entity_id, sequence, kind, outcome, reason,
    reason_detail, correlation_id, transaction_id, source, occurred_at, processed_at, payload_hash)
    SELECT 2, {ENTITY}, advanced.version, 'inventory_received', 1, '', '', md5(random()::text),
    gen_random_uuid()::text, 'bench', NULL, now(), sha256(decode('{EVENT_HEX}', 'hex')) FROM
    advanced RETURNING sequence;
COMMIT;
-- 5. sequencer: record the outcome (and its NOTIFY) in one statement, then advance the watermark
--    and renew the lease in another; nothing is parked, so there is nothing to release.
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended('seq:' || CAST(2 AS text) || ':' || {ENTITY}, 0));
SELECT watermark, parked_count FROM {SEQ}.entities WHERE entity_type = 2 AND entity_id = {ENTITY};
WITH done AS (UPDATE {SEQ}.events SET state = 3, reason = NULL, reason_detail = NULL,
    entity_version = :watermark + 1, processed_at = now() WHERE entity_type = 2 AND entity_id =
    {ENTITY} AND sequence = :watermark + 1 AND state = 2 RETURNING transaction_id)
SELECT done.transaction_id, pg_notify('bench_ceiling', json_build_object('x', done.transaction_id,
    't', 2, 'e', {ENTITY}, 's', 3, 'o', 'pgb')::text) FROM done;
UPDATE {SEQ}.entities SET watermark = :watermark + 1, last_outcome = 3, last_outcome_reason = NULL,
    updated_at = now(), parked_count = parked_count - 0, lease_until = CASE WHEN lease_owner = 'pgb'
    THEN now() + interval '30 seconds' ELSE lease_until END WHERE entity_type = 2 AND entity_id =
    {ENTITY};
COMMIT;
"""

TRANSACTIONS_PER_EVENT = 3  # plus the lock-free autocommit key check
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
