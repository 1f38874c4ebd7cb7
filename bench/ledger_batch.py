"""A micro-benchmark of the ledger's write path alone: ApplyEvents batches and single ApplyEvent
calls over real gRPC, against a ledger subprocess on a fresh database.

    python -m bench.ledger_batch [--calls N] [--callers N] [--lock-strategy row] [--profile DIR]

Cases (each caller works on entities of its own, so callers never wait for each other's locks):

- inventory_64x1: 64 SKUs, one event each per call (a receipt, then a move, alternately)
- shipment_64x1:  64 shipments, one event each per call (their lifecycle, then new shipments)
- chains_8x16:    8 SKUs, 16 consecutive events each per call
- single:         inventory_64x1's events, one ApplyEvent per event

For each: events/s, and CPU per event of the ledger process (/proc/<pid>/stat utime + stime) and
of its PostgreSQL backends (same machine only). With --profile, py-spy samples the ledger during
each case and the hottest functions are printed (and the raw stacks kept in DIR).

The ledger runs as the full benchmark runs it (bench.processes), with the bench's shipment chain.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
from sqlalchemy.engine import make_url

from bench import processes
from bench.model import SHIPMENT_CHAIN
from logistics.events.v1 import events_pb2
from logistics.ledger.v1 import ledger_pb2, ledger_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
PYTHONPATH = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")])
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TIMEOUT = 60.0

Requests = list[ledger_pb2.ApplyEventRequest]


# --- processes and /proc ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it is gone)."""
    return processes.cpu_seconds(pid) or 0.0


def _service_url(url: str, database: str) -> str:
    return make_url(url).set(drivername="postgresql+psycopg", database=database).render_as_string(False)


def libpq(url: str, database: str | None = None) -> str:
    u = make_url(url).set(drivername="postgresql")
    if database is not None:
        u = u.set(database=database)
    return u.render_as_string(hide_password=False)


class Profiler:
    """py-spy sampling one process for the duration of a case (stopped with SIGINT, which makes
    it write its output)."""

    def __init__(self, pid: int, out: Path) -> None:
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if spy is None:
            raise SystemExit("py-spy not found: pip install py-spy into the virtualenv")
        self.out = out
        self.proc = subprocess.Popen(  # noqa: S603 - the profiler found beside our interpreter
            [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "-o", str(out)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# Frames every sample has (the interpreter's start-up, the event loop's dispatch): not news.
_GENERIC = ("runpy", "asyncio/runners.py", "asyncio/base_events.py", "asyncio/events.py", "__main__.py")


def _frame(text: str) -> tuple[str, str]:
    """(function, file) of one py-spy raw frame, `name (path/file.py:line)`."""
    name, _, where = text.rpartition(" (")
    return name, where.rsplit(":", 1)[0]


def _area(path: str) -> str:
    for area in ("psycopg", "sqlalchemy", "grpc", "google/protobuf", "asyncio", "logging", "json", "prometheus"):
        if f"{area}/" in path or path.startswith(area):
            return area
    for area in ("ledger/", "common/"):
        if path.startswith(area) or f"/{area}" in path:
            return area.rstrip("/")
    return "other"


def profile_summary(raw: Path, top: int = 30) -> list[str]:
    """Self time by library and the most-sampled functions (inclusive, self) of py-spy's raw
    output, in percent of the event loop thread's samples (the other threads, grpc's poller
    and the metrics server, mostly sleep; py-spy does not always see that)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if "asyncio/base_events.py" not in stack:
            continue
        frames = [_frame(f) for f in stack.split(";")]
        total += count
        for name, path in set(frames):
            if not any(g in path for g in _GENERIC):
                inclusive[f"{name} ({path})"] += count
        name, path = frames[-1]
        own[f"{name} ({path})"] += count
        areas[_area(path)] += count
    if total == 0:
        return []
    lines = ["self time by area: " + ", ".join(f"{a} {100 * n / total:.0f}%" for a, n in areas.most_common())]
    lines += [f"{100 * n / total:6.1f} {100 * own[f] / total:6.1f}  {f}" for f, n in inclusive.most_common(top)]
    return lines


# --- workloads -------------------------------------------------------------------------------------


def _event(entity_type: events_pb2.EntityType.ValueType, entity_id: str, sequence: int) -> events_pb2.Event:
    return events_pb2.Event(entity_type=entity_type, entity_id=entity_id, sequence=sequence, source="bench")


def inventory_request(sku: str, sequence: int) -> ledger_pb2.ApplyEventRequest:
    """Odd MSIs receive 5 at A, even ones move 1 from A to B: one and two locations touched."""
    event = _event(events_pb2.ENTITY_TYPE_INVENTORY_ITEM, sku, sequence)
    if sequence % 2:
        event.inventory_received.CopyFrom(events_pb2.InventoryReceived(location="A", quantity=5))
    else:
        event.inventory_moved.CopyFrom(events_pb2.InventoryMoved(from_location="A", to_location="B", quantity=1))
    return ledger_pb2.ApplyEventRequest(event=event, correlation_id=f"c-{sku}-{sequence}", transaction_id="bench")


def shipment_request(shipment_id: str, sequence: int) -> ledger_pb2.ApplyEventRequest:
    event = _event(events_pb2.ENTITY_TYPE_SHIPMENT, shipment_id, sequence)
    kind = SHIPMENT_CHAIN[sequence - 1]
    payload = getattr(event, kind)
    match kind:
        case "shipment_created":
            payload.order_id, payload.origin, payload.destination = "ORD-1", "AMS", "BER"
        case "shipment_picked":
            payload.warehouse_id = "WH-1"
        case "shipment_packed":
            payload.package_count = 3
        case "shipment_loaded":
            payload.vehicle_id = "TRUCK-7"
        case "shipment_shipped":
            payload.carrier, payload.tracking_number = "DHL", "TRK-1"
        case _:
            payload.received_by = "front desk"
    return ledger_pb2.ApplyEventRequest(
        event=event, correlation_id=f"c-{shipment_id}-{sequence}", transaction_id="bench"
    )


def inventory_64x1(prefix: str, calls: int) -> Iterator[Requests]:
    for call in range(calls):
        yield [inventory_request(f"{prefix}-{n}", call + 1) for n in range(64)]


def shipment_64x1(prefix: str, calls: int) -> Iterator[Requests]:
    steps = len(SHIPMENT_CHAIN)
    for call in range(calls):
        generation, step = divmod(call, steps)
        yield [shipment_request(f"{prefix}-{generation}-{n}", step + 1) for n in range(64)]


def chains_8x16(prefix: str, calls: int) -> Iterator[Requests]:
    for call in range(calls):
        yield [inventory_request(f"{prefix}-{n}", call * 16 + i) for n in range(8) for i in range(1, 17)]


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[str, int], Iterator[Requests]]
    batched: bool


CASES = (
    Case("inventory_64x1", inventory_64x1, batched=True),
    Case("shipment_64x1", shipment_64x1, batched=True),
    Case("chains_8x16", chains_8x16, batched=True),
    Case("single", inventory_64x1, batched=False),
)


async def run_caller(stub: Any, batches: list[Requests], batched: bool) -> int:
    """Sends the batches in order (one ApplyEvents each, or one ApplyEvent per event); checks
    every answer is APPLIED so a broken run cannot pass for a fast one."""
    applied = 0
    for requests in batches:
        if batched:
            reply = await stub.ApplyEvents(ledger_pb2.ApplyEventsRequest(requests=requests), timeout=TIMEOUT)
            responses = list(reply.responses)
        else:
            responses = [await stub.ApplyEvent(r, timeout=TIMEOUT) for r in requests]
        bad = [r for r in responses if r.outcome != ledger_pb2.APPLY_OUTCOME_APPLIED]
        if bad:
            raise RuntimeError(f"unexpected answer: {bad[0]}")
        applied += len(responses)
    return applied


def backend_pids(admin: psycopg.Connection[Any], database: str) -> list[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = 'ledger'", (database,)
    ).fetchall()
    return [int(r[0]) for r in rows]


async def run_case(
    case: Case,
    ledger: processes.Service,
    admin: psycopg.Connection[Any],
    database: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    callers = args.callers if case.batched else args.single_callers
    calls = args.calls if case.batched else max(1, args.calls // 4)
    run = uuid.uuid4().hex[:6]
    # Built before the clock starts: the client's protobuf work is not the ledger's.
    work = [list(case.make(f"{case.name}-{run}-{c}", calls)) for c in range(callers)]
    warm = list(case.make(f"{case.name}-{run}-warm", 2))
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{ledger.port}") for _ in range(min(callers, 8))]
    try:
        stubs = [ledger_pb2_grpc.LedgerServiceStub(ch) for ch in channels]
        # Warm-up: statements prepared, connections open, code paths imported.
        await run_caller(stubs[0], warm, case.batched)
        profiler = Profiler(ledger.pid, args.profile / f"{case.name}.txt") if args.profile else None
        before_pids = backend_pids(admin, database)
        before_backends = {pid: cpu_seconds(pid) for pid in before_pids}
        before = cpu_seconds(ledger.pid)
        started = time.perf_counter()
        counts = await asyncio.gather(
            *(run_caller(stubs[i % len(stubs)], work[i], case.batched) for i in range(callers))
        )
        elapsed = time.perf_counter() - started
        ledger_cpu = cpu_seconds(ledger.pid) - before
        after_pids = backend_pids(admin, database)
        backend_cpu = sum(cpu_seconds(pid) - before_backends.get(pid, 0.0) for pid in after_pids)
        if profiler is not None:
            profiler.stop()
    finally:
        for ch in channels:
            await ch.close()
    events = sum(counts)
    return {
        "case": case.name,
        "callers": callers,
        "events": events,
        "seconds": elapsed,
        "events_per_s": events / elapsed,
        "ledger_cpu_ms_per_event": 1000 * ledger_cpu / events,
        "pg_cpu_ms_per_event": 1000 * backend_cpu / events,
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger_batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=24, help="batch calls per caller and case (default 24)")
    parser.add_argument("--callers", type=int, default=4, help="concurrent batch callers (default 4)")
    parser.add_argument("--single-callers", type=int, default=32, help="concurrent ApplyEvent callers (default 32)")
    parser.add_argument("--lock-strategy", choices=("advisory", "row"), default="advisory")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated case names")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy each case, raw stacks into this folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, url: str, database: str) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "DATABASE_URL": _service_url(url, database)}
    log_dir = Path(tempfile.mkdtemp(prefix=f"{database}_"))
    ledger = processes.Service(
        "ledger",
        {
            **env,
            "LEDGER_LISTEN_ADDR": "127.0.0.1:0",
            "LEDGER_METRICS_ADDR": "127.0.0.1:0",
            "LEDGER_LOCK_STRATEGY": args.lock_strategy,
        },
        log_dir / "ledger.log",
    )
    ledger.start()
    results = []
    try:
        with psycopg.connect(libpq(url), autocommit=True) as admin:
            for case in CASES:
                if case.name in args.cases.split(","):
                    results.append(await run_case(case, ledger, admin, database, args))
                    print(render_row(results[-1]), flush=True)
    finally:
        ledger.stop()
    return results


HEADER = f"{'case':<16}{'callers':>8}{'events':>8}{'events/s':>10}{'ledger ms/ev':>14}{'pg ms/ev':>10}"


def render_row(r: dict[str, Any]) -> str:
    return (
        f"{r['case']:<16}{r['callers']:>8}{r['events']:>8}{r['events_per_s']:>10.0f}"
        f"{r['ledger_cpu_ms_per_event']:>14.3f}{r['pg_cpu_ms_per_event']:>10.3f}"
    )


def migrate(url: str, database: str) -> None:
    """`python -m ledger migrate` against the fresh database, as an operator runs it."""
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "DATABASE_URL": _service_url(url, database)}
    subprocess.run([sys.executable, "-m", "ledger", "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    url = os.environ.get("DATABASE_URL", "").strip() or DEFAULT_URL
    database = f"ledger_batch_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq(url), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    try:
        migrate(url, database)
        print(f"lock strategy {args.lock_strategy}, database {database}")
        print(HEADER, flush=True)
        results = asyncio.run(run(args, url, database))
    finally:
        with psycopg.connect(libpq(url), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.profile:
        for r in results:
            print(f"\n{r['case']}: hottest functions of the ledger (inclusive %, self %)")
            print("\n".join(profile_summary(args.profile / f"{r['case']}.txt")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
