"""Orchestrates one benchmark run: system up, workloads with audits, ceilings, report."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import audit as audits
from bench import report, soak
from bench.ceilings import pgbench_ceiling
from bench.database import Database, provision, server_settings
from bench.processes import ROOT, EchoServer, Service, backend_cpu_seconds, child_env, cpu_seconds, peak_rss_mb
from logistics.events.v1 import events_pb2

PARKED = int(events_pb2.EVENT_STATE_PARKED)
#: SPEC 10's ingress targets: acknowledged events/s as a share of the echo ceiling's calls/s.
INGRESS_TARGETS = {"batch": 1.5, "in_order": 0.45}
#: SPEC 10's applied targets: applied events/s as a share of the echo's calls/s, and the
#: submit-to-applied p99 (what a caller waits until its event is in the ledger).
APPLIED_TARGETS = {"in_order": 0.40, "out_of_order": 0.30, "hot_set": 0.30}
S2A_P99_TARGETS_MS = {"in_order": 150.0}
#: A soak without --rate offers this share of what a short flat-out in_order probe applied:
#: steady load the pipeline keeps up with, so memory is measured at work, not in overload.
SOAK_LOAD_SHARE = 0.5
SOAK_PROBE_SECONDS = 10.0
WORKLOADS = ("in_order", "batch", "hot_set", "out_of_order", "retries", "duplicate_storm", "overload")
#: The overload workload offers this multiple of the sustainable load (SPEC 12): the in_order
#: applied/s of this run, or of a short probe when in_order does not run.
OVERLOAD_FACTOR = 10.0
OVERLOAD_PROBE_SECONDS = 5.0
PREFIXES = {
    "warmup": "wu",
    "in_order": "io",
    "batch": "ba",
    "hot_set": "hs",
    "out_of_order": "oo",
    "retries": "rt",
    "duplicate_storm": "ds",
    "overload": "ov",
    "soak": "sk",
}


@dataclass(frozen=True)
class Plan:
    duration: float
    concurrency: int
    entities: int
    workloads: tuple[str, ...]
    json_path: Path
    smoke: bool
    warmup: float
    echo_seconds: float
    pgbench_seconds: float
    storm_rounds: int
    drain_timeout: float
    service_env: dict[str, str]
    soak: bool = False
    soak_warmup: float = 0.0
    rate: float | None = None
    sample_interval: float = 5.0
    overload_rate: float | None = None

    def seconds(self, workload: str) -> float:
        share = {
            "in_order": 1.0,
            "batch": 0.5,
            "hot_set": 0.6,
            "out_of_order": 0.75,
            "retries": 0.75,
            "overload": 0.5,
        }.get(workload, 1.0)
        if self.smoke and workload == "batch":
            # One call or two per caller (100 events each): enough to check the path, and the
            # backlog it leaves drains in seconds.
            share = 0.2
        return round(self.duration * share, 2)


def parse(argv: list[str]) -> Plan:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, tiny numbers: checks the harness only")
    parser.add_argument(
        "--soak",
        action="store_true",
        help="steady mixed load for --duration seconds (default 600), RSS of each service sampled throughout",
    )
    parser.add_argument(
        "--duration", type=float, help="seconds of load for in_order (others scale from it); with --soak, of the soak"
    )
    parser.add_argument(
        "--soak-warmup", type=float, help="soak: seconds before the RSS baseline (default 60, or duration/5 if less)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        help=f"soak: events/s offered (default: {SOAK_LOAD_SHARE:.0%} of a {SOAK_PROBE_SECONDS:g} s in_order probe)",
    )
    parser.add_argument("--sample-interval", type=float, help="soak: seconds between RSS samples (default 5)")
    parser.add_argument(
        "--overload-rate",
        type=float,
        help=f"overload: events/s offered, open loop (default {OVERLOAD_FACTOR:g} x the in_order applied/s)",
    )
    parser.add_argument("--concurrency", type=int, help="concurrent callers (default 64; smoke 8)")
    parser.add_argument("--workloads", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--entities", type=int, help="entities of the stream workloads (default 1000)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "report.json", help="report path")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for both services, e.g. SEQUENCER_DB_POOL_SIZE=20 (repeatable)",
    )
    args = parser.parse_args(argv)
    workloads = tuple(w.strip() for w in (args.workloads or ",".join(WORKLOADS)).split(",") if w.strip())
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    env = {}
    for item in args.service_env:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--service-env wants NAME=VALUE, not {item!r}")
        env[name] = value
    smoke = bool(args.smoke)
    if args.soak and (args.smoke or args.workloads):
        parser.error("--soak runs its own mix: no --smoke, no --workloads")
    if not args.soak and (args.rate or args.soak_warmup is not None or args.sample_interval):
        parser.error("--rate, --soak-warmup and --sample-interval belong to --soak")
    default_duration = 600.0 if args.soak else (1.5 if smoke else 8.0)
    duration = args.duration if args.duration is not None else default_duration
    if duration <= 0 or (args.rate is not None and args.rate <= 0) or (args.sample_interval or 1) <= 0:
        parser.error("--duration, --rate and --sample-interval must be positive")
    if args.overload_rate is not None and args.overload_rate <= 0:
        parser.error("--overload-rate must be positive")
    return Plan(
        duration=duration,
        concurrency=args.concurrency or (8 if smoke else 64),
        entities=args.entities or (40 if smoke else 1000),
        workloads=workloads,
        json_path=args.json,
        smoke=smoke,
        warmup=0.0 if smoke else 2.0,
        echo_seconds=1.0 if smoke else max(2.0, round(duration * 0.6, 1)),
        pgbench_seconds=1.0 if smoke else duration,
        storm_rounds=2 if smoke else 10,
        drain_timeout=30.0 if smoke else 120.0,
        service_env=env,
        soak=bool(args.soak),
        soak_warmup=args.soak_warmup if args.soak_warmup is not None else soak.default_warmup(duration),
        rate=args.rate,
        sample_interval=args.sample_interval or 5.0,
        overload_rate=args.overload_rate,
    )


class Bench:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.out = plan.json_path.parent
        self.work = self.out / "work"
        self.db: Database | None = None
        self.ledger: Service | None = None
        self.sequencer: Service | None = None

    # --- system -----------------------------------------------------------------------------

    def start(self) -> None:
        self.db = provision()
        env = {"DATABASE_URL": self.db.url, **self.plan.service_env}
        self.ledger = Service(
            "ledger",
            {**env, "LEDGER_LISTEN_ADDR": "127.0.0.1:0", "LEDGER_METRICS_ADDR": "127.0.0.1:0"},
            self.out / "logs" / "ledger.log",
        ).start()
        self.sequencer = Service(
            "sequencer",
            {
                **env,
                "SEQUENCER_LISTEN_ADDR": "127.0.0.1:0",
                "SEQUENCER_METRICS_ADDR": "127.0.0.1:0",
                "SEQUENCER_HTTP_ADDR": "127.0.0.1:0",
                "SEQUENCER_LEDGER_TARGET": self.ledger.address,
            },
            self.out / "logs" / "sequencer.log",
        ).start()

    def stop(self) -> None:
        for service in (self.sequencer, self.ledger):
            if service is not None:
                service.stop()
        if self.db is not None:
            self.db.drop()
            self.db = None

    # --- load -------------------------------------------------------------------------------

    def loadgen(self, spec: dict[str, Any], sampler: soak.Sampler | None = None) -> dict[str, Any]:
        """Runs the load generator to its end; a sampler, if given, samples every
        `sample_interval` seconds meanwhile (from here: the load generator has its own work)."""
        self.work.mkdir(parents=True, exist_ok=True)
        spec_path = self.work / f"{spec['workload']}.spec.json"
        out_path = self.work / f"{spec['workload']}.result.json"
        spec_path.write_text(json.dumps(spec))
        limit = float(spec.get("duration", 0)) * 3 + float(spec.get("replay_seconds", 0)) + 120
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "bench.loadgen", str(spec_path), str(out_path)],
            env=child_env(),
            cwd=ROOT,
        )
        deadline = time.monotonic() + limit
        tick = time.monotonic()
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the load generator for {spec['workload']} ran past {limit:.0f} s")
                if sampler is not None and time.monotonic() >= tick:
                    sampler.sample()
                    # On a fixed schedule, not interval after each sample, so samples do not drift.
                    tick += self.plan.sample_interval
                wait = 0.5 if sampler is None else max(0.0, min(0.5, tick - time.monotonic()))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"the load generator failed for {spec['workload']} (exit {proc.returncode})")
        result: dict[str, Any] = json.loads(out_path.read_text())
        out_path.unlink()
        return result

    def drain(self, prefix: str, expected: int) -> tuple[float, int]:
        """Waits until the workload's events are all terminal; returns (seconds waited, terminal)."""
        assert self.db is not None
        started = time.monotonic()
        terminal = 0
        while time.monotonic() - started < self.plan.drain_timeout:
            terminal, _total = audits.pending(self.db, prefix)
            if terminal >= expected:
                break
            time.sleep(0.05)
        return time.monotonic() - started, terminal

    def backend_pids(self) -> list[int]:
        """The backends connected to the run's database, this query's own left out."""
        assert self.db is not None
        with self.db.connect() as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        return [int(r[0]) for r in rows]

    def backends(self) -> dict[int, float]:
        """CPU used so far by each backend connected to the run's database."""
        return backend_cpu_seconds(self.backend_pids())

    def snapshot(self) -> dict[str, Any]:
        assert self.sequencer is not None and self.ledger is not None
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "sequencer": cpu_seconds(self.sequencer.pid) or 0.0,
            "ledger": cpu_seconds(self.ledger.pid) or 0.0,
            "loadgen": children.ru_utime + children.ru_stime,
            "backends": self.backends(),
            "wall": time.monotonic(),
        }

    def spec(self, name: str, seconds: float | None = None) -> dict[str, Any]:
        assert self.sequencer is not None
        if seconds is None:
            seconds = self.plan.warmup if name == "warmup" else self.plan.seconds(name)
        return {
            "workload": name,
            "target": self.sequencer.address,
            "concurrency": self.plan.concurrency,
            "duration": seconds,
            "entities": self.plan.entities,
            "seed": 20241124 + len(name),
            "prefix": PREFIXES[name],
            "storm_rounds": self.plan.storm_rounds,
            "storm_callers": 100,
            "replay_seconds": round(self.plan.duration * 0.4, 2) if name == "retries" else 0,
        }

    def run_workload(self, name: str, seconds: float | None = None, **extra: Any) -> dict[str, Any]:
        assert self.db is not None and self.sequencer is not None and self.ledger is not None
        prefix = PREFIXES[name]
        spec = {**self.spec(name, seconds), **extra}
        before = self.snapshot()
        result = self.loadgen(spec)
        first = audits.accepted(result)
        drain_s, _terminal = self.drain(prefix, len(first))
        after = self.snapshot()
        rows = audits.sequencer_rows(self.db, prefix)
        audit = audits.run_audit(self.db, prefix, result, rows)
        if "overload" in result:
            audits.overload_audit(audit, result["overload"])
        return self.summarise(name, spec, result, first, rows, audit, drain_s, before, after)

    def overload_rate(self, rows: list[dict[str, Any]]) -> tuple[float, str]:
        """Ten times the sustainable load: --overload-rate, else the in_order applied/s of this
        run, else of a short in_order probe."""
        if self.plan.overload_rate is not None:
            return self.plan.overload_rate, "--overload-rate"
        probe = next((r for r in rows if r["workload"] == "in_order"), None)
        if probe is None:
            seconds = min(OVERLOAD_PROBE_SECONDS, self.plan.duration)
            probe = self.run_workload("in_order", seconds=seconds)
            rows.append(probe)
        if not probe["applied_per_s"]:
            raise RuntimeError(f"the in_order run applied nothing: {probe['details']['audit']}")
        rate = round(probe["applied_per_s"] * OVERLOAD_FACTOR)
        return rate, f"{OVERLOAD_FACTOR:g} x in_order's {probe['applied_per_s']} applied/s"

    def summarise(
        self,
        name: str,
        spec: dict[str, Any],
        result: dict[str, Any],
        first: dict[tuple[int, int], list[Any]],
        rows: dict[tuple[str, int], Any],
        audit: audits.Audit,
        drain_s: float,
        before: dict[str, Any],
        after: dict[str, Any],
    ) -> dict[str, Any]:
        assert self.sequencer is not None and self.ledger is not None
        requests = result["requests"]
        entities = result["entities"]
        answered = [r for r in requests if not r[7] and r[8] not in ("replay", "late")]
        creating = [r for r in first.values()]
        # Ack latency is per call (a SubmitEvents call acknowledges all its items at once);
        # calls: [sent_at, latency, items, answered items, phase]. Overload's late re-sends are
        # not load-phase answers.
        calls = [c for c in result["calls"] if c[4] not in ("replay", "late")]
        ack = [c[1] for c in calls if c[3]]
        replay_records = [r for r in requests if r[6] and not r[7]]
        burst = [r for r in requests if r[8] == "replay" and not r[7]]
        s2a: list[float] = []
        processed: list[float] = []
        for (index, sequence), record in first.items():
            row = rows.get((entities[index][1], sequence))
            if row is not None and row[2] is not None:
                processed.append(row[2])
                s2a.append(max(0.0, row[2] - record[3]))
        started = min((r[3] for r in requests), default=result["started_wall"])
        window = (max(processed) - started) if processed else None
        applied_count = len(processed)
        elapsed = float(result.get("replay_burst", {}).get("elapsed") or 0.0)
        storm = result.get("storm")
        if storm:
            replays_per_s = report.rate(len(replay_records), storm["elapsed"])
        elif burst:
            replays_per_s = report.rate(len(burst), elapsed)
        else:
            replays_per_s = None
        parked = sum(1 for r in creating if r[5] == PARKED)
        cpu_wall = after["wall"] - before["wall"]
        # Backends connected at the end; one that connected meanwhile counts from zero, one that
        # left meanwhile is missed (pools keep theirs, so this is close).
        after["postgres"] = sum(cpu - before["backends"].get(pid, 0.0) for pid, cpu in after["backends"].items())
        before["postgres"] = 0.0
        cpu = {
            k: round((after[k] - before[k]) / cpu_wall * 100, 1) for k in ("sequencer", "ledger", "loadgen", "postgres")
        }

        ack_summary = report.latency_summary(ack)
        s2a_summary = report.latency_summary(s2a)
        return {
            "workload": name,
            "events": len(first),
            "calls": len(calls),
            "calls_per_s": report.rate(len(calls), result["elapsed"]),
            "submitted_per_s": report.rate(len(answered), result["elapsed"]),
            "applied_per_s": report.rate(applied_count, window),
            "ack_p50_ms": ack_summary["p50_ms"],
            "ack_p99_ms": ack_summary["p99_ms"],
            "s2a_p50_ms": s2a_summary["p50_ms"],
            "s2a_p99_ms": s2a_summary["p99_ms"],
            "replays_per_s": replays_per_s,
            "errors": sum(report.errors_by_code(requests).values()),
            "sequencer_peak_rss_mb": _round(peak_rss_mb(self.sequencer.pid)),
            "ledger_peak_rss_mb": _round(peak_rss_mb(self.ledger.pid)),
            "audit": "PASS" if audit.passed else "FAIL",
            "overload": overload_section(result, ack_summary),
            "details": {
                "concurrency": spec["concurrency"],
                "storm_callers": spec["storm_callers"] if name == "duplicate_storm" else None,
                "items_per_call": round(sum(c[2] for c in calls) / len(calls), 1) if calls else None,
                "submit_seconds": round(result["elapsed"], 3),
                "drain_seconds_after_submit": round(drain_s, 3),
                "applied_window_seconds": round(window, 3) if window else None,
                "ack_latency": ack_summary,
                "submit_to_applied_latency": s2a_summary,
                "replay_latency": report.latency_summary([r[4] for r in replay_records]),
                "replays": len(replay_records),
                "replay_burst_waited_for_drain_seconds": result.get("replay_burst", {}).get("drain_wait"),
                "parked_on_arrival": parked,
                "parked_fraction": round(parked / len(creating), 3) if creating else None,
                "transient_retries": result.get("retried", 0),
                "errors_by_code": report.errors_by_code(requests),
                "cpu_percent_of_one_core": cpu,
                "cpu_ms_per_event": {
                    k: round((after[k] - before[k]) * 1000 / len(first), 2)
                    for k in ("sequencer", "ledger", "loadgen", "postgres")
                }
                if first
                else None,
                "loadgen_peak_rss_mb": _round(result.get("loadgen_peak_rss_mb")),
                "audit": audit.as_dict(),
            },
        }

    # --- ceilings ---------------------------------------------------------------------------

    def echo_ceiling(self) -> dict[str, Any]:
        server = EchoServer().start()
        try:
            result = self.loadgen(
                {
                    "workload": "echo",
                    "target": f"127.0.0.1:{server.port}",
                    "concurrency": self.plan.concurrency,
                    "duration": self.plan.echo_seconds,
                }
            )
            server_rss = peak_rss_mb(server.pid)
        finally:
            server.stop()
        latencies = result["latencies"]
        summary = report.latency_summary(latencies)
        return {
            "requests_per_s": report.rate(len(latencies), result["elapsed"]),
            "concurrency": self.plan.concurrency,
            "seconds": round(result["elapsed"], 2),
            "p50_ms": summary["p50_ms"],
            "p99_ms": summary["p99_ms"],
            "errors": result["errors"],
            "server_peak_rss_mb": _round(server_rss),
        }

    # --- the run ----------------------------------------------------------------------------

    def begin(self) -> None:
        """The system up (database, services), named in one line, and the warm-up."""
        self.start()
        assert self.db is not None and self.sequencer is not None and self.ledger is not None
        print(
            f"database: {self.db.where}, {self.db.name}; "
            f"sequencer pid {self.sequencer.pid}, ledger pid {self.ledger.pid}",
            flush=True,
        )
        if self.plan.warmup > 0:
            self.run_workload("warmup")

    def run(self) -> dict[str, Any]:
        plan = self.plan
        started = time.monotonic()
        self.begin()
        assert self.db is not None
        rows: list[dict[str, Any]] = []
        for name in plan.workloads:
            if name == "overload":
                rate, source = self.overload_rate(rows)
                print(f"overload: offering {rate:g} events/s open loop ({source})", flush=True)
                row = self.run_workload(name, rate=rate)
                row["overload"]["rate_source"] = source
            else:
                row = self.run_workload(name)
            rows.append(row)
            problems = row["details"]["audit"]["problems"]
            print(
                f"{name}: {row['audit']} ({row['events']} events, {row['submitted_per_s']} submitted/s, "
                f"{row['applied_per_s']} applied/s)" + ("".join(f"\n  - {p}" for p in problems)),
                flush=True,
            )
        echo = self.echo_ceiling()
        print(f"echo ceiling: {echo['requests_per_s']} requests/s", flush=True)
        pg = pgbench_ceiling(self.db, plan.concurrency, plan.pgbench_seconds, self.work)
        print(f"database ceiling: {pg.get('events_per_s') or pg.get('note')}", flush=True)
        pg_settings = server_settings(self.db)
        for row in rows:
            # A storm applies one event per round: its applied/s measures nothing worth a ratio.
            storm = row["workload"] == "duplicate_storm"
            row["applied_vs_pgbench"] = None if storm else report.ratio(row["applied_per_s"], pg.get("events_per_s"))
            row["applied_vs_echo"] = None if storm else report.ratio(row["applied_per_s"], echo["requests_per_s"])
            row["replays_vs_echo"] = report.ratio(row["replays_per_s"], echo["requests_per_s"])
            # Ingress apart from applied: acknowledged events/s against the echo's calls/s.
            row["submitted_vs_echo"] = None if storm else report.ratio(row["submitted_per_s"], echo["requests_per_s"])
            row["ingress_target"] = ingress_target(row["workload"], row["submitted_vs_echo"])
            row["applied_targets"] = applied_targets(row["workload"], row["applied_vs_echo"], row["s2a_p99_ms"])
        targets = [
            {"workload": row["workload"], **t}
            for row in rows
            for t in ([row["ingress_target"]] if row["ingress_target"] else []) + row["applied_targets"]
        ]
        return {
            "schema": 1,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "mode": "smoke" if plan.smoke else "default",
            "machine": self.machine(pg_settings),
            "settings": {
                "concurrency": plan.concurrency,
                "duration": plan.duration,
                "entities": plan.entities,
                "workloads": list(plan.workloads),
                "service_env": plan.service_env,
            },
            "ceilings": {"echo": echo, "pgbench": pg},
            "workloads": {row["workload"]: row for row in rows},
            # Targets are reported, never part of the exit status: the audits are.
            "targets": targets,
            "all_passed": all(row["audit"] == "PASS" for row in rows),
            "wall_seconds": round(time.monotonic() - started, 1),
        }

    def machine(self, pg_settings: dict[str, str]) -> dict[str, Any]:
        assert self.db is not None
        return {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "postgres": pg_settings,
            "database": self.db.where,
        }

    # --- the soak ---------------------------------------------------------------------------

    def run_soak(self) -> dict[str, Any]:
        """A steady mixed load for the plan's duration with RSS sampled throughout, then the
        drain and the same exactness audit as every workload, over everything it submitted."""
        plan = self.plan
        started = time.monotonic()
        self.begin()
        assert self.db is not None and self.sequencer is not None and self.ledger is not None
        rows = []
        if plan.rate is not None:
            rate, source = plan.rate, "--rate"
        else:
            probe = self.run_workload("in_order", seconds=SOAK_PROBE_SECONDS)
            rows.append(probe)
            if not probe["applied_per_s"]:
                raise RuntimeError(f"the in_order probe applied nothing: {probe['details']['audit']}")
            rate = max(1.0, round(probe["applied_per_s"] * SOAK_LOAD_SHARE))
            source = (
                f"{SOAK_LOAD_SHARE:.0%} of the {SOAK_PROBE_SECONDS:g} s in_order probe's "
                f"{probe['applied_per_s']} applied/s"
            )
            print(f"in_order probe: {probe['audit']} ({probe['applied_per_s']} applied/s); soak at {rate:g} events/s")

        spec = {**self.spec("soak", plan.duration), "rate": rate, "compact": True}
        pids = {"sequencer": self.sequencer.pid, "ledger": self.ledger.pid}
        origin = time.time()
        sampler = soak.Sampler(pids, self.backend_pids, origin)
        if server_settings(self.db).get("autovacuum") == "off":
            sampler.vacuum = soak.Vacuum(self.db.connect)
        before = self.snapshot()
        result = self.loadgen(spec, sampler)
        sampler.rebase(result["started_wall"])
        origin, end = sampler.origin, float(result["elapsed"])
        first = audits.accepted(result)
        drain_s, _terminal = self.drain(spec["prefix"], len(first))
        after = self.snapshot()
        db_rows = audits.sequencer_rows(self.db, spec["prefix"])
        audit = audits.run_audit(self.db, spec["prefix"], result, db_rows)
        row = self.summarise("soak", spec, result, first, db_rows, audit, drain_s, before, after)
        rows.append(row)
        print(f"soak: {row['audit']} ({row['events']} events)" + "".join(f"\n  - {p}" for p in audit.problems))

        acked, applied, s2a = soak.event_times(result, first, db_rows, origin)
        bucket = soak.bucket_seconds(plan.duration, plan.sample_interval)
        last = soak.window(plan.duration)
        samples = sampler.samples
        growth = {
            name: soak.growth(samples, name, plan.soak_warmup, last, soak.RSS_GROWTH_MAX) for name in soak.SERVICES
        }
        growth[soak.POSTGRES] = soak.growth(samples, soak.POSTGRES, plan.soak_warmup, last, None)
        section = {
            "seconds": plan.duration,
            "load_seconds": round(end, 2),
            "rate": rate,
            "rate_source": source,
            "concurrency": plan.concurrency,
            "entities": plan.entities,
            "mix": soak.MIX_TEXT,
            "warmup_seconds": plan.soak_warmup,
            "window_seconds": last,
            "sample_interval": plan.sample_interval,
            "bucket_seconds": bucket,
            "submitted_per_s": report.rate(len(acked), end),
            "applied_per_s": row["applied_per_s"],
            "rss_growth": growth,
            "timeline": soak.timeline(samples, acked, applied, s2a, end, bucket, rate),
            "samples": samples,
            "vacuum": None
            if sampler.vacuum is None
            else {
                "interval": sampler.vacuum.interval,
                "runs": sampler.vacuum.runs,
                "seconds": round(sampler.vacuum.seconds, 2),
            },
        }
        target_keys = ("metric", "max", "value", "met", "result")
        targets = [
            {"workload": "soak", "process": name, **{k: growth[name][k] for k in target_keys}} for name in soak.SERVICES
        ]
        return {
            "schema": 1,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "mode": "soak",
            "machine": self.machine(server_settings(self.db)),
            "settings": {
                "concurrency": plan.concurrency,
                "duration": plan.duration,
                "entities": plan.entities,
                "rate": plan.rate,
                "soak_warmup": plan.soak_warmup,
                "sample_interval": plan.sample_interval,
                "service_env": plan.service_env,
            },
            "workloads": {r["workload"]: r for r in rows},
            "soak": section,
            "targets": targets,
            "all_passed": all(r["audit"] == "PASS" for r in rows),
            "wall_seconds": round(time.monotonic() - started, 1),
        }


def overload_section(result: dict[str, Any], ack: dict[str, Any]) -> dict[str, Any] | None:
    """The overload workload's own figures: offered, admitted and refused per second (by reason)
    over the load phase, the ack latency of admitted calls, and the late re-sends."""
    figures = result.get("overload")
    if not figures:
        return None
    # Offered over the offering window; answers over the load phase (until the last is in).
    offered, seconds = figures["offered_seconds"], figures["load_seconds"]
    wire = report.latency_summary(figures["admitted_wire_latencies"])
    queue = report.latency_summary(figures["client_queue_waits"])
    refusal = report.latency_summary(figures["refusal_latencies"])
    return {
        "target_rate": figures["rate"],
        "offered_per_s": report.rate(figures["issued"], offered),
        "admitted_per_s": report.rate(figures["admitted"], seconds),
        "refused_per_s": {reason: report.rate(n, seconds) for reason, n in sorted(figures["refused"].items())},
        "refused": figures["refused"],
        "other_errors": figures["errors"],
        "expired_in_client_queue": figures["expired_in_client_queue"],
        "load_seconds": round(seconds, 2),
        # From the scheduled arrival (the client's queue included), and from the send alone.
        "admitted_ack_p50_ms": ack["p50_ms"],
        "admitted_ack_p99_ms": ack["p99_ms"],
        "admitted_wire_p50_ms": wire["p50_ms"],
        "admitted_wire_p99_ms": wire["p99_ms"],
        "client_queue_wait_p99_ms": queue["p99_ms"],
        "refusal_p99_ms": refusal["p99_ms"],
        "late_resent": figures["late"],
        "late_admitted": figures["late_admitted"],
        "late_refusals": figures["late_refusals"],
        "late_seconds": round(figures["late_seconds"], 2),
        "max_client_inflight": figures["max_client_inflight"],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def ingress_target(workload: str, submitted_vs_echo: float | None) -> dict[str, Any] | None:
    """SPEC 10's ingress target of a workload, and whether this run met it (None: no target)."""
    minimum = INGRESS_TARGETS.get(workload)
    if minimum is None:
        return None
    return report.target("submitted_vs_echo", submitted_vs_echo, minimum=minimum)


def applied_targets(workload: str, applied_vs_echo: float | None, s2a_p99_ms: float | None) -> list[dict[str, Any]]:
    """SPEC 10's applied targets of a workload (applied/echo, submit-to-applied p99), each with
    whether this run met it; empty where the workload has none."""
    targets = []
    if workload in APPLIED_TARGETS:
        targets.append(report.target("applied_vs_echo", applied_vs_echo, minimum=APPLIED_TARGETS[workload]))
    if workload in S2A_P99_TARGETS_MS:
        targets.append(report.target("s2a_p99_ms", s2a_p99_ms, maximum=S2A_P99_TARGETS_MS[workload]))
    return targets


def render(result: dict[str, Any]) -> str:
    rows = list(result["workloads"].values())
    echo = result["ceilings"]["echo"]
    pg = result["ceilings"]["pgbench"]
    lines = [report.table(rows), ""]
    pg_text = f"{pg['events_per_s']:,.1f} events/s" if pg.get("events_per_s") else pg.get("note", "not available")
    lines.append(f"transport ceiling (echo, {echo['concurrency']} callers): {echo['requests_per_s']:,.1f} requests/s")
    lines.append(
        f"database ceiling (pgbench, {pg['clients']} clients, {pg['statements_per_event']} statements/event): {pg_text}"
    )
    for row in rows:
        parts = []
        if row.get("submitted_vs_echo") is not None:
            parts.append(f"submitted/echo {row['submitted_vs_echo']:.2f}")
        if row.get("applied_vs_pgbench") is not None:
            parts.append(f"applied/pgbench {row['applied_vs_pgbench']:.0%}")
        if row.get("applied_vs_echo") is not None:
            parts.append(f"applied/echo {row['applied_vs_echo']:.0%}")
        if row.get("replays_vs_echo") is not None:
            parts.append(f"replays/echo {row['replays_vs_echo']:.0%}")
        lines.append(f"  {row['workload']}: " + ", ".join(parts))
        if row.get("overload"):
            lines.append(report.overload_line(row["overload"]))
    if result["targets"]:
        lines += ["", "SPEC 10 targets (reported; the exit status follows the audits only):"]
        lines.append(report.targets_table(result["targets"]))
    lines.append(f"all audits: {'PASS' if result['all_passed'] else 'FAIL'}  ({result['wall_seconds']} s)")
    return "\n".join(lines)


def render_soak(result: dict[str, Any]) -> str:
    lines = [report.table(list(result["workloads"].values())), "", soak.render(result["soak"]), ""]
    lines.append("targets (reported; the exit status follows the audits only):")
    lines.append(report.targets_table(result["targets"]))
    lines.append(f"all audits: {'PASS' if result['all_passed'] else 'FAIL'}  ({result['wall_seconds']} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    plan = parse(sys.argv[1:] if argv is None else argv)
    bench = Bench(plan)
    try:
        result = bench.run_soak() if plan.soak else bench.run()
    finally:
        bench.stop()
    report.write_json(plan.json_path, result)
    print()
    print(render_soak(result) if plan.soak else render(result))
    print(f"report: {plan.json_path}")
    return 0 if result["all_passed"] else 1
